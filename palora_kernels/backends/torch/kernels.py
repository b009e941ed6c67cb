"""Kernels of the ``torch`` backend: the stacked form composed from torch ops.

A fixed number of GEMMs (convolutions) whatever T is, and no (N, out) temporary per adapter.
y comes dense out of its own GEMM and the expand is accumulated into it in place; H comes out
of a skinny GEMM over the same x into a buffer whose row stride is padded (see _ops).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..._math import acc_dtype, expand_operands, loralib_delta, row_scale
from ..._ops import conv_memory_format
from ..._rng import dropout_input
from . import RECORD


def _padded_cols(m: torch.Tensor, width: int) -> torch.Tensor:
    """(K, R) -> (K, width) = [m | 0], so the GEMM writes H straight into a padded-stride buffer."""
    K, R = m.shape
    if R == width:
        return m
    out = m.new_zeros(width, K)          # stored transposed: m is usually a transposed view
    out[:R].copy_(m.t())
    return out.t()


def shrink(x, down, row_align):
    """H = x down (N, R) into a buffer whose row stride is padded to ``row_align`` elements: a skinny GEMM
    (R + padding columns, ~R/M of the base's flops)."""
    R = down.shape[1]
    return torch.mm(x, _padded_cols(down, -(-R // row_align) * row_align))[:, :R]


def lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale, shrink=shrink, record=RECORD):
    """(y, H): y = x wm + bias + ((x down) * S) up, H = x down; see palora_kernels._ops. ``shrink`` forms
    H (the cpp backend passes its C++ kernel, with its own record's row alignment)."""
    R = down.shape[1]
    rank = R // pref.shape[1]
    h = shrink(x, down, record.h_row_align)
    # y: its own GEMM, dense as nn.Linear returns it (a shared [y | H] buffer made dX a strided view
    # that AccumulateGrad copied: +16 MiB, 1.48x the plain layer's peak, N=4096, d=1024)
    y = torch.mm(x, wm) if bias is None else torch.addmm(bias, x, wm)
    y.addmm_(*expand_operands(h, up, pref, rows_per_sample, rank, scale))
    return y, h


def lora_mm_dropout(x, wm, bias, down, up, pref, rows_per_sample, scale, p, seed, offset, on_expand):
    """lora_mm under LoRA dropout (see palora_kernels._ops): the mask of _rng, made here in torch ops.

    Forward: H = (x * mask / (1-p)) down. dX call (on_expand): the (N, M) low-rank term is masked,
    so it is its own GEMM here instead of an in-place addmm_ into y."""
    R = down.shape[1]
    rank = R // pref.shape[1]
    x_lora = x if on_expand else dropout_input(x, p, seed, offset)
    h = torch.mm(x_lora, _padded_cols(down, RECORD.h_row_stride(R)))[:, :R]
    del x_lora
    y = torch.mm(x, wm) if bias is None else torch.addmm(bias, x, wm)
    low = torch.mm(*expand_operands(h, up, pref, rows_per_sample, rank, scale))
    y += dropout_input(low, p, seed, offset) if on_expand else low
    return y, h


def lora_dropout_dA(dh, x, p, seed, offset):
    """dA_cat = dH^T (x * mask / (1-p)) (R, in): x~ regenerated with _rng, one (N, in) temporary."""
    return dh.t() @ dropout_input(x, p, seed, offset)


def lora_conv2d_dropout(x, weight, down, bias, up, pref, stride, padding, dilation, scale, p, seed, offset):
    """lora_conv2d under LoRA dropout: the base conv reads x, the shrink conv x * mask / (1-p) (mask over
    x's logical NCHW elements), so they are two convolutions and the per-batch expand does not fold
    into W."""
    C_out, R = up.shape
    rank = R // pref.shape[1]
    fmt = conv_memory_format(x)
    y = F.conv2d(x, weight, bias, stride, padding, dilation).contiguous(memory_format=fmt)
    h = F.conv2d(dropout_input(x, p, seed, offset), down, None, stride, padding, dilation)
    h = h.contiguous(memory_format=fmt)
    up_s = up[None] * row_scale(pref.to(up.dtype), rank, scale)[:, None, :]      # (P, C_out, R)
    y += torch.einsum("por,nrhw->nohw", up_s, h) if pref.shape[0] == 1 else \
        torch.einsum("nor,nrhw->nohw", up_s, h)
    return y, h


def lora_conv2d(x, weight, down, bias, up, pref, stride, padding, dilation, scale):
    """(y, H): y = conv(x, W) + b + B diag(S_n) H_n, H = conv(x, A_cat); see palora_kernels._ops."""
    C_out, R = up.shape
    rank = R // pref.shape[1]
    fmt = conv_memory_format(x)
    w = weight
    if pref.shape[0] == 1:
        # one preference for the batch: conv(x, W) + B S conv(x, A) = conv(x, W + B S A): the expand
        # folds into the base weight (C_out*C_in*k*k*R flops) and no 1x1 expand pass over y is made
        up_s = up * row_scale(pref.to(up.dtype), rank, scale)                     # (C_out, R)
        w = torch.addmm(weight.flatten(1), up_s, down.flatten(1)).view_as(weight)
    # base and shrink in ONE convolution over C_out + R channels, then y and H copied out dense: oneDNN
    # ran 76 channels as fast as 64 (60 vs 67 ms) and 12 alone at 39 ms (8 x 64ch 64x64 3x3, 2 threads),
    # so two convolutions cost ~1.6x one; the copies are one pass over y and H
    b = None if bias is None else torch.cat([bias, bias.new_zeros(R)])
    z = F.conv2d(x, torch.cat([w, down]), b, stride, padding, dilation)
    y = z[:, :C_out].clone(memory_format=fmt)       # clone: a 1-image slice would alias z
    h = z[:, C_out:].clone(memory_format=fmt)
    del z
    if pref.shape[0] == 1:
        return y, h
    N, _, Ho, Wo = y.shape
    up_s = up[None] * row_scale(pref.to(up.dtype), rank, scale)[:, None, :]      # (N, C_out, R)
    # one batched GEMM into a temporary, then one add: an in-place baddbmm_ on y's strided view
    # ran as N separate addmm_ calls (4x slower at N=8, C_out=64, 64x64 on a 2-core CPU)
    if fmt == torch.channels_last:      # (N, HW, C) views of NHWC memory
        y.permute(0, 2, 3, 1).view(N, Ho * Wo, C_out).add_(
            torch.bmm(h.permute(0, 2, 3, 1).view(N, Ho * Wo, R), up_s.transpose(1, 2)))
    else:
        y.view(N, C_out, Ho * Wo).add_(torch.bmm(up_s, h.view(N, R, Ho * Wo)))
    return y, h


def loralib_conv2d(x, weight, bias, lora_A, lora_B, preference, scale, stride, padding, dilation,
                   parameterization="loralib"):
    """The loralib layer (a differentiable composition). Its adapters are full-rank in channel
    space, so: per-batch p: merge once (out*in*k^2*R flops) and run ONE conv; per-sample p: ONE
    conv with (T+1)*C_out channels [W; dW_1..dW_T] -- the (T+1)x work is the floor of this
    parameterisation -- then mix the T+1 channel groups per image with one batched matmul (no
    per-task (N, C_out, Ho, Wo) temporaries).
    """
    deltas = loralib_delta(lora_A, lora_B, weight.shape)                # (T, C_out, C_in, k, k)
    if preference.requires_grad and acc_dtype(x.dtype) != x.dtype:
        # fp16/bf16: the preference's gradient from fp32 (see _PrefGradFP32); the rest as below
        y = loralib_conv2d(x, weight, bias, lora_A, lora_B, preference.detach(), scale, stride, padding, dilation)
        return _PrefGradFP32.apply(y, preference, x, lora_A, lora_B, weight.shape, scale, stride, padding, dilation)
    if preference.dim() == 1:
        w_eff = weight + torch.tensordot(preference.to(weight.dtype) * scale, deltas, dims=1)
        return F.conv2d(x, w_eff, bias, stride, padding, dilation)
    T, C_out = deltas.shape[0], weight.shape[0]
    wbig = torch.cat([weight[None], deltas]).flatten(0, 1)                # ((T+1) C_out, C_in, k, k)
    z = F.conv2d(x, wbig, None, stride, padding, dilation)
    N, _, Ho, Wo = z.shape
    coef = torch.cat([x.new_ones(N, 1), preference.to(x.dtype) * scale], dim=1)   # (N, T+1)
    # reshape, not view: a channels_last x gives a channels_last z
    y = torch.bmm(coef[:, None, :], z.reshape(N, T + 1, C_out * Ho * Wo)).view(N, C_out, Ho, Wo)
    y = y if bias is None else y + bias.view(1, -1, 1, 1)
    return y.contiguous(memory_format=conv_memory_format(x))


class _PrefGradFP32(torch.autograd.Function):
    """Identity on y; the preference's gradient dp[n, t] = s <dY_n, conv(x_n, dW_t)> (summed over n for a
    per-batch p), dW_t = (B_t A_t).view(W.shape), formed in fp32 from the fp16/bf16 x, A and B. Through the
    rounded dW_t and conv outputs (or the rounded weight gradient, per-batch) the loralib layer's dp had
    up to 6x the same-dtype loop's error. Costs T fp32 convolutions of the base's size, only when the
    preference needs a gradient."""

    @staticmethod
    def forward(ctx, y, preference, x, lora_A, lora_B, weight_shape, scale, stride, padding, dilation):
        ctx.save_for_backward(x, lora_A, lora_B)
        ctx.conf = (preference.dim(), preference.dtype, weight_shape, scale, stride, padding, dilation)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        x, lora_A, lora_B = ctx.saved_tensors
        pdim, pdtype, weight_shape, scale, stride, padding, dilation = ctx.conf
        dp = None
        if ctx.needs_input_grad[1]:
            # fp32 normally; the input dtype when the backward itself is differentiated (create_graph)
            acc = x.dtype if torch.is_grad_enabled() else acc_dtype(x.dtype)
            deltas = loralib_delta(lora_A.to(acc), lora_B.to(acc), weight_shape)
            T, C_out = deltas.shape[:2]
            z = F.conv2d(x.to(acc), deltas.flatten(0, 1), None, stride, padding, dilation)
            z = z.unflatten(1, (T, C_out))                                          # (N, T, C_out, Ho, Wo)
            dp = (z * dy.to(acc)[:, None]).sum((2, 3, 4)) * scale                   # (N, T)
            dp = (dp.sum(0) if pdim == 1 else dp).to(pdtype)
        return dy, dp, None, None, None, None, None, None, None, None
