"""Kernels of the ``torch`` backend for palora::mtlora_mm and its data gradient (docs/mtlora.md).

The base product is computed once, straight into output 0's buffer; every other output starts from
it with one addmm of its own expand (out=, so no (N, out) temporary per output), and output 0 adds
its expand last. The shrinks are skinny GEMMs: one over all of A when every adapter reads x.
"""
from __future__ import annotations

import torch

from ..._math import mtlora_dropout_masks, mtlora_feeds, mtlora_offsets
from . import RECORD
from .kernels import _padded_cols


def _shrink(x, xs, A, ranks, groups, p, seed, offset):
    """H (N, G*R), H[:, g, a] = x_a A[g, a]^T, in a buffer with the record's padded row stride."""
    R, offs = sum(ranks), mtlora_offsets(ranks)
    GR = groups * R
    width = RECORD.h_row_stride(GR)
    if p == 0.0 and not xs:      # every adapter reads x: one GEMM over all of A, zero-padded to the stride
        return torch.mm(x, _padded_cols(A.t(), width))[:, :GR]
    h = x.new_empty((x.shape[0], width))[:, :GR]
    xd = mtlora_dropout_masks(x, groups, p, seed, offset)
    for g in range(groups):
        lo = g * R
        hi = lo + (R if not xs else ranks[0])   # the adapters of group g that read x
        if hi > lo:
            h[:, lo:hi] = xd[g] @ A[lo:hi].t()
        for t in range(1, len(ranks)) if xs else ():
            a0, a1 = lo + offs[t], lo + offs[t + 1]
            if a1 > a0:
                h[:, a0:a1] = xs[t - 1] @ A[a0:a1].t()
    return h


def mtlora_mm(x, xs, weight, bias, A, B, ranks, scales, groups, shared_to_tasks, p, seed, offset):
    """(Y, H) of palora::mtlora_mm (see palora_kernels._ops)."""
    N, K = x.shape
    T, R, offs = len(ranks) - 1, sum(ranks), mtlora_offsets(ranks)
    M = weight.shape[0]
    Mg = M // groups
    h = _shrink(x, xs, A, ranks, groups, p, seed, offset)
    y = x.new_empty((T + 1, N, M))
    if bias is None:
        torch.mm(x, weight.t(), out=y[0])
    else:
        torch.addmm(bias, x, weight.t(), out=y[0])
    s = scales.to(B.dtype)
    def expand(dst, src, g, a):      # dst[:, g] = src[:, g] + s[g, a] H[:, g, a] B[g, a]^T
        if ranks[a] == 0:
            if dst is not src:
                dst[:, g * Mg:(g + 1) * Mg].copy_(src[:, g * Mg:(g + 1) * Mg])
            return
        cols, rows = slice(g * R + offs[a], g * R + offs[a + 1]), slice(g * Mg, (g + 1) * Mg)
        b = (B[rows, offs[a]:offs[a + 1]] * s[g, a]).t()
        if dst is src:
            dst[:, rows].addmm_(h[:, cols], b)
        else:
            torch.addmm(src[:, rows], h[:, cols], b, out=dst[:, rows]) if groups == 1 else \
                dst[:, rows].copy_(torch.addmm(src[:, rows], h[:, cols], b))
    if shared_to_tasks:              # matrixv2: y_t = (base + shared) + task_t, so output 0 first
        for g in range(groups):
            expand(y[0], y[0], g, 0)
    for o in range(1, T + 1):
        for g in range(groups):
            expand(y[o], y[0], g, o)
    if not shared_to_tasks:
        for g in range(groups):
            expand(y[0], y[0], g, 0)
    return y, h


def mtlora_mm_dgrad(dy, x, xs, weight, A, B, ranks, scales, groups, shared_to_tasks, p, seed, offset,
                    need_x, need_base):
    """(dX, dXs, dBase, dG) of palora::mtlora_mm_dgrad (see palora_kernels._ops)."""
    T1, N, M = dy.shape
    K = x.shape[1]
    R, offs = sum(ranks), mtlora_offsets(ranks)
    Mg = M // groups
    dbase = dy.sum(0) if (need_x or need_base or shared_to_tasks) else None
    dg = dy.new_empty((N, groups * R))
    for g in range(groups):
        rows = slice(g * Mg, (g + 1) * Mg)
        for a in range(T1):
            if ranks[a] == 0:
                continue
            dsum = (dbase if shared_to_tasks else dy[0]) if a == 0 else dy[a]
            dg[:, g * R + offs[a]:g * R + offs[a + 1]] = dsum[:, rows] @ B[rows, offs[a]:offs[a + 1]]
    dx = dy.new_empty((0, K))
    dxs = dy.new_empty((0, N, K))
    if need_x:
        reps = torch.tensor(list(ranks), device=dy.device).repeat(groups)
        dh = dg * scales.reshape(-1).to(dg.dtype).repeat_interleave(reps, output_size=groups * R)
        dx = dbase @ weight
        for g in range(groups):
            lo = g * R
            hi = lo + (R if not xs else ranks[0])
            if hi == lo:
                continue
            if p == 0.0:
                dx.addmm_(dh[:, lo:hi], A[lo:hi])
            else:                    # the mask of x, regenerated: same (seed, offset + g*N*K) and shape
                from ..._rng import dropout_input
                dx.add_(dropout_input(dh[:, lo:hi] @ A[lo:hi], p, seed, offset + g * N * K))
        if xs:
            dxs = dy.new_zeros((T1 - 1, N, K))
            for t in range(1, T1):
                for g in range(groups):
                    a0, a1 = g * R + offs[t], g * R + offs[t + 1]
                    if a1 > a0:
                        dxs[t - 1].addmm_(dh[:, a0:a1], A[a0:a1])
    return dx, dxs, (dbase if need_base else dy.new_empty((0, M))), dg
