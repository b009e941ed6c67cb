"""PaLoRA linear: the autograd Function on the stacked form.

Forward (x: (N, in)):
    z = lora_mm(x, W^T, b, A_cat^T, B_cat^T)    y = z[:, :out],  H = z[:, out:]
Backward (dY: (N, out)), the chain rule written once:
    dz = lora_mm(dY, W, -, B_cat, A_cat)        dX = z'[:, :in]  (= dY W + dH A_cat),  dG = z'[:, in:]
    dH = dG * S      G = H * S
    dW = dY^T x      db = sum_n dY      dA_cat = dH^T x      dB_cat = dY^T G
    dp[p, t] = s * sum_{n in p} sum_j H[n, t*r+j] dG[n, t*r+j]
Saved for backward: x, the parameters, and H (N, R) -- never an (N, out) tensor.
"""
from __future__ import annotations

import torch

from .. import _ops
from .._math import apply_row_scale, pref_grad, stack_A, stack_B, unstack_B


class PaLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, pref, rows_per_sample, scale, backend):
        A_cat, B_cat = stack_A(lora_A), stack_B(lora_B)
        out = weight.shape[0]
        z = _ops.lora_mm(x, weight.t(), bias, A_cat.t(), B_cat.t(), pref, rows_per_sample, scale, backend)
        h = z[:, out:].contiguous()                           # (N, R): keeps z itself out of the graph
        ctx.save_for_backward(x, weight, lora_A, lora_B, pref, h)
        ctx.conf = (rows_per_sample, scale, backend, bias is not None)
        return z[:, :out]

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, pref, h = ctx.saved_tensors
        rows_per_sample, scale, backend, has_bias = ctx.conf
        need_x, need_w, need_b, need_A, need_B, need_p = ctx.needs_input_grad[:6]
        T, rank, in_f = lora_A.shape
        A_cat, B_cat = stack_A(lora_A), stack_B(lora_B)
        dx = dW = db = dA = dB = dp = None
        if need_x:
            dz = _ops.lora_mm(dy, weight, None, B_cat, A_cat, pref, rows_per_sample, scale, backend)
            dx, dg = dz[:, :in_f], dz[:, in_f:]
        else:
            dg = dy @ B_cat
        if need_w:
            dW = dy.t() @ x
        if need_b and has_bias:
            db = dy.sum(0)
        if need_A:
            dH = apply_row_scale(dg, pref, rows_per_sample, rank, scale)
            dA = (dH.t() @ x).view(T, rank, in_f)
        if need_B:
            G = apply_row_scale(h, pref, rows_per_sample, rank, scale)
            dB = unstack_B(dy.t() @ G, T)
        if need_p:
            dp = pref_grad(h, dg, pref, rows_per_sample, rank, scale)
        return dx, dW, db, dA, dB, dp, None, None, None
