"""palora::mtlora_mm and palora::mtlora_mm_dgrad on the CUDA C++ kernels (csrc/cuda/mtlora_mm.cuh): the
``cuda`` backend's kernels, and the host-side preparation the ``cuda_sim`` backend shares with it.

Dropout (p > 0) runs in the kernels: the counter-based mask of palora_kernels._rng (csrc/cuda/philox.h),
regenerated in the backward from (seed, offset).
"""
from __future__ import annotations

import torch

from ..._math import mtlora_col_scale


def col_scale_rows(scales: torch.Tensor, ranks, groups: int, has_xs: bool) -> torch.Tensor:
    """(T+1, G*R) fp32: row 0 the scale s[g, a] of each column of H that is read from x (every column
    without task inputs, the shared ones with), row t task t's columns; 0 elsewhere."""
    T1 = len(ranks)
    cs = mtlora_col_scale(scales.float(), ranks)                       # (G*R,)
    owner = torch.tensor([a for a in range(T1) for _ in range(ranks[a])] * groups, device=scales.device,
                         dtype=torch.long)
    rows = (owner[None, :] == torch.arange(T1, device=scales.device)[:, None]).float() * cs
    if not has_xs:
        rows[0] = cs
    return rows.contiguous()


def dgrad_inputs(dys, ranks, scales, groups, xs, shared_to_tasks, need_x, need_base):
    """Contiguous gradients, dBase = sum_o dY_o (None when nothing needs it: T adds in the dtype, the
    torch backend's order) and the column scale rows."""
    dys = [d.contiguous() for d in dys]
    dbase = None
    if need_x or need_base or shared_to_tasks:
        dbase = dys[0] + dys[1] if len(dys) > 1 else dys[0].clone()
        for d in dys[2:]:
            dbase.add_(d)
    return dys, dbase, col_scale_rows(scales, ranks, groups, bool(xs))


def _require_ops() -> None:
    if not hasattr(torch.ops.palora, "mtlora_mm_cuda"):
        raise RuntimeError("palora_kernels._C was built before the MTLoRA kernels (no palora::mtlora_mm_cuda): "
                           "rebuild it (pip install -e . or python setup.py build_ext --inplace)")


def mtlora_mm(x, xs, weight, bias, A, B, ranks, scales, groups, shared_to_tasks, p, seed, offset):
    """(Y, H); see palora_kernels._ops."""
    _require_ops()
    return torch.ops.palora.mtlora_mm_cuda(x, list(xs), weight, bias, A, B, list(ranks), scales.float(), groups,
                                           bool(shared_to_tasks), float(p), int(seed), int(offset))


def mtlora_mm_dgrad(dys, x, xs, weight, A, B, ranks, scales, groups, shared_to_tasks, p, seed, offset, need_x,
                    need_base):
    """(dX, dXs, dBase, dG); see palora_kernels._ops."""
    _require_ops()
    dys, dbase, cs = dgrad_inputs(dys, ranks, scales, groups, xs, shared_to_tasks, need_x, need_base)
    dx, dxs, dg = torch.ops.palora.mtlora_mm_dgrad_cuda(dys, dbase, weight, A, B, list(ranks), cs, groups,
                                                        bool(shared_to_tasks), bool(need_x), len(xs), float(p),
                                                        int(seed), int(offset))
    return dx, dxs, (dbase if need_base else dys[0].new_empty((0, dys[0].shape[1]))), dg

