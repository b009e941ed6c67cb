"""The ``cpp`` backend: C++ CPU kernels of palora_kernels._C (csrc/cpu), the automatic choice on CPU for the ops
it has when the extension is built.

    lora_mm        H = x A_cat^T from palora::lowrank_shrink, an AVX2 kernel for the skinny GEMM (R columns); then
                   y = bias + (H S) B_cat^T written in one pass (palora::lowrank_expand) and the base GEMM (MKL)
                   accumulated onto it
    lora_mm_dgrad  the backward's products of dY: dG = dY B_cat, dB_cat^T = (H S)^T dY and db from one read of dY
                   (palora::lowrank_dual), then dX as the forward's y
    lora_tmm       dA_cat = dH^T x (and dB_cat^T where lora_mm_dgrad does not run) from palora::lowrank_tmm
                   (all only where they beat MKL: FAST_MIN_ELEMENTS, FAST_MAX_R below, fp32; elsewhere torch's ops)
    pref_grad      the preference's gradient in one pass over H and dG, no (N, R) product temporary

The skinny products are where MKL is slow: 40-50 % of its square-GEMM speed at R = 12 (csrc/cpu/lowrank_ops.cpp),
~8 % of the per-sample linear layer's fwd+bwd. fp16/bf16/fp64 and CPUs without AVX2/FMA run the same ops
through at::mm, so every dtype the torch backend runs, this one runs too."""
from typing import Optional

import torch

from .._math import apply_row_scale, expand_operands, row_scale
from ._record import FLOATS, Backend

_OPS = ("pref_grad", "lowrank_shrink", "lowrank_tmm", "lowrank_dual", "lowrank_expand")


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
             "lora_mm_dgrad": "palora_kernels.backends.cpp:lora_mm_dgrad",
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


def _expand_first(x, wm, bias, h, up, pref, rows_per_sample: int, rank: int, scale: float):
    """y = x wm + bias + (H * S) up, the low-rank term first and the base GEMM accumulated onto it (beta = 1).
    palora::lowrank_expand writes y = bias + (H S) up in one pass, where the stacked order broadcasts bias into y,
    runs the GEMM, then reads and writes y again for the expand: 1.2-1.5 ms against 2.0-2.2 for copy + addmm_ on a
    fresh (4096, 1024) y (benchmarks/linear_cpu_backends.py --ops). fp32 only: in fp16/bf16 the low-rank term
    would be rounded before the sum."""
    g, up = expand_operands(h, up, pref, rows_per_sample, rank, scale)
    return torch.ops.palora.lowrank_expand(g, up, bias).addmm_(x, wm)


def _fast_fp32(x, R: int) -> bool:
    return x.dtype == torch.float32 and _fast(x.shape[0], x.shape[1], R)


def lora_mm(x, wm, bias, down, up, pref, rows_per_sample: int, scale: float):
    from .torch.kernels import lora_mm as stacked
    R = down.shape[1]
    if not _fast_fp32(x, R):
        return stacked(x, wm, bias, down, up, pref, rows_per_sample, scale, shrink=_shrink, record=RECORD)
    h = _shrink(x, down, RECORD.h_row_align)
    return _expand_first(x, wm, bias, h, up, pref, rows_per_sample, R // pref.shape[1], scale), h


def lora_mm_dgrad(dy, weight, B_cat, A_cat, h, pref, rows_per_sample: int, scale: float, need_x: bool,
                  need_B: bool, need_b: bool):
    """The linear backward's products of dY: (dX or None, dG, dB_cat^T or None, db or None), with
    dG = dY B_cat, dX = dY W + (dG * S) A_cat, dB_cat^T = (H * S)^T dY, db = sum_n dY.

    fp32 past the crossover: dG, dB_cat^T and db from ONE read of dY (palora::lowrank_dual; db is the row of a
    column of ones appended to H * S), where the ops one by one read dY three times (4096 x 1024: 2.6-2.7 ms
    against 3.7 for the C++ shrink and tmm and torch's sum, benchmarks/linear_cpu_backends.py --ops), and dX
    as the forward's y (_expand_first).
    Elsewhere the torch backend's ops, bit for bit."""
    R = B_cat.shape[1]
    rank = R // pref.shape[1]
    if not _fast_fp32(dy, R):
        if need_x:
            dx, dg = lora_mm(dy, weight, None, B_cat, A_cat, pref, rows_per_sample, scale)
        else:
            dx, dg = None, dy @ B_cat
        dbt = lora_tmm(h, dy, pref, rows_per_sample, rank, scale) if need_B else None
        return dx, dg, dbt, (dy.sum(0) if need_b else None)
    per_batch = pref.shape[0] == 1
    cols = []
    if need_B:
        cols.append(h if per_batch else apply_row_scale(h, pref, rows_per_sample, rank, scale))
    if need_b:
        cols.append(dy.new_ones(dy.shape[0], 1))
    dbt = db = None
    if cols:
        g = torch.cat(cols, 1) if len(cols) > 1 else cols[0]
        dg, gtv = torch.ops.palora.lowrank_dual(dy, B_cat.t(), g, RECORD.h_row_align)
        if need_B:
            dbt = gtv[:R] * row_scale(pref, rank, scale)[0, :, None] if per_batch else gtv[:R]
        if need_b:
            db = gtv[-1].clone()      # fresh: a view would keep the (R + 1, out) result alive as bias.grad
    else:
        dg = _shrink(dy, B_cat, RECORD.h_row_align)
    dx = _expand_first(dy, weight, None, dg, A_cat, pref, rows_per_sample, rank, scale) if need_x else None
    return dx, dg, dbt, db


def lora_tmm(u, v, pref, rows_per_sample: int, rank: int, scale: float):
    from .._math import row_scaled_tmm
    return row_scaled_tmm(u, v, pref, rows_per_sample, rank, scale, tmm=_tmm)


def pref_grad(h, dg, pref, rows_per_sample: int, rank: int, scale: float):
    return torch.ops.palora.pref_grad(h, dg, pref, rows_per_sample, rank, scale)
