"""The ``cpp`` backend: C++ CPU kernels of palora_kernels._C (csrc/cpu). Today one op: pref_grad,
the backward's preference gradient in one pass over H and dG, with no (N, R) product temporary."""
from typing import Optional

import torch

from ._record import FLOATS, Backend


def check(device: torch.device) -> Optional[str]:
    from .. import _ext
    if not _ext._C_AVAILABLE:
        return f"palora_kernels._C is not built ({_ext._C_ERROR})"
    if not hasattr(torch.ops.palora, "pref_grad"):
        return "palora_kernels._C has no pref_grad op"
    return None


RECORD = Backend(
    name="cpp",
    kernels={"pref_grad": "palora_kernels.backends.cpp:pref_grad"},
    dtypes=FLOATS,
    devices=frozenset({"cpu"}),
    priority=0,
    check="palora_kernels.backends.cpp:check",
    summary="C++ CPU kernels of the extension (pref_grad)",
)


def pref_grad(h, dg, pref, rows_per_sample: int, rank: int, scale: float):
    return torch.ops.palora.pref_grad(h, dg, pref, rows_per_sample, rank, scale)
