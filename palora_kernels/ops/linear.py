"""PaLoRA linear: the autograd Function on the stacked form.

Forward (x: (N, in)):
    y, H = lora_mm(x, W^T, b, A_cat^T, B_cat^T)
Backward (dY: (N, out)), the chain rule written once:
    dX, dG = lora_mm(dY, W, -, B_cat, A_cat)       dX = dY W + dH A_cat,  dG = dY B_cat
    dH = dG * S      G = H * S
    dW = dY^T x      db = sum_n dY      dA_cat = dH^T x      dB_cat = dY^T G
    dp[p, t] = s * sum_{n in p} sum_j H[n, t*r+j] dG[n, t*r+j]
Saved for backward: x, the parameters, and H (N, R) -- never an (N, out) tensor.

A backend whose record has lora_mm_dgrad (cpp) returns dX, dG, dB_cat and db from it in one call, so it can
read dY once for the three skinny products (cpp: palora::lowrank_dual); not under dropout.

dW and dA_cat in one pass over x (backends whose record sets ``linear_wgrad``: cuda, cuda_sim): a linear
layer is a 1x1 convolution, so [dW; dA_cat] = [dY | dG S]^T x is the conv's lora_conv2d_wgrad on x viewed
as (images, in, rows, 1) channels_last (no copy), one image per preference row; S is applied in registers
and both sums run in fp32 with one rounding. Not under dropout (dA then reads the dropped x, dW the plain
one) and not past the kernel's 32-bit sizes: the two GEMMs below then. db and dB_cat stay torch ops.

Per-batch preference with N >= 2*in*out/(in+out) (fp32/fp64): the layer is x W_eff^T + b with
W_eff = W + B_cat diag(S) A_cat. Forming W_eff costs 2*in*out*R flops, less than the shrink and
expand's 2*N*R*(in+out) there, so the forward is the plain GEMM with W_eff and the backward the
plain layer's -- dX = dY W_eff, dW = dY^T x -- plus weight-sized products for dA, dB, dp
(_math.weight_space_grads). H is neither computed nor saved. In fp16/bf16 the rounded W_eff and
dW would feed the result and the adapter gradients, so those dtypes take the kernel path.

LoRA dropout (docs/dropout.md), drop = (p, seed, offset): the shrink reads x~ = x * mask / (1-p),
the mask regenerated from (seed, offset) wherever it is needed, never saved:
    y, H = lora_mm(x, ...; mask on x)          H = x~ A_cat^T
    dX, dG = lora_mm(dY, W, -, B_cat, A_cat; mask on the low-rank term)   dX = dY W + mask * (dH A_cat) / (1-p)
    dA_cat = dH^T x~   (lora_dropout_dA: the mask regenerated)   dW = dY^T x,  dB, dp as above (H is x~'s)
The weight-space path cannot express a mask on x alone and is off under dropout.

Double backward: the fast backward above treats the saved H as a constant and uses hand-written
kernels, so it is not itself differentiable. When the backward runs with grad mode on
(``create_graph=True``, e.g. a gradient penalty), it instead differentiates the stacked form written
in torch ops (_math.linear_composite) with ``create_graph``: a backward that autograd records, so
second (and higher) derivatives are exact on every backend and every path (per-batch or per-sample,
kernel or weight space). Without grad mode the fast path runs, as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ops, dispatch
from .._math import (acc_dtype, apply_row_scale, composite_grads, linear_composite, merged_delta, row_scale,
                     stack_A, stack_B, unstack_B, use_weight_space, weight_space_grads)
from .._rng import dropout_input


def one_pass_wgrad(backend: str, drop, N: int, in_f: int, out_f: int, R: int) -> bool:
    """Whether the backward takes dW and dA_cat from the backend's lora_conv2d_wgrad (module docstring).
    The sizes: the kernel's pixels (N) and spatial extent (rows per sample) stay below 2^30 and its output
    (out + R) * in below 2^31 (check_lora_conv2d_wgrad in csrc/cuda/conv_wgrad.cuh refuses more)."""
    rec = dispatch.record(backend)
    return (drop is None and rec.linear_wgrad and "lora_conv2d_wgrad" in rec.kernels
            and N < 2**30 and (out_f + R) * in_f < 2**31)


def _conv_rows(t: torch.Tensor, images: int, rows: int) -> torch.Tensor:
    """(N, C) -> the (images, C, rows, 1) channels_last view a 1x1 convolution sees, N = images * rows, no
    copy. Both pixel strides are t.stride(0): W = 1, so the w stride is never stepped, and a 16-byte aligned
    one keeps the kernel's cp.async path for dY (it checks every pixel stride)."""
    s0, s1 = t.stride()
    return t.as_strided((images, t.shape[1], rows, 1), (rows * s0, s1, s0, s0))


def _wgrad_1x1(x, dy, dg, pref, rows_per_sample, scale, need_w, backend):
    """(dW (out, in) or None, dA_cat (R, in)) from one pass over x. Per-sample: one image of rows_per_sample
    pixels per preference row; per-batch: one image per row (the kernel's images are unbounded, its
    spatial extent is not)."""
    images, rows = (x.shape[0], 1) if pref.shape[0] == 1 else (pref.shape[0], rows_per_sample)
    dw, da = _ops.lora_conv2d_wgrad(*(_conv_rows(t, images, rows) for t in (x, dy, dg)), pref, [1, 1], [1, 1],
                                    [0, 0], [1, 1], scale, need_w, backend)
    return (dw.view(dw.shape[0], -1) if need_w else None), da.view(da.shape[0], -1)


class PaLoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, pref, rows_per_sample, scale, backend, drop=None):
        A_cat, B_cat = stack_A(lora_A), stack_B(lora_B)
        out, rank = weight.shape[0], lora_A.shape[1]
        ws = drop is None and pref.shape[0] == 1 and use_weight_space(x.shape[0], x.shape[1], out, x.dtype)
        if ws:
            y, h = F.linear(x, weight + merged_delta(A_cat, B_cat, pref, rank, scale), bias), None
        else:
            y, h = _ops.lora_mm(x, weight.t(), bias, A_cat.t(), B_cat.t(), pref, rows_per_sample, scale, backend,
                                *(drop or ()))
        ctx.save_for_backward(x, weight, lora_A, lora_B, pref, h)
        ctx.conf = (rows_per_sample, scale, backend, bias is not None, ws, drop)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, pref, h = ctx.saved_tensors
        rows_per_sample, scale, backend, has_bias, ws, drop = ctx.conf
        need_x, need_w, need_b, need_A, need_B, need_p = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled():      # create_graph: a differentiable backward (module docstring)
            dx, dW, dA, dB, dp = composite_grads(
                lambda *t: linear_composite(*t, rows_per_sample, scale, drop), (x, weight, lora_A, lora_B, pref),
                (need_x, need_w, need_A, need_B, need_p), dy)
            db = dy.sum(0) if need_b and has_bias else None
            return dx, dW, db, dA, dB, dp, None, None, None, None
        T, rank, in_f = lora_A.shape
        A_cat, B_cat = stack_A(lora_A), stack_B(lora_B)
        dx = dW = db = dA = dB = dp = None
        # the backend's pass over dY: dX, dG, dB_cat^T and db together (cpp: one read of dY for the last three)
        dgrad = not ws and drop is None and "lora_mm_dgrad" in dispatch.record(backend).kernels
        if need_b and has_bias and not dgrad:
            db = dy.sum(0)
        if ws:
            if need_x:   # W_eff is freed before dW is allocated: the plain layer's peak
                S = row_scale(pref.to(weight.dtype), rank, scale)[0]
                dx = dy @ torch.addmm(weight, B_cat * S, A_cat)
            if need_w or need_A or need_B or need_p:
                dW = dy.t() @ x
            if need_A or need_B or need_p:
                dA, dB, dp = weight_space_grads(dW, A_cat, B_cat, pref, rank, scale, need_A, need_B, need_p)
            dA = None if dA is None else dA.view(T, rank, in_f)
            dB = None if dB is None else unstack_B(dB, T)
            return dx, (dW if need_w else None), db, dA, dB, dp, None, None, None, None
        # (U * S)^T V for dA_cat and dB_cat: the layer's backend's, else the automatic choice (cpp's C++ kernel on CPU)
        tmm = dispatch.kernel(dispatch.select_backend(x.device, "lora_tmm", x.dtype, backend, fallback=True), "lora_tmm")
        if dgrad:
            dx, dg, dbt, db = dispatch.kernel(backend, "lora_mm_dgrad")(
                dy, weight, B_cat, A_cat, h, pref, rows_per_sample, scale, need_x, need_B, need_b and has_bias)
            dB = None if dbt is None else unstack_B(dbt.t(), T)
        elif need_x:
            dx, dg = _ops.lora_mm(dy, weight, None, B_cat, A_cat, pref, rows_per_sample, scale, backend,
                                  *((*drop, True) if drop else ()))
        else:
            dg = dy @ B_cat
        if (need_w or need_A) and one_pass_wgrad(backend, drop, x.shape[0], in_f, weight.shape[0], T * rank):
            dW, dA = _wgrad_1x1(x, dy, dg, pref, rows_per_sample, scale, need_w, backend)
            dW, dA = (dW if need_w else None), (dA.view(T, rank, in_f) if need_A else None)
        else:
            if need_w:
                dW = dy.t() @ x
            if need_A:
                if drop is None:
                    dA = tmm(dg, x, pref, rows_per_sample, rank, scale).view(T, rank, in_f)
                else:   # the mask regenerated: in-kernel (triton) or as an (N, in) temporary (torch)
                    dh = apply_row_scale(dg, pref, rows_per_sample, rank, scale)
                    name = dispatch.select_backend(x.device, "lora_dropout_dA", x.dtype, backend, fallback=True)
                    dA = dispatch.kernel(name, "lora_dropout_dA")(dh, x, *drop).view(T, rank, in_f)
        if need_B and dB is None:
            dB = unstack_B(tmm(h, dy, pref, rows_per_sample, rank, scale).t(), T)
        if need_p:
            acc = acc_dtype(x.dtype)
            if acc != x.dtype:
                # fp16/bf16: H and dG again in fp32 (2*N*R*(in+out) flops, only when the preference needs a
                # gradient): dp sums N*r products with cancellation, and the rounded H and dG gave up to
                # 6x the same-dtype loop's error in bf16
                xa = x if drop is None else dropout_input(x, *drop)          # H was formed from the dropped x
                h, dg = xa.to(acc) @ A_cat.to(acc).t(), dy.to(acc) @ B_cat.to(acc)
            name = dispatch.select_backend(h.device, "pref_grad", h.dtype, fallback=True)
            dp = dispatch.kernel(name, "pref_grad")(h, dg, pref, rows_per_sample, rank, scale)
        return dx, dW, db, dA, dB, dp, None, None, None, None
