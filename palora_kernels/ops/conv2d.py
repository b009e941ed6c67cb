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
"""
from __future__ import annotations

import torch

from .. import _ops
from .._math import row_scale, stack_A, stack_B, unstack_B


class PaLoRAConv2dFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, pref, stride, padding, dilation, scale, backend):
        C_out = weight.shape[0]
        wcat = torch.cat([weight, stack_A(lora_A)])
        z = _ops.lora_conv2d(x, wcat, bias, stack_B(lora_B), pref, stride, padding, dilation,
                             scale, backend)
        h = z[:, C_out:].contiguous()                         # (N, R, Ho, Wo)
        ctx.save_for_backward(x, weight, lora_A, lora_B, pref, h)
        ctx.conf = (stride, padding, dilation, scale, bias is not None)
        return z[:, :C_out]

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, pref, h = ctx.saved_tensors
        stride, padding, dilation, scale, has_bias = ctx.conf
        need_x, need_w, need_b, need_A, need_B, need_p = ctx.needs_input_grad[:6]
        T, rank = lora_A.shape[:2]
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
            need_dx_stacked = need_x
            if need_x and pref.shape[0] == 1:
                # one preference for the batch: dX = convT(dY, W) + convT(dH, A) = convT(dY, W_eff)
                # with W_eff = W + B S A, so the input gradient runs on C_out channels, not C_out + R:
                # dgrad 64ch + wgrad 76ch = 29.0 ms vs 32.0 ms for both on 76ch (medians of 9,
                # x=(8,64,64,64), 3x3, R=12, CPU, 2 threads)
                w_eff = torch.addmm(weight.flatten(1), B_cat * S[0, :, 0], wcat[C_out:].flatten(1))
                dx = torch.ops.aten.convolution_backward(
                    dy, x, w_eff.view_as(weight), None, stride, padding, dilation,
                    False, [0, 0], 1, [True, False, False])[0]
                need_dx_stacked = False
            dx_s, dwcat, dbcat = torch.ops.aten.convolution_backward(
                dz, x, wcat, [C_out + R] if has_bias else None, stride, padding, dilation,
                False, [0, 0], 1, [need_dx_stacked, need_w or need_A, need_b and has_bias])
            if need_dx_stacked:
                dx = dx_s
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
