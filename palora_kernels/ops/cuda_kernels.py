"""The ``cuda`` backend: the CUDA C++ kernels of csrc/cuda (the fallback where Triton is missing).

They are compiled into palora_kernels._C by setup.py when torch is a CUDA build and nvcc is
found, as the backend-specific ops ``palora::lora_mm_cuda`` and ``palora::lora_conv2d_cuda``
(see docs/cuda.md for why they have their own names). The same kernel source runs on CPU
under the host emulator as the ``cuda_sim`` backend, which is how the tests prove it.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from ..dispatch import register_availability, register_kernel


def _built() -> bool:
    return _ext._C_AVAILABLE and hasattr(torch.ops.palora, "lora_mm_cuda")


def _available(device: torch.device) -> Optional[str]:
    if not _ext._C_AVAILABLE:
        return f"palora_kernels._C is not built ({_ext._C_ERROR})"
    if not hasattr(torch.ops.palora, "lora_mm_cuda"):
        return ("palora_kernels._C was built without CUDA code (a CPU torch, no nvcc, or "
                "PALORA_SKIP_CUDA_BUILD=1 at build time)")
    if torch.device(device).type != "cuda":
        return f"the cuda backend runs on CUDA tensors, got device {device}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


register_availability("cuda", _available)

if _built():
    @torch.library.register_fake("palora::lora_mm_cuda")
    def _(x, wm, bias, down, up, pref, rows_per_sample, scale):
        return x.new_empty(x.shape[0], wm.shape[1] + down.shape[1])

    @torch.library.register_fake("palora::lora_conv2d_cuda")
    def _(x, wcat, bias, up, pref, stride, padding, dilation, scale):
        from .._ops import conv_out_size
        kh, kw = wcat.shape[2:]
        Ho = conv_out_size(x.shape[2], kh, stride[0], padding[0], dilation[0])
        Wo = conv_out_size(x.shape[3], kw, stride[1], padding[1], dilation[1])
        return x.new_empty(x.shape[0], wcat.shape[0], Ho, Wo)


@register_kernel("cuda", "lora_mm")
def lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale):
    """z (N, M+R) = [x wm + bias + ((x down) * S) up | x down]; see palora_kernels._ops."""
    if x.dtype == torch.float64:      # the kernels are fp32/fp16/bf16; fp64 (gradcheck) composes cuBLAS
        from .torch_kernels import lora_mm as torch_lora_mm
        return torch_lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale)
    return torch.ops.palora.lora_mm_cuda(x, wm, bias, down, up, pref, rows_per_sample, scale)


@register_kernel("cuda", "lora_conv2d")
def lora_conv2d(x, wcat, bias, up, pref, stride, padding, dilation, scale):
    """z (N, C_out+R, Ho, Wo) = [conv(x, W) + b + B diag(S_n) H_n | H_n]."""
    if x.dtype == torch.float64:
        from .torch_kernels import lora_conv2d as torch_lora_conv2d
        return torch_lora_conv2d(x, wcat, bias, up, pref, stride, padding, dilation, scale)
    return torch.ops.palora.lora_conv2d_cuda(x, wcat, bias, up, pref, list(stride), list(padding),
                                             list(dilation), scale)
