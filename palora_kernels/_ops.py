"""Every ``palora::`` custom op: schema, typed wrapper and fake (meta) implementation.

The ops are opaque to ``torch.compile``; their implementation looks up the kernel of
the backend named by the ``backend`` argument (chosen once, in the autograd Function,
by :func:`palora_kernels.dispatch.select_backend`).

lora_mm     z = [x @ wm + bias + ((x @ down) * S) @ up  |  x @ down]        (N, M + R)
            x (N, K), wm (K, M), bias (M,) or None, down (K, R), up (R, M),
            pref (P, T), S[n, t*r + j] = scale * pref[n // rows_per_sample, t], r = R // T.
            Forward: (wm, down, up) = (W^T, A_cat^T, B_cat^T); dX: (W, B_cat, A_cat).
lora_conv2d z = [conv(x, W) + bias + B_cat diag(S_n) H_n  |  H_n]            (N, C_out + R, Ho, Wo)
            wcat = [W; A_cat] (C_out + R, C_in, kh, kw), up = B_cat (C_out, R),
            H = conv(x, A_cat) (unscaled), pref (P, T) with P == 1 or P == N.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import dispatch


@torch.library.custom_op("palora::lora_mm", mutates_args=())
def lora_mm(x: Tensor, wm: Tensor, bias: Optional[Tensor], down: Tensor, up: Tensor,
            pref: Tensor, rows_per_sample: int, scale: float, backend: str) -> Tensor:
    return dispatch.kernel(backend, "lora_mm")(x, wm, bias, down, up, pref, rows_per_sample, scale)


def lora_mm_row_stride(M: int, R: int, backend: str) -> int:
    """Row stride of lora_mm's z: the torch backend pads rows to a multiple of 16 elements and
    returns the (N, M+R) view, so no copy to a dense z is needed (MKL ran a (4096, 1036) output
    1.30x slower than (4096, 1040)); the GPU backends return a dense z."""
    return (M + R + 15) // 16 * 16 if backend == "torch" else M + R


@lora_mm.register_fake
def _(x, wm, bias, down, up, pref, rows_per_sample, scale, backend):
    M, R = wm.shape[1], down.shape[1]
    return x.new_empty_strided((x.shape[0], M + R), (lora_mm_row_stride(M, R, backend), 1))


def conv_out_size(size: int, k: int, stride: int, padding: int, dilation: int) -> int:
    return (size + 2 * padding - dilation * (k - 1) - 1) // stride + 1


@torch.library.custom_op("palora::lora_conv2d", mutates_args=())
def lora_conv2d(x: Tensor, wcat: Tensor, bias: Optional[Tensor], up: Tensor, pref: Tensor,
                stride: List[int], padding: List[int], dilation: List[int], scale: float,
                backend: str) -> Tensor:
    return dispatch.kernel(backend, "lora_conv2d")(x, wcat, bias, up, pref, stride, padding,
                                                   dilation, scale)


@lora_conv2d.register_fake
def _(x, wcat, bias, up, pref, stride, padding, dilation, scale, backend):
    N, _, H, W = x.shape
    kh, kw = wcat.shape[2:]
    Ho = conv_out_size(H, kh, stride[0], padding[0], dilation[0])
    Wo = conv_out_size(W, kw, stride[1], padding[1], dilation[1])
    return x.new_empty(N, wcat.shape[0], Ho, Wo)


def _register_cpp_fakes() -> None:
    """Fake implementations for the ops that the C++ extension defines (when it is built)."""
    if hasattr(torch.ops.palora, "pref_grad"):
        @torch.library.register_fake("palora::pref_grad")
        def _(h, dg, pref, rows_per_sample, rank, scale):
            return pref.new_empty(pref.shape)
