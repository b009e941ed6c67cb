"""Every ``palora::`` custom op: schema, the contract check, and the fake (meta) implementation.

The ops are opaque to ``torch.compile``; their implementation runs the kernel of the backend named
by the ``backend`` argument (chosen once, in the functional API, by
:func:`palora_kernels.dispatch.select_backend`). The contract is checked here, once, by the
same function in eager mode and under tracing; backends trust it.

lora_mm     (y, H) with  y = x @ wm + bias + ((x @ down) * S) @ up   (N, M), dense
                         H = x @ down                                (N, R), row stride padded
            x (N, K), wm (K, M), bias (M,) or None, down (K, R), up (R, M),
            pref (P, T), S[n, t*r + j] = scale * pref[n // rows_per_sample, t], r = R // T.
            Forward: (wm, down, up) = (W^T, A_cat^T, B_cat^T); dX: (W, B_cat, A_cat) gives
            (dX, dG) with dG = dY B_cat.
            LoRA dropout (drop_p > 0, docs/dropout.md): the shrink reads x * mask / (1 - drop_p), mask
            element i (row-major over x) kept iff philox(drop_seed, drop_offset + i) >= drop_p; H is
            that shrink. drop_on_expand (the dX call): the mask is over y instead and applies to
            the low-rank term only: y = x @ wm + mask * (((x @ down) * S) @ up) / (1 - drop_p).
            Runs the backend's ``lora_mm_dropout`` kernel.
lora_conv2d_dgrad (dX, dG), the conv's data gradient (where a backend has the kernel):
            dG = B_cat^T dY per pixel (N, R, Ho, Wo); dX = conv_transpose([dY | dG S_n], [W; A_cat])
            (N, C_in, H, W); both dense in dy's memory format.
lora_conv2d_wgrad (dW, dA_cat), the conv's weight gradients from one pass over im2col(x) (where a
            backend has the kernel): GEMM columns [dY | dG S_n]; dW (C_out or 0, C_in, kh, kw),
            dA_cat (R, C_in, kh, kw), contiguous.
lora_conv2d (y, H) with  y = conv(x, W) + bias + B_cat diag(S_n) H_n   (N, C_out, Ho, Wo)
                         H = conv(x, A_cat), unscaled                 (N, R, Ho, Wo)
            weight (C_out, C_in, kh, kw), down = A_cat (R, C_in, kh, kw), up = B_cat (C_out, R),
            pref (P, T) with P == 1 or P == N. y and H are dense in x's memory format
            (channels_last when x is), as nn.Conv2d returns them. drop_p > 0: the shrink reads
            x under LoRA dropout (mask over x's logical NCHW elements; ``lora_conv2d_dropout`` kernel).

mtlora_mm   (Y, H), the MTLoRA layer's T + 1 outputs on one base product (docs/mtlora.md):
            Y[o][:, g] = x W_g^T + b_g + sum_{a feeds o} s[g, a] H[:, g, a] B[g, a]^T   (T+1, N, G*Mg)
            H[:, g, a] = x_a A[g, a]^T   (N, G*R), x_a = dropout_g(x), or xs[a-1] for task inputs
            weight (G*Mg, K), A (G*R, K), B (G*Mg, R), ranks (T+1,) summing to R, scales (G, T+1).
mtlora_mm_dgrad (dX, dXs, dBase, dG) of mtlora_mm, from the T+1 output gradients dY_o: dBase = sum_o dY_o, dG[:, g, a] = dYsum_a B[g, a]
            (unscaled), dX = dBase W + sum dropout_g(dH_x A_x), dXs[t] = sum_g dH[:, g, t] A[g, t].

H's row stride (lora_mm, mtlora_mm) is a multiple of the backend record's ``h_row_align`` elements: the
backward reads H again with a GEMM.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch


def _same(name: str, t: Tensor, x: Tensor) -> None:
    torch._check(t.dtype == x.dtype, lambda: f"{name}: expected dtype {x.dtype} (x's), got {t.dtype}")
    torch._check(t.device == x.device, lambda: f"{name}: expected device {x.device} (x's), got {t.device}")


def _check_pref(pref: Tensor, x: Tensor, R: int, what: str) -> None:
    torch._check(pref.dim() == 2 and pref.shape[1] >= 1,
                 lambda: f"pref: expected (P, T) with T >= 1, got shape {tuple(pref.shape)}")
    torch._check(pref.is_floating_point(), lambda: f"pref: expected a floating dtype, got {pref.dtype}")
    torch._check(pref.device == x.device, lambda: f"pref: expected device {x.device} (x's), got {pref.device}")
    T = pref.shape[1]
    torch._check(R % T == 0, lambda: f"{what}: expected R = T * rank with T = {T} (pref.shape[1]), got R = {R}")


def check_lora_mm(x, wm, bias, down, up, pref, rows_per_sample) -> None:
    torch._check(x.dim() == 2, lambda: f"x: expected (N, K), got shape {tuple(x.shape)}")
    N, K = x.shape
    torch._check(wm.dim() == 2 and wm.shape[0] == K, lambda: f"wm: expected ({K}, M), got {tuple(wm.shape)}")
    M = wm.shape[1]
    torch._check(down.dim() == 2 and down.shape[0] == K, lambda: f"down: expected ({K}, R), got {tuple(down.shape)}")
    R = down.shape[1]
    torch._check(tuple(up.shape) == (R, M), lambda: f"up: expected ({R}, {M}), got {tuple(up.shape)}")
    for name, t in (("wm", wm), ("down", down), ("up", up)) + ((("bias", bias),) if bias is not None else ()):
        _same(name, t, x)
    if bias is not None:
        torch._check(tuple(bias.shape) == (M,), lambda: f"bias: expected ({M},), got {tuple(bias.shape)}")
    _check_pref(pref, x, R, "down")
    P = pref.shape[0]
    torch._check(rows_per_sample >= 1 or N == 0,
                 lambda: f"rows_per_sample: expected >= 1, got {rows_per_sample}")
    torch._check(P == 1 or P * rows_per_sample == N,
                 lambda: f"pref: expected 1 row or pref.shape[0] * rows_per_sample == N = {N}, "
                         f"got {P} * {rows_per_sample}")


def lora_mm_layout(x: Tensor, M: int, R: int, backend: str) -> Tuple[Tensor, Tensor]:
    """Empty (y, H) in the layout of the contract: y dense, H with the backend's padded row stride."""
    N = x.shape[0]
    y = x.new_empty((N, M))
    h = x.new_empty_strided((N, R), (dispatch.record(backend).h_row_stride(R), 1))
    return y, h


def check_dropout(drop_p: float, drop_seed: int, drop_offset: int) -> None:
    torch._check(0.0 <= drop_p < 1.0, lambda: f"drop_p: expected a probability in [0, 1), got {drop_p}")
    torch._check(drop_seed >= 0 and drop_offset >= 0,
                 lambda: f"drop_seed, drop_offset: expected >= 0, got {drop_seed}, {drop_offset}")


@torch.library.custom_op("palora::lora_mm", mutates_args=())
def lora_mm(x: Tensor, wm: Tensor, bias: Optional[Tensor], down: Tensor, up: Tensor,
            pref: Tensor, rows_per_sample: int, scale: float, backend: str, drop_p: float = 0.0,
            drop_seed: int = 0, drop_offset: int = 0, drop_on_expand: bool = False) -> Tuple[Tensor, Tensor]:
    check_lora_mm(x, wm, bias, down, up, pref, rows_per_sample)
    check_dropout(drop_p, drop_seed, drop_offset)
    if drop_p > 0.0:
        y, h = dispatch.kernel(backend, "lora_mm_dropout")(x, wm, bias, down, up, pref, rows_per_sample, scale,
                                                           drop_p, drop_seed, drop_offset, drop_on_expand)
    else:
        y, h = dispatch.kernel(backend, "lora_mm")(x, wm, bias, down, up, pref, rows_per_sample, scale)
    _check_layout("lora_mm", backend, (y, h), lora_mm_layout(x.to("meta"), wm.shape[1], down.shape[1], backend))
    return y, h


@lora_mm.register_fake
def _(x, wm, bias, down, up, pref, rows_per_sample, scale, backend, drop_p=0.0, drop_seed=0, drop_offset=0,
      drop_on_expand=False):
    check_lora_mm(x, wm, bias, down, up, pref, rows_per_sample)
    check_dropout(drop_p, drop_seed, drop_offset)
    return lora_mm_layout(x, wm.shape[1], down.shape[1], backend)


def conv_out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


def conv_memory_format(x: Tensor) -> torch.memory_format:
    """channels_last when x is (and is not also plain contiguous, as for C == 1 or H == W == 1)."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def _check_conv_adapters(weight, down, up, C_in: int, C_out: int, anchor: Tensor) -> int:
    """weight (C_out, C_in, kh, kw), down (R, C_in, kh, kw), up (C_out, R) on anchor's dtype and device; returns R."""
    torch._check(weight.dim() == 4 and weight.shape[0] == C_out and weight.shape[1] == C_in,
                 lambda: f"weight: expected ({C_out}, {C_in}, kh, kw), got {tuple(weight.shape)}")
    kh, kw = weight.shape[2:]
    torch._check(down.dim() == 4 and tuple(down.shape[1:]) == (C_in, kh, kw),
                 lambda: f"down: expected (R, {C_in}, {kh}, {kw}), got {tuple(down.shape)}")
    R = down.shape[0]
    torch._check(tuple(up.shape) == (C_out, R), lambda: f"up: expected ({C_out}, {R}), got {tuple(up.shape)}")
    for name, t in (("weight", weight), ("down", down), ("up", up)):
        _same(name, t, anchor)
    return R


def _check_conv_geometry(pref: Tensor, anchor: Tensor, R: int, N: int, stride, padding, dilation) -> None:
    _check_pref(pref, anchor, R, "down")
    torch._check(pref.shape[0] in (1, N), lambda: f"pref: expected 1 or N = {N} rows, got {pref.shape[0]}")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        torch._check(len(v) == 2 and min(v) >= lo, lambda: f"{name}: expected 2 values >= {lo}, got {list(v)}")


def check_lora_conv2d(x, weight, down, bias, up, pref, stride, padding, dilation) -> Tuple[int, int]:
    """Checks the contract; returns (Ho, Wo)."""
    torch._check(x.dim() == 4, lambda: f"x: expected (N, C_in, H, W), got shape {tuple(x.shape)}")
    N, C_in, H, W = x.shape
    torch._check(weight.dim() == 4, lambda: f"weight: expected (C_out, {C_in}, kh, kw), got {tuple(weight.shape)}")
    C_out, _, kh, kw = weight.shape
    R = _check_conv_adapters(weight, down, up, C_in, C_out, x)
    if bias is not None:
        _same("bias", bias, x)
        torch._check(tuple(bias.shape) == (C_out,), lambda: f"bias: expected ({C_out},), got {tuple(bias.shape)}")
    _check_conv_geometry(pref, x, R, N, stride, padding, dilation)
    Ho = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    torch._check(Ho >= 1 and Wo >= 1,
                 lambda: f"x: input {H}x{W} (padding {list(padding)}) is smaller than the dilated kernel "
                         f"{(kh - 1) * dilation[0] + 1}x{(kw - 1) * dilation[1] + 1}")
    return Ho, Wo


def lora_conv2d_layout(x: Tensor, C_out: int, R: int, Ho: int, Wo: int) -> Tuple[Tensor, Tensor]:
    fmt = conv_memory_format(x)
    N = x.shape[0]
    kw = dict(dtype=x.dtype, device=x.device, memory_format=fmt)
    return torch.empty((N, C_out, Ho, Wo), **kw), torch.empty((N, R, Ho, Wo), **kw)


@torch.library.custom_op("palora::lora_conv2d", mutates_args=())
def lora_conv2d(x: Tensor, weight: Tensor, down: Tensor, bias: Optional[Tensor], up: Tensor, pref: Tensor,
                stride: List[int], padding: List[int], dilation: List[int], scale: float,
                backend: str, drop_p: float = 0.0, drop_seed: int = 0, drop_offset: int = 0) -> Tuple[Tensor, Tensor]:
    Ho, Wo = check_lora_conv2d(x, weight, down, bias, up, pref, stride, padding, dilation)
    check_dropout(drop_p, drop_seed, drop_offset)
    if drop_p > 0.0:
        y, h = dispatch.kernel(backend, "lora_conv2d_dropout")(x, weight, down, bias, up, pref, stride, padding,
                                                               dilation, scale, drop_p, drop_seed, drop_offset)
    else:
        y, h = dispatch.kernel(backend, "lora_conv2d")(x, weight, down, bias, up, pref, stride, padding,
                                                       dilation, scale)
    _check_layout("lora_conv2d", backend, (y, h),
                  lora_conv2d_layout(x.to("meta"), weight.shape[0], down.shape[0], Ho, Wo))
    return y, h


@lora_conv2d.register_fake
def _(x, weight, down, bias, up, pref, stride, padding, dilation, scale, backend, drop_p=0.0, drop_seed=0,
      drop_offset=0):
    Ho, Wo = check_lora_conv2d(x, weight, down, bias, up, pref, stride, padding, dilation)
    check_dropout(drop_p, drop_seed, drop_offset)
    return lora_conv2d_layout(x, weight.shape[0], down.shape[0], Ho, Wo)


def _check_grid(what: str, Ho: int, Wo: int, x_hw, kh: int, kw: int, stride, padding, dilation) -> None:
    """An output grid Ho x Wo is the one a conv of x_hw with this geometry produces."""
    eh = conv_out_size(x_hw[0], kh, stride[0], padding[0], dilation[0])
    ew = conv_out_size(x_hw[1], kw, stride[1], padding[1], dilation[1])
    torch._check(Ho == eh and Wo == ew,
                 lambda: f"{what}: expected an output grid of {eh}x{ew} for x of {x_hw[0]}x{x_hw[1]}, got {Ho}x{Wo}")


def check_lora_conv2d_dgrad(dy, weight, down, up, pref, x_hw, stride, padding, dilation) -> None:
    """The contract of lora_conv2d_dgrad: dy is the gradient of lora_conv2d's y for an x of spatial size x_hw."""
    torch._check(dy.dim() == 4, lambda: f"dy: expected (N, C_out, Ho, Wo), got shape {tuple(dy.shape)}")
    N, C_out, Ho, Wo = dy.shape
    torch._check(weight.dim() == 4, lambda: f"weight: expected ({C_out}, C_in, kh, kw), got {tuple(weight.shape)}")
    R = _check_conv_adapters(weight, down, up, weight.shape[1], C_out, dy)
    _check_conv_geometry(pref, dy, R, N, stride, padding, dilation)
    torch._check(len(x_hw) == 2 and min(x_hw) >= 1, lambda: f"x_hw: expected (H, W) >= 1, got {list(x_hw)}")
    _check_grid("dy", Ho, Wo, x_hw, weight.shape[2], weight.shape[3], stride, padding, dilation)


def lora_conv2d_dgrad_layout(dy: Tensor, C_in: int, R: int, H: int, W: int) -> Tuple[Tensor, Tensor]:
    """Empty (dX, dG): dense, in dy's memory format."""
    fmt = conv_memory_format(dy)
    N, _, Ho, Wo = dy.shape
    kw = dict(dtype=dy.dtype, device=dy.device, memory_format=fmt)
    return torch.empty((N, C_in, H, W), **kw), torch.empty((N, R, Ho, Wo), **kw)


@torch.library.custom_op("palora::lora_conv2d_dgrad", mutates_args=())
def lora_conv2d_dgrad(dy: Tensor, weight: Tensor, down: Tensor, up: Tensor, pref: Tensor, x_hw: List[int],
                      stride: List[int], padding: List[int], dilation: List[int], scale: float,
                      backend: str) -> Tuple[Tensor, Tensor]:
    """(dX, dG) of lora_conv2d: dG = B_cat^T dY per pixel (N, R, Ho, Wo), unscaled;
    dX = conv_transpose([dY | dG * S_n], [W; A_cat]) (N, C_in, H, W). Both dense in dy's memory format."""
    check_lora_conv2d_dgrad(dy, weight, down, up, pref, x_hw, stride, padding, dilation)
    dx, dg = dispatch.kernel(backend, "lora_conv2d_dgrad")(dy, weight, down, up, pref, x_hw, stride, padding,
                                                           dilation, scale)
    _check_layout("lora_conv2d_dgrad", backend, (dx, dg),
                  lora_conv2d_dgrad_layout(dy.to("meta"), weight.shape[1], down.shape[0], *x_hw))
    return dx, dg


@lora_conv2d_dgrad.register_fake
def _(dy, weight, down, up, pref, x_hw, stride, padding, dilation, scale, backend):
    check_lora_conv2d_dgrad(dy, weight, down, up, pref, x_hw, stride, padding, dilation)
    return lora_conv2d_dgrad_layout(dy, weight.shape[1], down.shape[0], *x_hw)


def check_lora_conv2d_wgrad(x, dy, dg, pref, kernel_hw, stride, padding, dilation) -> None:
    """The contract of lora_conv2d_wgrad: dy and dg are the gradients of lora_conv2d's y and (unscaled) H."""
    torch._check(x.dim() == 4, lambda: f"x: expected (N, C_in, H, W), got shape {tuple(x.shape)}")
    N = x.shape[0]
    torch._check(dy.dim() == 4 and dy.shape[0] == N,
                 lambda: f"dy: expected ({N}, C_out, Ho, Wo), got shape {tuple(dy.shape)}")
    Ho, Wo = dy.shape[2:]
    torch._check(dg.dim() == 4 and dg.shape[0] == N and tuple(dg.shape[2:]) == (Ho, Wo),
                 lambda: f"dg: expected ({N}, R, {Ho}, {Wo}), got shape {tuple(dg.shape)}")
    for name, t in (("dy", dy), ("dg", dg)):
        _same(name, t, x)
    _check_conv_geometry(pref, x, dg.shape[1], N, stride, padding, dilation)
    torch._check(len(kernel_hw) == 2 and min(kernel_hw) >= 1,
                 lambda: f"kernel_hw: expected (kh, kw) >= 1, got {list(kernel_hw)}")
    _check_grid("dy", Ho, Wo, x.shape[2:], kernel_hw[0], kernel_hw[1], stride, padding, dilation)


def lora_conv2d_wgrad_layout(x: Tensor, C_out: int, R: int, kh: int, kw: int,
                             need_weight: bool) -> Tuple[Tensor, Tensor]:
    """Empty (dW, dA), contiguous; dW has 0 rows when the base weight needs no gradient."""
    C_in = x.shape[1]
    return x.new_empty((C_out if need_weight else 0, C_in, kh, kw)), x.new_empty((R, C_in, kh, kw))


@torch.library.custom_op("palora::lora_conv2d_wgrad", mutates_args=())
def lora_conv2d_wgrad(x: Tensor, dy: Tensor, dg: Tensor, pref: Tensor, kernel_hw: List[int], stride: List[int],
                      padding: List[int], dilation: List[int], scale: float, need_weight: bool,
                      backend: str) -> Tuple[Tensor, Tensor]:
    """(dW, dA_cat) of lora_conv2d from ONE pass over im2col(x): the columns of the weight-gradient GEMM
    are [dY | dG * S_n], so dW = sum_n,pixels dY (x) im2col(x) and dA = sum (dG * S_n) (x) im2col(x),
    accumulated in fp32. dg is the unscaled gradient of H (lora_conv2d_dgrad's second output); S is
    applied in registers. need_weight=False (a frozen base) skips dW: it comes back with 0 rows.
    x, dy and dg may have any strides (NCHW, channels_last or views); the backend handles them."""
    check_lora_conv2d_wgrad(x, dy, dg, pref, kernel_hw, stride, padding, dilation)
    if x.shape[0] == 0:     # an empty batch: a sum over no pixels, the same zeros on every backend
        return tuple(t.zero_() for t in lora_conv2d_wgrad_layout(x, dy.shape[1], dg.shape[1], *kernel_hw,
                                                                  need_weight))
    dw, da = dispatch.kernel(backend, "lora_conv2d_wgrad")(x, dy, dg, pref, kernel_hw, stride, padding,
                                                           dilation, scale, need_weight)
    _check_layout("lora_conv2d_wgrad", backend, (dw, da),
                  lora_conv2d_wgrad_layout(x.to("meta"), dy.shape[1], dg.shape[1], *kernel_hw, need_weight),
                  names=("dW", "dA"))
    return dw, da


@lora_conv2d_wgrad.register_fake
def _(x, dy, dg, pref, kernel_hw, stride, padding, dilation, scale, need_weight, backend):
    check_lora_conv2d_wgrad(x, dy, dg, pref, kernel_hw, stride, padding, dilation)
    return lora_conv2d_wgrad_layout(x, dy.shape[1], dg.shape[1], *kernel_hw, need_weight)


def check_mtlora_mm(x, xs, weight, bias, A, B, ranks, scales, groups, shared_to_tasks, p) -> None:
    torch._check(x.dim() == 2, lambda: f"x: expected (N, K), got shape {tuple(x.shape)}")
    N, K = x.shape
    T = len(ranks) - 1
    torch._check(T >= 0 and all(r >= 0 for r in ranks),
                 lambda: f"ranks: expected T + 1 >= 1 ranks >= 0 (shared first), got {list(ranks)}")
    torch._check(groups >= 1, lambda: f"groups: expected >= 1, got {groups}")
    R = sum(ranks)
    torch._check(weight.dim() == 2 and weight.shape[1] == K and weight.shape[0] % groups == 0,
                 lambda: f"weight: expected (groups * Mg, {K}) with groups = {groups}, got {tuple(weight.shape)}")
    M = weight.shape[0]
    torch._check(tuple(A.shape) == (groups * R, K),
                 lambda: f"A: expected ({groups * R}, {K}) = (groups * sum(ranks), K), got {tuple(A.shape)}")
    torch._check(tuple(B.shape) == (M, R), lambda: f"B: expected ({M}, {R}) = (out, sum(ranks)), got {tuple(B.shape)}")
    torch._check(len(xs) in (0, T), lambda: f"xs: expected 0 or T = {T} task inputs, got {len(xs)}")
    for i, xt in enumerate(xs):
        torch._check(tuple(xt.shape) == (N, K), lambda: f"xs[{i}]: expected ({N}, {K}) as x, got {tuple(xt.shape)}")
        _same(f"xs[{i}]", xt, x)
    for name, t in (("weight", weight), ("A", A), ("B", B)) + ((("bias", bias),) if bias is not None else ()):
        _same(name, t, x)
    if bias is not None:
        torch._check(tuple(bias.shape) == (M,), lambda: f"bias: expected ({M},), got {tuple(bias.shape)}")
    torch._check(tuple(scales.shape) == (groups, T + 1) and scales.is_floating_point(),
                 lambda: f"scales: expected a float ({groups}, {T + 1}) tensor, got {tuple(scales.shape)} {scales.dtype}")
    torch._check(scales.device == x.device, lambda: f"scales: expected device {x.device}, got {scales.device}")
    torch._check(0.0 <= p < 1.0, lambda: f"p: expected dropout probability in [0, 1), got {p}")


def mtlora_mm_layout(x: Tensor, T: int, M: int, GR: int, backend: str) -> Tuple[Tensor, Tensor]:
    """Empty (Y, H): Y (T+1, N, M) dense, H (N, GR) with the backend's padded row stride."""
    N = x.shape[0]
    h = x.new_empty_strided((N, GR), (dispatch.record(backend).h_row_stride(GR), 1))
    return x.new_empty((T + 1, N, M)), h


@torch.library.custom_op("palora::mtlora_mm", mutates_args=())
def mtlora_mm(x: Tensor, xs: List[Tensor], weight: Tensor, bias: Optional[Tensor], A: Tensor, B: Tensor,
              ranks: List[int], scales: Tensor, groups: int, shared_to_tasks: bool, p: float, seed: int,
              offset: int, backend: str) -> Tuple[Tensor, Tensor]:
    check_mtlora_mm(x, xs, weight, bias, A, B, ranks, scales, groups, shared_to_tasks, p)
    y, h = dispatch.kernel(backend, "mtlora_mm")(x, xs, weight, bias, A, B, ranks, scales, groups,
                                                  shared_to_tasks, p, seed, offset)
    _check_layout("mtlora_mm", backend, (y, h),
                  mtlora_mm_layout(x.to("meta"), len(ranks) - 1, weight.shape[0], A.shape[0], backend))
    return y, h


@mtlora_mm.register_fake
def _(x, xs, weight, bias, A, B, ranks, scales, groups, shared_to_tasks, p, seed, offset, backend):
    check_mtlora_mm(x, xs, weight, bias, A, B, ranks, scales, groups, shared_to_tasks, p)
    return mtlora_mm_layout(x, len(ranks) - 1, weight.shape[0], A.shape[0], backend)


def mtlora_mm_dgrad_layout(dy: Tensor, K: int, n_xs: int, need_x: bool, need_base: bool, GR: int):
    """Empty (dX, dXs, dBase, dG), dense; the ones not asked for have 0 rows. dy: one output's gradient."""
    N, M = dy.shape
    return (dy.new_empty((N if need_x else 0, K)), dy.new_empty((n_xs if need_x else 0, N, K)),
            dy.new_empty((N if need_base else 0, M)), dy.new_empty((N, GR)))


@torch.library.custom_op("palora::mtlora_mm_dgrad", mutates_args=())
def mtlora_mm_dgrad(dys: List[Tensor], x: Tensor, xs: List[Tensor], weight: Tensor, A: Tensor, B: Tensor,
                    ranks: List[int], scales: Tensor, groups: int, shared_to_tasks: bool, p: float, seed: int,
                    offset: int, need_x: bool, need_base: bool,
                    backend: str) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The data gradients of mtlora_mm for the T+1 output gradients dys (each (N, M)): (dX (N, K),
    dXs (T, N, K), dBase (N, M), dG (N, G*R)); dX and dXs have 0 rows unless need_x, dBase unless need_base."""
    check_mtlora_mm(x, xs, weight, None, A, B, ranks, scales, groups, shared_to_tasks, p)
    _check_dys(dys, x, weight, ranks)
    got = dispatch.kernel(backend, "mtlora_mm_dgrad")(dys, x, xs, weight, A, B, ranks, scales, groups,
                                                       shared_to_tasks, p, seed, offset, need_x, need_base)
    like = mtlora_mm_dgrad_layout(dys[0].to("meta"), x.shape[1], len(xs), need_x, need_base, A.shape[0])
    for name, g, e in zip(("dX", "dXs", "dBase", "dG"), got, like):
        if g.shape != e.shape or g.dtype != e.dtype:
            raise RuntimeError(f"mtlora_mm_dgrad: backend {backend!r} returned {name} of shape {tuple(g.shape)} "
                               f"{g.dtype}; the contract is {tuple(e.shape)} {e.dtype}")
    return got


def _check_dys(dys, x, weight, ranks) -> None:
    torch._check(len(dys) == len(ranks), lambda: f"dys: expected {len(ranks)} output gradients, got {len(dys)}")
    for i, d in enumerate(dys):
        torch._check(tuple(d.shape) == (x.shape[0], weight.shape[0]) and d.dtype == x.dtype,
                     lambda: f"dys[{i}]: expected ({x.shape[0]}, {weight.shape[0]}) {x.dtype}, got {tuple(d.shape)} {d.dtype}")
        _same(f"dys[{i}]", d, x)


@mtlora_mm_dgrad.register_fake
def _(dys, x, xs, weight, A, B, ranks, scales, groups, shared_to_tasks, p, seed, offset, need_x, need_base,
      backend):
    check_mtlora_mm(x, xs, weight, None, A, B, ranks, scales, groups, shared_to_tasks, p)
    _check_dys(dys, x, weight, ranks)
    return mtlora_mm_dgrad_layout(dys[0], x.shape[1], len(xs), need_x, need_base, A.shape[0])


def _check_layout(op: str, backend: str, got, like, names=("y", "H")) -> None:
    """A backend returned tensors in the layout of the contract (``like``: meta tensors, no data).
    Shapes, dtypes and the strides of every dimension longer than 1 must agree."""
    for name, g, e in zip(names, got, like):
        ok = g.shape == e.shape and g.dtype == e.dtype and all(
            gs == es for n, gs, es in zip(g.shape, g.stride(), e.stride()) if n > 1)
        if not ok:
            raise RuntimeError(f"{op}: backend {backend!r} returned {name} of shape {tuple(g.shape)}, strides "
                               f"{g.stride()}, {g.dtype}; the contract is shape {tuple(e.shape)}, strides "
                               f"{e.stride()}, {e.dtype}")


def _register_cpp_fakes() -> None:
    """Fake implementations for the ops that the C++ extension defines (when it is built)."""
    if hasattr(torch.ops.palora, "lowrank_shrink"):
        @torch.library.register_fake("palora::lowrank_shrink")
        def _(x, m, row_align):
            ld = -(-max(m.shape[0], 1) // row_align) * row_align
            return x.new_empty(x.shape[0], ld)[:, :m.shape[0]]

        @torch.library.register_fake("palora::lowrank_tmm")
        def _(g, v):
            return v.new_empty(g.shape[1], v.shape[1])

    if hasattr(torch.ops.palora, "lowrank_dual"):
        @torch.library.register_fake("palora::lowrank_dual")
        def _(v, m, g, row_align):
            ld = -(-max(m.shape[0], 1) // row_align) * row_align
            return v.new_empty(v.shape[0], ld)[:, :m.shape[0]], v.new_empty(g.shape[1], v.shape[1])

    if hasattr(torch.ops.palora, "lowrank_expand"):
        @torch.library.register_fake("palora::lowrank_expand")
        def _(g, up, bias):
            return g.new_empty(g.shape[0], up.shape[1])

    if hasattr(torch.ops.palora, "pref_grad"):
        @torch.library.register_fake("palora::pref_grad")
        def _(h, dg, pref, rows_per_sample, rank, scale):
            return pref.new_empty(pref.shape)
