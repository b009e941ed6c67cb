"""The ``torch`` backend: the CPU (and any-device) composition of stacked GEMMs.

A fixed number of GEMMs whatever T is, and no (N, out) temporary per adapter:
base and shrink share one GEMM over x (weights concatenated along the output dim),
the expand is accumulated into that GEMM's output in place with addmm/baddbmm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._math import apply_row_scale, row_scale
from ..dispatch import register_kernel


def _padded_bias(bias, R):
    return None if bias is None else torch.cat([bias, bias.new_zeros(R)])


@register_kernel("torch", "lora_mm")
def lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale):
    """z (N, M+R) = [x wm + bias + ((x down) * S) up | x down]; see palora_kernels._ops."""
    M, R = wm.shape[1], down.shape[1]
    rank = R // pref.shape[1]
    wcat = torch.cat([wm, down], dim=1)                       # (K, M+R): out*in copy, ~0.2% of the GEMM
    bcat = _padded_bias(bias, R)
    z = torch.mm(x, wcat) if bcat is None else torch.addmm(bcat, x, wcat)
    y, h = z[:, :M], z[:, M:]
    if pref.shape[0] == 1:
        # one preference for all rows: fold S into `up` (R x M) instead of scaling H (N x R)
        y.addmm_(h, up * row_scale(pref.to(up.dtype), rank, scale).t())
    else:
        y.addmm_(apply_row_scale(h, pref, rows_per_sample, rank, scale), up)
    return z


@register_kernel("torch", "lora_conv2d")
def lora_conv2d(x, wcat, bias, up, pref, stride, padding, dilation, scale):
    """z (N, C_out+R, Ho, Wo) = [conv(x, W) + b + B diag(S_n) H_n | H_n]; one conv for base + shrink."""
    C_out, R = up.shape
    rank = R // pref.shape[1]
    z = F.conv2d(x, wcat, _padded_bias(bias, R), stride, padding, dilation).contiguous()
    N, _, Ho, Wo = z.shape
    y = z[:, :C_out].view(N, C_out, Ho * Wo)                  # a view: the expand lands in z
    h = z[:, C_out:].view(N, R, Ho * Wo)
    S = row_scale(pref.to(up.dtype), rank, scale)             # (P, R)
    # 2-D @ 3-D matmul (one GEMM) plus an add, not baddbmm_ into the strided view y: that falls back
    # to one addmm_ per image, 4x slower (N=1280, C_out=10, R=4, 14x14, CPU, 2 threads: 40 vs 10 ms)
    if pref.shape[0] == 1:
        y.add_(torch.matmul(up * S, h))
    else:
        y.add_(torch.matmul(up, h * S[:, :, None]))
    return z
