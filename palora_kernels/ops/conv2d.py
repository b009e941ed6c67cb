"""PaLoRA conv2d (factorized adapters): the autograd Function on the stacked form.

Implicit-GEMM view, rows = N*Ho*Wo, K = C_in*kh*kw: base and shrink read the same im2col(x);
the expand is a 1x1 conv with B_cat diag(S_n), accumulated into the base output.

Two ways to run it, both exact:

Effective weights (fp32/fp64, when rows sharing one preference >= 2*K*C_out/(K+C_out); for a
per-sample preference also K <= Ho*Wo, so N weights take no more memory than the output, and x
NCHW-contiguous): image n computes conv(x_n, W_n) + b with W_n = W + B_cat diag(S_n) A_cat.
    forward:  y = conv(x, W_n)             ONE convolution; per-sample: grouped, groups = N
    backward: dX, dW_n = convolution_backward(dY, x, W_n)        ONE call, grouped likewise
              dW = sum_n dW_n; dA, dB, dp from dW_n (_math.weight_space_grads), weight-sized
Forming the N weights costs N*C_out*K*R flops. H is neither computed nor saved. oneDNN ran the
grouped convolution as fast as the plain one (8 x 64ch 64x64 3x3, 2 threads: 39-60 ms either way).

The stacked kernels otherwise:
    forward:  y, H = lora_conv2d(x, W, A_cat, b, B_cat)
    backward, per image n, HW flattened:
        dG_n = B_cat^T dY_n      dH_n = dG_n * S_n      dZ = [dY | dH]
        (dX, [dW; dA_cat], db) = convolution_backward(dZ, x, [W; A_cat])     one pass over x and dZ
        dB_cat = sum_n dY_n (H_n * S_n)^T
        dp[n, t] = s * sum_{j, hw} H[n, t*r+j] dG[n, t*r+j]   (summed over n for a per-batch p)
    One call over C_out + R channels: the R-channel convolutions alone ran at a fraction of oneDNN's
    speed (12 channels: 39 ms against 60 ms for 76 channels, same shape as above).

LoRA dropout (docs/dropout.md), drop = (p, seed, offset): the shrink conv reads x~ = x * mask / (1-p)
(mask over x's logical NCHW elements, regenerated in the backward, never saved), so base and adapter are
separate convolutions, forward and backward (two convolution_backward calls, dX = dX_base + mask *
dX~ / (1-p)). No weight-space path.

Double backward: with grad mode on in the backward (``create_graph=True``) the gradients come from
differentiating _math.conv_composite with ``create_graph`` instead, as in ops/linear.py: exact
second derivatives on both paths, per-batch and per-sample.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ops, dispatch
from .._math import (acc_dtype, composite_grads, conv_composite, merged_deltas, row_scale, stack_A, stack_B,
                     unstack_B, use_weight_space, weight_space_grads)
from .._rng import dropout_input


def _cm(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> an (N, C, H*W) view in either memory format (strided for channels_last)."""
    N, C, H, W = t.shape
    if t.is_contiguous():
        return t.view(N, C, H * W)
    return t.permute(0, 2, 3, 1).reshape(N, H * W, C).transpose(1, 2)


def _effective_weights(weight, lora_A, lora_B, pref, scale):
    """W_n = W + B_cat diag(S_n) A_cat for each row of pref: (P * C_out, C_in, kh, kw)."""
    A_flat = stack_A(lora_A).flatten(1)                                  # (R, K)
    w = weight.flatten(1) + merged_deltas(A_flat, stack_B(lora_B), pref, lora_A.shape[1], scale)
    return w.view(-1, *weight.shape[1:])


def weight_space(x, weight, pref, Ho, Wo) -> bool:
    """Whether the layer runs through its effective weights (see the module docstring)."""
    N, C_out, K = x.shape[0], weight.shape[0], weight[0].numel()
    if pref.shape[0] == 1:
        return use_weight_space(N * Ho * Wo, K, C_out, x.dtype)
    return N > 0 and x.is_contiguous() and K <= Ho * Wo and use_weight_space(Ho * Wo, K, C_out, x.dtype)


def _grouped(t):
    """(N, C, H, W) -> (1, N*C, H, W): image n becomes group n of a grouped convolution."""
    return t.reshape(1, -1, *t.shape[2:])


class PaLoRAConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, pref, stride, padding, dilation, scale, backend, drop=None):
        Ho = _ops.conv_out_size(x.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
        Wo = _ops.conv_out_size(x.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
        ws = drop is None and weight_space(x, weight, pref, Ho, Wo)
        if ws:
            w_eff = _effective_weights(weight, lora_A, lora_B, pref, scale)
            P = pref.shape[0]
            if P == 1:
                y = F.conv2d(x, w_eff, bias, stride, padding, dilation)
            else:
                b = None if bias is None else bias.repeat(P)
                y = F.conv2d(_grouped(x), w_eff, b, stride, padding, dilation, groups=P).view(P, -1, Ho, Wo)
            y, h = y.contiguous(memory_format=_ops.conv_memory_format(x)), None
        else:
            y, h = _ops.lora_conv2d(x, weight, stack_A(lora_A), bias, stack_B(lora_B), pref, stride, padding,
                                    dilation, scale, backend, *(drop or ()))
        ctx.save_for_backward(x, weight, lora_A, lora_B, pref, h)
        ctx.conf = (stride, padding, dilation, scale, bias is not None, ws, backend, drop)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, pref, h = ctx.saved_tensors
        stride, padding, dilation, scale, has_bias, ws, backend, drop = ctx.conf
        needs = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():      # create_graph: a differentiable backward (module docstring)
            dx, dW, dA, dB, dp = composite_grads(
                lambda *t: conv_composite(*t, stride, padding, dilation, scale, drop),
                (x, weight, lora_A, lora_B, pref), needs[:2] + needs[3:], dy)
            db = dy.sum((0, 2, 3)) if needs[2] and has_bias else None
            return dx, dW, db, dA, dB, dp, None, None, None, None, None, None
        if ws:
            return _weight_space_backward(dy, x, weight, lora_A, lora_B, pref, stride, padding, dilation,
                                          scale, has_bias, needs)
        need_x, need_w, need_b, need_A, need_B, need_p = needs
        T, rank = lora_A.shape[:2]
        N, R, Ho, Wo = h.shape
        C_out = weight.shape[0]
        B_cat = stack_B(lora_B)                                           # (C_out, R)
        acc = acc_dtype(h.dtype)
        per_batch = pref.shape[0] == 1
        S = row_scale(pref.to(acc), rank, scale)[:, :, None]              # (P, R, 1), fp32 for fp16/bf16
        dy3, h3 = _cm(dy), _cm(h)                                         # (N, C_out, HW), (N, R, HW)
        fmt = _ops.conv_memory_format(dy)
        dx = dW = db = dA = dB = dp = None
        # a backend with a data-gradient kernel (cuda, cuda_sim) computes dX and dG in two launches
        kernel_dx = need_x and drop is None and "lora_conv2d_dgrad" in dispatch.record(backend).kernels
        if kernel_dx:
            dx, dg4 = _ops.lora_conv2d_dgrad(dy, weight, stack_A(lora_A), B_cat, pref, [x.shape[2], x.shape[3]],
                                             stride, padding, dilation, scale, backend)
            dg = _cm(dg4)                                                 # (N, R, HW)
        else:
            dg = torch.matmul(B_cat.t(), dy3)                             # (N, R, HW)
            dg4 = dg.view(N, R, Ho, Wo)
        # and a backend with a weight-gradient kernel computes dW and dA in one pass over im2col(x)
        # (only where dX needs no convolution_backward, which would compute dW on the way)
        kernel_dw = (drop is None and (need_w or need_A) and (kernel_dx or not need_x)
                     and "lora_conv2d_wgrad" in dispatch.record(backend).kernels)
        if drop is not None:
            dx, dW, db, dA = _dropout_conv_backward(dy, (dg * S).to(dg.dtype), x, weight, lora_A, stride, padding,
                                                    dilation, drop, has_bias, needs)
        elif kernel_dw:
            dw_, da_ = _ops.lora_conv2d_wgrad(x, dy, dg4, pref, list(weight.shape[2:]), stride,
                                              padding, dilation, scale, need_w, backend)
            dW, dA = (dw_ if need_w else None), (da_.view(lora_A.shape) if need_A else None)
            db = dy.sum((0, 2, 3)) if need_b and has_bias else None
        elif (need_x and not kernel_dx) or need_w or need_A or (need_b and has_bias):
            # per-batch S: dz carries dG unscaled and S moves onto A_cat (for dX) and onto dA after the
            # sum over rows, in fp32: rounding dG * S before that sum gave ~2x the same-dtype loop's error
            A_cat = stack_A(lora_A)
            if per_batch:
                wcat = torch.cat([weight, (A_cat * S[0, :, :, None, None]).to(A_cat.dtype)])
                dh = dg
            else:
                wcat = torch.cat([weight, A_cat])
                dh = (dg * S).to(dg.dtype)
            dz = torch.cat([dy, dh.reshape(N, R, Ho, Wo).contiguous(memory_format=fmt)], dim=1)
            dx_conv, dwcat, dbcat = torch.ops.aten.convolution_backward(
                dz, x, wcat, [C_out + R] if has_bias else None, stride, padding, dilation,
                False, [0, 0], 1, [need_x and not kernel_dx, need_w or need_A, need_b and has_bias])
            del dz
            if not kernel_dx:
                dx = dx_conv
            if dwcat is not None:
                dW = dwcat[:C_out] if need_w else None
                if need_A:
                    dA = dwcat[C_out:]
                    dA = (dA * S[0, :, :, None, None]).to(dA.dtype) if per_batch else dA
                    dA = dA.reshape(lora_A.shape)
            if dbcat is not None:
                db = dbcat[:C_out]
        if acc != h.dtype and (need_B or need_p):
            # fp16/bf16: H again in fp32 (an R-channel conv, only for the gradients that read it): dB and dp
            # sum Ho*Wo products of H, and the rounded H gave up to 2.4x (dB, fp16) and 4x (dp, bf16) the
            # same-dtype loop's error
            xa = x if drop is None else dropout_input(x, *drop)          # H was formed from the dropped x
            h3 = _cm(F.conv2d(xa.to(acc), stack_A(lora_A).to(acc), None, stride, padding, dilation))
            del xa
        if need_B:
            # dB_cat = sum_n dY_n (H_n S_n)^T, summed over all images and pixels in fp32 and rounded once
            # (per-image products rounded and then summed gave up to 2.7x the same-dtype loop's error in
            # fp16); fp16/bf16 go through fp32 copies of a few images at a time, ~16 MiB
            hs = h3 * S                                                   # (N, R, HW), fp32 for fp16/bf16
            step = max(1, (1 << 22) // max(1, C_out * Ho * Wo))
            dBc = sum((torch.matmul(dy3[i:i + step].to(acc), hs[i:i + step].transpose(1, 2)).sum(0)
                      for i in range(0, N, step)), dy.new_zeros(C_out, R, dtype=acc))
            dB = unstack_B(dBc.to(dy.dtype), T)
        if need_p:
            if acc != h.dtype:
                # fp16/bf16: dG again in fp32 too (H is, above): dp sums Ho*Wo*r products with cancellation
                dg = torch.matmul(B_cat.to(acc).t(), dy3.to(acc))
            elif N > 0 and "lora_conv2d_pref_grad" in dispatch.record(backend).kernels:
                # fp32: one pass over the 4-D H and dG (either memory format), fp32 sums, no atomics
                dp = dispatch.kernel(backend, "lora_conv2d_pref_grad")(h, dg4, pref, rank, scale)
            if dp is None:
                dp = (h3 * dg).sum(-1).view(N, T, rank).sum(-1) * scale
                dp = (dp.sum(0, keepdim=True) if per_batch else dp).to(pref.dtype)
        return dx, dW, db, dA, dB, dp, None, None, None, None, None, None


def _dropout_conv_backward(dy, dh, x, weight, lora_A, stride, padding, dilation, drop, has_bias, needs):
    """(dX, dW, db, dA) under LoRA dropout: the base's convolution_backward on x, the adapter's on the
    regenerated x~, and the adapter's data gradient masked as x~ was. dh: (N, R, HW) = dG * S."""
    need_x, need_w, need_b, need_A, _, _ = needs
    C_out = weight.shape[0]
    dx, dW, db = torch.ops.aten.convolution_backward(
        dy, x, weight, [C_out] if has_bias else None, stride, padding, dilation, False, [0, 0], 1,
        [need_x, need_w, need_b and has_bias])
    dA = None
    if need_x or need_A:
        A_cat = stack_A(lora_A)
        dh = dh.reshape(dy.shape[0], A_cat.shape[0], *dy.shape[2:]).contiguous(
            memory_format=_ops.conv_memory_format(dy))
        x_lora = dropout_input(x, *drop)                                  # regenerated, freed on return
        dx_lora, dA, _ = torch.ops.aten.convolution_backward(
            dh, x_lora, A_cat, None, stride, padding, dilation, False, [0, 0], 1, [need_x, need_A, False])
        del x_lora
        if need_x:
            dx = dx + dropout_input(dx_lora, *drop)
        dA = None if dA is None else dA.view(lora_A.shape)
    return dx, (dW if need_w else None), (db if has_bias else None), dA


def _weight_space_backward(dy, x, weight, lora_A, lora_B, pref, stride, padding, dilation, scale,
                           has_bias, needs):
    """The plain conv's backward with the effective weights (grouped per image for a per-sample
    preference), then weight-sized adapter gradients."""
    need_x, need_w, need_b, need_A, need_B, need_p = needs
    T, rank = lora_A.shape[:2]
    P, C_out = pref.shape[0], weight.shape[0]
    w_eff = _effective_weights(weight, lora_A, lora_B, pref, scale)     # recomputed: P*C_out*K*R flops
    need_dw = need_w or need_A or need_B or need_p
    if P == 1:
        dx, dW, db = torch.ops.aten.convolution_backward(
            dy, x, w_eff, [C_out] if has_bias else None, stride, padding, dilation,
            False, [0, 0], 1, [need_x, need_dw, need_b and has_bias])
    else:
        dx, dW, _ = torch.ops.aten.convolution_backward(
            _grouped(dy), _grouped(x), w_eff, None, stride, padding, dilation, False, [0, 0], P,
            [need_x, need_dw, False])
        dx = None if dx is None else dx.view(x.shape)
        db = dy.sum((0, 2, 3)) if need_b and has_bias else None
    dA = dB = dp = None
    if need_dw:
        dWn = dW.reshape(P, C_out, -1)                                   # (P, C_out, K)
        dA, dB, dp = weight_space_grads(dWn, stack_A(lora_A).flatten(1), stack_B(lora_B), pref, rank, scale,
                                        need_A, need_B, need_p)
        dA = None if dA is None else dA.view(lora_A.shape)
        dB = None if dB is None else unstack_B(dB, T)
        dW = dWn.sum(0).view_as(weight) if need_w else None
    return (dx, dW, db if has_bias else None, dA, dB, dp, None, None, None, None, None, None)
