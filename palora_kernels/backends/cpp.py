"""The ``cpp`` backend: C++ CPU kernels of palora_kernels._C (csrc/cpu), the automatic choice on CPU for the ops
it has when the extension is built.

    lora_mm    the torch backend's stacked form (the base and expand GEMMs stay MKL's) with H = x A_cat^T
               from palora::lowrank_shrink, an AVX2 kernel for the skinny GEMM (R columns)
    lora_tmm   dA_cat = dH^T x and dB_cat^T = (H S)^T dY from palora::lowrank_tmm
               (both only where they beat MKL: FAST_MIN_ELEMENTS, FAST_MAX_R below; elsewhere torch's ops)
    pref_grad  the preference's gradient in one pass over H and dG, no (N, R) product temporary

The skinny products are where MKL is slow: 40-50 % of its square-GEMM speed at R = 12 (csrc/cpu/lowrank_ops.cpp),
~8 % of the per-sample linear layer's fwd+bwd. fp16/bf16/fp64 and CPUs without AVX2/FMA run the same ops
through at::mm, so every dtype the torch backend runs, this one runs too."""
from typing import Optional

import torch

from ._record import FLOATS, Backend

_OPS = ("pref_grad", "lowrank_shrink", "lowrank_tmm")


def check(device: torch.device) -> Optional[str]:
    from .. import _ext
    if not _ext._C_AVAILABLE:
        return f"palora_kernels._C is not built ({_ext._C_ERROR})"
    missing = [op for op in _OPS if not hasattr(torch.ops.palora, op)]
    if missing:
        return f"palora_kernels._C has no {', '.join(missing)} op (an older build: rebuild the extension)"
    return None


RECORD = Backend(
    name="cpp",
    kernels={"lora_mm": "palora_kernels.backends.cpp:lora_mm",
             "lora_tmm": "palora_kernels.backends.cpp:lora_tmm",
             "pref_grad": "palora_kernels.backends.cpp:pref_grad"},
    dtypes=FLOATS,
    devices=frozenset({"cpu"}),
    priority=0,
    check="palora_kernels.backends.cpp:check",
    summary="C++ CPU kernels of the extension (the skinny products of lora_mm and its backward, pref_grad)",
)


# Where the C++ kernels beat MKL (fp32, 2 threads, per op): from 2^18 elements of x (1024 x 512: 0.70x / 0.73x the
# time; 4096 x 1024: 0.52x / 0.65x) at R <= 24 (R = 32: tmm 1.07x; 48: 1.05x). Below (512 x 128: shrink 1.22x,
# 256 x 50: 1.67x) the thread fan-out costs more than it saves. Outside that range the ops are the torch
# backend's, bit for bit, so small layers (the MultiLeNet's) train exactly as on torch.
FAST_MIN_ELEMENTS = 1 << 18
FAST_MAX_R = 24


def _fast(rows: int, cols: int, R: int) -> bool:
    return rows * cols >= FAST_MIN_ELEMENTS and R <= FAST_MAX_R


def _shrink(x, down, row_align):
    if not _fast(x.shape[0], x.shape[1], down.shape[1]):
        from .torch.kernels import shrink
        return shrink(x, down, row_align)
    return torch.ops.palora.lowrank_shrink(x, down.t(), row_align)


def _tmm(a, b):
    if not _fast(b.shape[0], b.shape[1], a.shape[1]):
        return a.t() @ b
    return torch.ops.palora.lowrank_tmm(a, b)


def lora_mm(x, wm, bias, down, up, pref, rows_per_sample: int, scale: float):
    from .torch.kernels import lora_mm as stacked
    return stacked(x, wm, bias, down, up, pref, rows_per_sample, scale, shrink=_shrink, record=RECORD)


def lora_tmm(u, v, pref, rows_per_sample: int, rank: int, scale: float):
    from .._math import row_scaled_tmm
    return row_scaled_tmm(u, v, pref, rows_per_sample, rank, scale, tmm=_tmm)


def pref_grad(h, dg, pref, rows_per_sample: int, rank: int, scale: float):
    return torch.ops.palora.pref_grad(h, dg, pref, rows_per_sample, rank, scale)
