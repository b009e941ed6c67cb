"""PaLoRA conv2d (factorized adapters): the autograd Function on the stacked form.

Implicit-GEMM view: base and shrink are ONE convolution with out-channel-concatenated
weights wcat = [W; A_cat] (C_out + R channels); the expand is a 1x1 conv with
B_cat diag(S_n), accumulated into the base channels in place.

Forward:  z = lora_conv2d(x, wcat, b, B_cat)      y = z[:, :C_out],  H = z[:, C_out:]
Backward, the chain rule written once (per image n, HW flattened):
    dG_n = B_cat^T dY_n      dH_n = dG_n * S_n      dZ = [dY | dH]
    (dX, [dW; dA_cat], [db; -]) = convolution_backward(dZ, x, wcat)    one pass over x and dZ
    dB_cat = sum_n dY_n (H_n * S_n)^T
    dp[n, t] = s * sum_{j, hw} H[n, t*r+j] dG[n, t*r+j]   (summed over n for a per-batch p)

Per-batch preference with N*Ho*Wo >= 2*K*C_out/(K+C_out), K = C_in*kh*kw (fp32/fp64): the layer is
conv(x, W_eff) + b with W_eff = W + B_cat diag(S) A_cat, so ONE convolution_backward on C_out
channels gives dX (with W_eff) and dW = dW_eff; dA, dB, dp are weight-sized products
(_math.weight_space_grads). H is not saved and no (N, C_out+R, Ho, Wo) dZ is built.
"""
from __future__ import annotations

import torch

from .. import _ops
from .._math import row_scale, stack_A, stack_B, unstack_B, use_weight_space, weight_space_grads


class PaLoRAConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, pref, stride, padding, dilation, scale, backend):
        C_out = weight.shape[0]
        wcat = torch.cat([weight, stack_A(lora_A)])
        z = _ops.lora_conv2d(x, wcat, bias, stack_B(lora_B), pref, stride, padding, dilation,
                             scale, backend)
        N, _, Ho, Wo = z.shape
        ws = use_weight_space(N * Ho * Wo, weight[0].numel(), C_out, x.dtype, pref.shape[0] == 1)
        h = None if ws else z[:, C_out:].contiguous()         # (N, R, Ho, Wo)
        ctx.save_for_backward(x, weight, lora_A, lora_B, pref, h)
        ctx.conf = (stride, padding, dilation, scale, bias is not None, ws)
        return z[:, :C_out]

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, pref, h = ctx.saved_tensors
        stride, padding, dilation, scale, has_bias, ws = ctx.conf
        need_x, need_w, need_b, need_A, need_B, need_p = ctx.needs_input_grad[:6]
        T, rank = lora_A.shape[:2]
        if ws:
            return _weight_space_backward(dy, x, weight, lora_A, lora_B, pref, stride, padding, dilation,
                                          scale, has_bias, ctx.needs_input_grad[:6])
        N, R, Ho, Wo = h.shape
        C_out = weight.shape[0]
        B_cat = stack_B(lora_B)                                           # (C_out, R)
        S = row_scale(pref.to(h.dtype), rank, scale)[:, :, None]          # (P, R, 1)
        dy3 = dy.reshape(N, C_out, Ho * Wo)
        h3 = h.view(N, R, Ho * Wo)
        dg = torch.matmul(B_cat.t(), dy3)                                 # (N, R, HW)
        dx = dW = db = dA = dB = dp = None
        if need_x or need_w or need_A or (need_b and has_bias):
            wcat = torch.cat([weight, stack_A(lora_A)])
            dz = torch.cat([dy, (dg * S).view(N, R, Ho, Wo)], dim=1)
            dx, dwcat, dbcat = torch.ops.aten.convolution_backward(
                dz, x, wcat, [C_out + R] if has_bias else None, stride, padding, dilation,
                False, [0, 0], 1, [need_x, need_w or need_A, need_b and has_bias])
            if dwcat is not None:
                dW, dA = dwcat[:C_out], dwcat[C_out:].view(lora_A.shape)
            if dbcat is not None:
                db = dbcat[:C_out]
        if need_B:
            dB = unstack_B(torch.matmul(dy3, (h3 * S).transpose(1, 2)).sum(0), T)
        if need_p:
            dp = ((h3 * dg).sum(-1).view(N, T, rank).sum(-1) * scale)
            dp = dp.sum(0, keepdim=True) if pref.shape[0] == 1 else dp
            dp = dp.to(pref.dtype)
        return dx, dW, db, dA, dB, dp, None, None, None, None, None


def _weight_space_backward(dy, x, weight, lora_A, lora_B, pref, stride, padding, dilation, scale,
                           has_bias, needs):
    """Per-batch p: the plain conv's backward with W_eff, then weight-sized adapter gradients."""
    need_x, need_w, need_b, need_A, need_B, need_p = needs
    T, rank = lora_A.shape[:2]
    C_out = weight.shape[0]
    A_cat, B_cat = stack_A(lora_A).flatten(1), stack_B(lora_B)          # (R, K), (C_out, R)
    S = row_scale(pref.to(weight.dtype), rank, scale)[0]                 # (R,)
    w_eff = torch.addmm(weight.flatten(1), B_cat * S, A_cat).view_as(weight)
    need_dw = need_w or need_A or need_B or need_p
    dx, dW, db = torch.ops.aten.convolution_backward(
        dy, x, w_eff, [C_out] if has_bias else None, stride, padding, dilation,
        False, [0, 0], 1, [need_x, need_dw, need_b and has_bias])
    dA = dB = dp = None
    if need_dw:
        dA, dB, dp = weight_space_grads(dW.flatten(1), A_cat, B_cat, pref, rank, scale,
                                        need_A, need_B, need_p)
        dA = None if dA is None else dA.view(lora_A.shape)
        dB = None if dB is None else unstack_B(dB, T)
    return (dx, dW if need_w else None, db if has_bias else None, dA, dB, dp,
            None, None, None, None, None)
