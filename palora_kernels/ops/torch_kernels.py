"""The ``torch`` backend: the CPU (and any-device) composition of stacked GEMMs.

A fixed number of GEMMs whatever T is, and no (N, out) temporary per adapter:
base and shrink share one GEMM over x (weights concatenated along the output dim),
the expand is accumulated into that GEMM's output in place with addmm/baddbmm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._math import apply_row_scale, row_scale
from .._ops import lora_mm_row_stride
from ..dispatch import register_kernel


def _padded_bias(bias, R):
    return None if bias is None else torch.cat([bias, bias.new_zeros(R)])


def _stack_cols(wm, down, width):
    """(K, M) and (K, R) -> (K, width) = [wm | down | 0], stored in whichever order copies cheaply.

    The forward gets wm = W^T (a transposed view): concatenating the untransposed rows is a
    contiguous copy, and the GEMM reads the result transposed at the same speed."""
    K, M = wm.shape
    R = down.shape[1]
    if not wm.is_contiguous() and wm.t().is_contiguous():
        w = wm.new_zeros(width, K)
        w[:M].copy_(wm.t())
        w[M:M + R].copy_(down.t())
        return w.t()
    w = wm.new_zeros(K, width)
    w[:, :M].copy_(wm)
    w[:, M:M + R].copy_(down)
    return w


@register_kernel("torch", "lora_mm")
def lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale):
    """z (N, M+R) = [x wm + bias + ((x down) * S) up | x down]; see palora_kernels._ops."""
    M, R = wm.shape[1], down.shape[1]
    rank = R // pref.shape[1]
    # Base and shrink in ONE GEMM over x, its width padded to a multiple of 16 floats (one 64-byte
    # line per row end): a (4096, 1036) output ran 1.30x slower than (4096, 1040) or (4096, 1024)
    # with MKL (min of 11, N=K=4096x1024, R=12, 2 threads); padding costs 0.4% more flops.
    width = lora_mm_row_stride(M, R, "torch")
    wcat = _stack_cols(wm, down, width)
    bcat = None if bias is None else torch.cat([bias, bias.new_zeros(width - M)])
    zp = torch.mm(x, wcat) if bcat is None else torch.addmm(bcat, x, wcat)
    y, h = zp[:, :M], zp[:, M:M + R]
    if pref.shape[0] == 1:
        # one preference for all rows: fold S into `up` (R x M) instead of scaling H (N x R).
        # (Folding the whole expand into wm, wm + down diag(S) up, measured no faster here:
        # 143.6 vs 140.0 ms fwd, N=4096, in=out=1024, medians of 15, loaded 2-core CPU.)
        y.addmm_(h, up * row_scale(pref.to(up.dtype), rank, scale).t())
    else:
        y.addmm_(apply_row_scale(h, pref, rows_per_sample, rank, scale), up)
    # the (N, M+R) view of the padded buffer: no extra pass over z (its fake has the same strides)
    return zp[:, :M + R]


@register_kernel("torch", "lora_conv2d")
def lora_conv2d(x, wcat, bias, up, pref, stride, padding, dilation, scale):
    """z (N, C_out+R, Ho, Wo) = [conv(x, W) + b + B diag(S_n) H_n | H_n]; one conv for base + shrink."""
    C_out, R = up.shape
    rank = R // pref.shape[1]
    if pref.shape[0] == 1:
        # one preference for the batch: conv(x, W) + B S conv(x, A) = conv(x, W + B S A), so the
        # expand folds into the base channels of the one conv (C_out*C_in*k*k*R flops, 0.4 MFLOP
        # for 64->64 3x3 R=12) and the 1x1 expand pass disappears and with it 8 per-image
        # addmm_ calls: fwd 99.8 ms median with the fold vs 137.9 without (min 54.8 vs 73.2; x=(8,64,64,64),
        # 21 interleaved rounds on a loaded 2-core CPU, plain conv 60.8 ms).
        up_s = up * row_scale(pref.to(up.dtype), rank, scale)                     # (C_out, R)
        w_eff = torch.addmm(wcat[:C_out].flatten(1), up_s, wcat[C_out:].flatten(1))
        wcat = torch.cat([w_eff.view_as(wcat[:C_out]), wcat[C_out:]])
        return F.conv2d(x, wcat, _padded_bias(bias, R), stride, padding, dilation).contiguous()
    z = F.conv2d(x, wcat, _padded_bias(bias, R), stride, padding, dilation).contiguous()
    N, _, Ho, Wo = z.shape
    y = z[:, :C_out].view(N, C_out, Ho * Wo)                  # a view: the expand lands in z
    h = z[:, C_out:].view(N, R, Ho * Wo)
    up_s = up[None] * row_scale(pref.to(up.dtype), rank, scale)[:, None, :]   # (P, C_out, R)
    # one batched GEMM into a temporary, then one add: in-place baddbmm_ on the strided y runs as
    # N separate addmm_ calls, 63.8 ms vs 16.2 ms median (min 58.6 vs 9.2) for N=8, C_out=64,
    # R=12, 64x64 (15 interleaved rounds, loaded 2-core CPU); the (N, C_out, HW) temporary is
    # freed before the backward, below the fwd+bwd peak.
    y.add_(torch.bmm(up_s, h))
    return z
