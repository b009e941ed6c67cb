"""The ``cuda`` backend: the CUDA C++ kernels of csrc/cuda, compiled into palora_kernels._C by
setup.py when torch is a CUDA build and nvcc is found (the fallback where Triton is missing)."""
from typing import Optional

import torch

from .._record import HALF_AND_FP32, Backend


def check(device: torch.device) -> Optional[str]:
    from ... import _ext
    if not _ext._C_AVAILABLE:
        return f"palora_kernels._C is not built ({_ext._C_ERROR})"
    if not hasattr(torch.ops.palora, "lora_mm_cuda"):
        return ("palora_kernels._C was built without CUDA code (a CPU torch, no nvcc, or "
                "PALORA_SKIP_CUDA_BUILD=1 at build time)")
    if not torch.cuda.is_available():
        return "no CUDA device"
    return None


RECORD = Backend(
    name="cuda",
    kernels={"lora_mm": "palora_kernels.backends.cuda.kernels:lora_mm",
             "lora_conv2d": "palora_kernels.backends.cuda.kernels:lora_conv2d",
             "pref_grad": "palora_kernels.backends.cuda.kernels:pref_grad",
             "lora_conv2d_dgrad": "palora_kernels.backends.cuda.kernels:lora_conv2d_dgrad",
             "lora_conv2d_wgrad": "palora_kernels.backends.cuda.kernels:lora_conv2d_wgrad",
             "lora_conv2d_pref_grad": "palora_kernels.backends.cuda.kernels:lora_conv2d_pref_grad",
             "mtlora_mm": "palora_kernels.backends.cuda.mtlora:mtlora_mm",
             "mtlora_mm_dgrad": "palora_kernels.backends.cuda.mtlora:mtlora_mm_dgrad"},
    # no *_dropout ops: the CUDA C++ kernels draw no dropout mask, so dispatch sends a layer under
    # LoRA dropout to triton / torch (docs/dropout.md); mtlora_mm and its dgrad take (p, seed, offset) and
    # draw the MTLoRA mask in their kernels (csrc/cuda/mtlora_mm.cuh)
    dtypes=HALF_AND_FP32,            # fp64 (gradcheck) goes to the next backend: torch on cuBLAS
    linear_wgrad=True,               # ops/linear.py: dW and dA_cat from one pass over x
    devices=frozenset({"cuda"}),
    priority=20,
    check="palora_kernels.backends.cuda:check",
    summary="CUDA C++ kernels (csrc/cuda)",
)
