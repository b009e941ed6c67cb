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
lora_conv2d (y, H) with  y = conv(x, W) + bias + B_cat diag(S_n) H_n   (N, C_out, Ho, Wo)
                         H = conv(x, A_cat), unscaled                 (N, R, Ho, Wo)
            weight (C_out, C_in, kh, kw), down = A_cat (R, C_in, kh, kw), up = B_cat (C_out, R),
            pref (P, T) with P == 1 or P == N. y and H are dense in x's memory format
            (channels_last when x is), as nn.Conv2d returns them. drop_p > 0: the shrink reads
            x under LoRA dropout (mask over x's logical NCHW elements; ``lora_conv2d_dropout`` kernel).

H's row stride (lora_mm) is a multiple of the backend record's ``h_row_align`` elements: the
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


def check_lora_conv2d(x, weight, down, bias, up, pref, stride, padding, dilation) -> Tuple[int, int]:
    """Checks the contract; returns (Ho, Wo)."""
    torch._check(x.dim() == 4, lambda: f"x: expected (N, C_in, H, W), got shape {tuple(x.shape)}")
    N, C_in, H, W = x.shape
    torch._check(weight.dim() == 4 and weight.shape[1] == C_in,
                 lambda: f"weight: expected (C_out, {C_in}, kh, kw), got {tuple(weight.shape)}")
    C_out, _, kh, kw = weight.shape
    torch._check(down.dim() == 4 and tuple(down.shape[1:]) == (C_in, kh, kw),
                 lambda: f"down: expected (R, {C_in}, {kh}, {kw}), got {tuple(down.shape)}")
    R = down.shape[0]
    torch._check(tuple(up.shape) == (C_out, R), lambda: f"up: expected ({C_out}, {R}), got {tuple(up.shape)}")
    for name, t in (("weight", weight), ("down", down), ("up", up)) + ((("bias", bias),) if bias is not None else ()):
        _same(name, t, x)
    if bias is not None:
        torch._check(tuple(bias.shape) == (C_out,), lambda: f"bias: expected ({C_out},), got {tuple(bias.shape)}")
    _check_pref(pref, x, R, "down")
    torch._check(pref.shape[0] in (1, N), lambda: f"pref: expected 1 or N = {N} rows, got {pref.shape[0]}")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        torch._check(len(v) == 2 and min(v) >= lo, lambda: f"{name}: expected 2 values >= {lo}, got {list(v)}")
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


def check_lora_conv2d_dgrad(dy, weight, down, up, pref, x_hw, stride, padding, dilation) -> None:
    """The contract of lora_conv2d_dgrad: dy is the gradient of lora_conv2d's y for an x of spatial size x_hw."""
    torch._check(dy.dim() == 4, lambda: f"dy: expected (N, C_out, Ho, Wo), got shape {tuple(dy.shape)}")
    N, C_out, Ho, Wo = dy.shape
    torch._check(weight.dim() == 4 and weight.shape[0] == C_out,
                 lambda: f"weight: expected ({C_out}, C_in, kh, kw), got {tuple(weight.shape)}")
    _, C_in, kh, kw = weight.shape
    torch._check(down.dim() == 4 and tuple(down.shape[1:]) == (C_in, kh, kw),
                 lambda: f"down: expected (R, {C_in}, {kh}, {kw}), got {tuple(down.shape)}")
    R = down.shape[0]
    torch._check(tuple(up.shape) == (C_out, R), lambda: f"up: expected ({C_out}, {R}), got {tuple(up.shape)}")
    for name, t in (("weight", weight), ("down", down), ("up", up)):
        _same(name, t, dy)
    _check_pref(pref, dy, R, "down")
    torch._check(pref.shape[0] in (1, N), lambda: f"pref: expected 1 or N = {N} rows, got {pref.shape[0]}")
    torch._check(len(x_hw) == 2 and min(x_hw) >= 1, lambda: f"x_hw: expected (H, W) >= 1, got {list(x_hw)}")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        torch._check(len(v) == 2 and min(v) >= lo, lambda: f"{name}: expected 2 values >= {lo}, got {list(v)}")
    eh = conv_out_size(x_hw[0], kh, stride[0], padding[0], dilation[0])
    ew = conv_out_size(x_hw[1], kw, stride[1], padding[1], dilation[1])
    torch._check(Ho == eh and Wo == ew,
                 lambda: f"dy: expected an output grid of {eh}x{ew} for x of {x_hw[0]}x{x_hw[1]}, got {Ho}x{Wo}")


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


def _check_layout(op: str, backend: str, got, like) -> None:
    """A backend returned tensors in the layout of the contract (``like``: meta tensors, no data).
    Shapes, dtypes and the strides of every dimension longer than 1 must agree."""
    for name, g, e in zip(("y", "H"), got, like):
        ok = g.shape == e.shape and g.dtype == e.dtype and all(
            gs == es for n, gs, es in zip(g.shape, g.stride(), e.stride()) if n > 1)
        if not ok:
            raise RuntimeError(f"{op}: backend {backend!r} returned {name} of shape {tuple(g.shape)}, strides "
                               f"{g.stride()}, {g.dtype}; the contract is shape {tuple(e.shape)}, strides "
                               f"{e.stride()}, {e.dtype}")


def _register_cpp_fakes() -> None:
    """Fake implementations for the ops that the C++ extension defines (when it is built)."""
    if hasattr(torch.ops.palora, "pref_grad"):
        @torch.library.register_fake("palora::pref_grad")
        def _(h, dg, pref, rows_per_sample, rank, scale):
            return pref.new_empty(pref.shape)
