"""Kernels of the ``torch`` backend for palora::mtlora_mm and its data gradient (docs/mtlora.md).

The base product is computed once, straight into output 0's buffer; every other output starts from
it with one addmm of its own expand (out=, so no (N, out) temporary per output), and output 0 adds
its expand last. The shrinks are skinny GEMMs: one over all of A when every adapter reads x.
"""
from __future__ import annotations

import torch

from ..._math import mtlora_col_scale, mtlora_dropped, mtlora_feeds, mtlora_offsets
from ..._rng import dropout_input
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
    for g in range(groups):
        lo = g * R
        hi = lo + (R if not xs else ranks[0])   # the adapters of group g that read x
        if hi > lo:                             # one (N, K) dropped copy alive at a time
            torch.mm(mtlora_dropped(x, g, p, seed, offset), A[lo:hi].t(), out=h[:, lo:hi])
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
            # out= a column slice (row stride G*Mg): MKL writes it in place with ldc = G*Mg; a temporary
            # plus copy ran 1.4x slower (3136 x 96 per group, G = 3, r = 32, 1 thread)
            torch.addmm(src[:, rows], h[:, cols], b, out=dst[:, rows])
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


# dX = (sum_o dY_o) W without the (N, M) sum when nothing else needs it: the sum is formed this many bytes of
# rows at a time (1 MiB: 910 rows at M = 288) and multiplied there, so it stays in cache and the peak drops by
# N x M x 4 bytes (3.4 MiB at Swin-T stage 1's QKV, fp32). Tests make it small to cover several chunks.
DX_CHUNK_BYTES = 1 << 20


def _sum_rows(dys, n0, n1, out):
    """out = sum_o dys[o][n0:n1]: T adds, no stacked copy."""
    torch.add(dys[0][n0:n1], dys[1][n0:n1], out=out) if len(dys) > 1 else out.copy_(dys[0][n0:n1])
    for d in dys[2:]:
        out.add_(d[n0:n1])
    return out


def mtlora_mm_dgrad(dys, x, xs, weight, A, B, ranks, scales, groups, shared_to_tasks, p, seed, offset,
                    need_x, need_base):
    """(dX, dXs, dBase, dG) of palora::mtlora_mm_dgrad (see palora_kernels._ops)."""
    T1, (N, M) = len(dys), dys[0].shape
    dy0 = dys[0]
    K = x.shape[1]
    R, offs = sum(ranks), mtlora_offsets(ranks)
    Mg = M // groups
    dbase = _sum_rows(dys, 0, N, dy0.new_empty((N, M))) if (need_base or shared_to_tasks) else None
    dg = dy0.new_empty((N, groups * R))
    for g in range(groups):
        rows = slice(g * Mg, (g + 1) * Mg)
        for a in range(T1):
            if ranks[a] == 0:
                continue
            dsum = (dbase if shared_to_tasks else dys[0]) if a == 0 else dys[a]
            torch.mm(dsum[:, rows], B[rows, offs[a]:offs[a + 1]], out=dg[:, g * R + offs[a]:g * R + offs[a + 1]])
    dx = dy0.new_empty((0, K))
    dxs = dy0.new_empty((0, N, K))
    if need_x:
        # dH A = (dG * s) A = dG (s A): scale the (G*R, K) factor, no (N, G*R) copy of dG
        As = A * mtlora_col_scale(scales, ranks).to(A.dtype)[:, None]
        dx = dy0.new_empty((N, K))
        if dbase is not None:
            torch.mm(dbase, weight, out=dx)
        else:
            step = max(1, DX_CHUNK_BYTES // max(1, M * dy0.element_size()))
            buf = dy0.new_empty((min(step, N), M))
            for n0 in range(0, N, step):
                n1 = min(N, n0 + step)
                torch.mm(_sum_rows(dys, n0, n1, buf[:n1 - n0]), weight, out=dx[n0:n1])
            del buf
        if p == 0.0 and not xs:          # every adapter reads x: one GEMM over all of them
            dx.addmm_(dg, As)
        for g in range(groups) if (p != 0.0 or xs) else ():
            lo = g * R
            hi = lo + (R if not xs else ranks[0])
            if hi == lo:
                continue
            if p == 0.0:
                dx.addmm_(dg[:, lo:hi], As[lo:hi])
            else:                    # the mask of x, regenerated: same (seed, offset + g*N*K) and shape
                dx.add_(dropout_input(dg[:, lo:hi] @ As[lo:hi], p, seed, offset + g * N * K))
        if xs:
            dxs = dy0.new_zeros((T1 - 1, N, K))
            for t in range(1, T1):
                for g in range(groups):
                    a0, a1 = g * R + offs[t], g * R + offs[t + 1]
                    if a1 > a0:
                        dxs[t - 1].addmm_(dg[:, a0:a1], As[a0:a1])
    return dx, dxs, (dbase if need_base else dy0.new_empty((0, M))), dg
