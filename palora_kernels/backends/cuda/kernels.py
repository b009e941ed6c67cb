"""Kernels of the ``cuda`` backend: the ops palora::lora_mm_cuda / palora::lora_conv2d_cuda of
palora_kernels._C (csrc/cuda/bindings.cpp). They have names of their own because palora::lora_mm
is a Python custom op that dispatches on its ``backend`` argument (docs/cuda.md)."""
from __future__ import annotations

import torch

from ... import _ext  # noqa: F401  (loads palora_kernels._C, which registers the ops)
from ..._ops import (check_lora_conv2d, check_lora_conv2d_dgrad, check_lora_conv2d_wgrad, lora_conv2d_dgrad_layout,
                     lora_conv2d_layout, lora_conv2d_wgrad_layout, lora_mm_layout, mtlora_mm_dgrad_layout,
                     mtlora_mm_layout)

if hasattr(torch.ops.palora, "lora_mm_cuda"):
    @torch.library.register_fake("palora::lora_mm_cuda")
    def _(x, wm, bias, down, up, pref, rows_per_sample, scale):
        return lora_mm_layout(x, wm.shape[1], down.shape[1], "cuda")

    @torch.library.register_fake("palora::lora_conv2d_cuda")
    def _(x, weight, down, bias, up, pref, stride, padding, dilation, scale):
        Ho, Wo = check_lora_conv2d(x, weight, down, bias, up, pref, stride, padding, dilation)
        return lora_conv2d_layout(x, weight.shape[0], down.shape[0], Ho, Wo)

    @torch.library.register_fake("palora::lora_conv2d_dgrad_cuda")
    def _(dy, weight, down, up, pref, x_hw, stride, padding, dilation, scale):
        check_lora_conv2d_dgrad(dy, weight, down, up, pref, x_hw, stride, padding, dilation)
        return lora_conv2d_dgrad_layout(dy, weight.shape[1], down.shape[0], *x_hw)

    @torch.library.register_fake("palora::lora_conv2d_wgrad_cuda")
    def _(x, dy, dg, pref, kernel_hw, stride, padding, dilation, scale, need_weight):
        check_lora_conv2d_wgrad(x, dy, dg, pref, kernel_hw, stride, padding, dilation)
        return lora_conv2d_wgrad_layout(x, dy.shape[1], dg.shape[1], *kernel_hw, need_weight)

    if hasattr(torch.ops.palora, "mtlora_mm_cuda"):     # an extension built before the MTLoRA kernels lacks them
        @torch.library.register_fake("palora::mtlora_mm_cuda")
        def _(x, xs, weight, bias, A, B, ranks, scales, groups, shared_to_tasks, p, seed, offset):
            return mtlora_mm_layout(x, len(ranks) - 1, weight.shape[0], A.shape[0], "cuda")

        @torch.library.register_fake("palora::mtlora_mm_dgrad_cuda")
        def _(dys, dbase, weight, A, B, ranks, col_scales, groups, shared_to_tasks, need_x, n_xs, p, seed, offset):
            dx, dxs, _, dg = mtlora_mm_dgrad_layout(dys[0], weight.shape[1], n_xs, need_x, False, A.shape[0])
            return dx, dxs, dg

    @torch.library.register_fake("palora::pref_grad_cuda")
    def _(h, dg, pref, rows_per_sample, rank, scale):
        return pref.new_empty(pref.shape)


def lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale):
    """(y, H); see palora_kernels._ops."""
    return torch.ops.palora.lora_mm_cuda(x, wm, bias, down, up, pref, rows_per_sample, scale)


def lora_conv2d(x, weight, down, bias, up, pref, stride, padding, dilation, scale):
    """(y, H); see palora_kernels._ops."""
    return torch.ops.palora.lora_conv2d_cuda(x, weight, down, bias, up, pref, list(stride), list(padding),
                                             list(dilation), scale)


def pref_grad(h, dg, pref, rows_per_sample, rank, scale):
    """dp (P, T) in pref's dtype; see palora_kernels._math.pref_grad for the formula."""
    return torch.ops.palora.pref_grad_cuda(h, dg, pref, rows_per_sample, rank, scale)


def lora_conv2d_dgrad(dy, weight, down, up, pref, x_hw, stride, padding, dilation, scale):
    """(dX, dG); see palora_kernels._ops."""
    return torch.ops.palora.lora_conv2d_dgrad_cuda(dy, weight, down, up, pref, list(x_hw), list(stride),
                                                   list(padding), list(dilation), scale)


def lora_conv2d_wgrad(x, dy, dg, pref, kernel_hw, stride, padding, dilation, scale, need_weight):
    """(dW, dA_cat); see palora_kernels._ops."""
    return torch.ops.palora.lora_conv2d_wgrad_cuda(x, dy, dg, pref, list(kernel_hw), list(stride), list(padding),
                                                   list(dilation), scale, need_weight)


def lora_conv2d_pref_grad(h, dg, pref, rank, scale):
    """dp (P, T) of the conv from its 4-D H and dG (N, R, Ho, Wo): the pref_grad kernels with pixels as rows."""
    return torch.ops.palora.pref_grad_cuda(h, dg, pref, h.shape[2] * h.shape[3], rank, scale)
