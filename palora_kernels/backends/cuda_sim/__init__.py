"""The ``cuda_sim`` backend: the CUDA C++ kernels of csrc/cuda run on CPU tensors under the host
emulator of csrc/emu. A test asset, chosen only by name: it compiles the kernel sources of a
source checkout with g++ (a wheel carries no csrc/), and it is slow by design."""
from typing import Optional

import torch

from .._record import HALF_AND_FP32, Backend


def check(device: torch.device) -> Optional[str]:
    from .kernels import unavailable_reason
    return unavailable_reason()


RECORD = Backend(
    name="cuda_sim",
    kernels={"lora_mm": "palora_kernels.backends.cuda_sim.kernels:lora_mm",
             "lora_conv2d": "palora_kernels.backends.cuda_sim.kernels:lora_conv2d",
             "pref_grad": "palora_kernels.backends.cuda_sim.kernels:pref_grad",
             "lora_conv2d_dgrad": "palora_kernels.backends.cuda_sim.kernels:lora_conv2d_dgrad",
             "lora_conv2d_wgrad": "palora_kernels.backends.cuda_sim.kernels:lora_conv2d_wgrad",
             "lora_conv2d_pref_grad": "palora_kernels.backends.cuda_sim.kernels:lora_conv2d_pref_grad",
             "mtlora_mm": "palora_kernels.backends.cuda_sim.kernels:mtlora_mm",
             "mtlora_mm_dgrad": "palora_kernels.backends.cuda_sim.kernels:mtlora_mm_dgrad"},
    # no *_dropout ops: the CUDA C++ kernels draw no dropout mask, so dispatch sends a layer under
    # LoRA dropout to triton / torch (docs/dropout.md); mtlora_mm and its dgrad take (p, seed, offset) and
    # draw the MTLoRA mask in their kernels (csrc/cuda/mtlora_mm.cuh)
    dtypes=HALF_AND_FP32,            # as on the GPU
    linear_wgrad=True,               # ops/linear.py: dW and dA_cat from one pass over x
    devices=frozenset({"cpu"}),
    check="palora_kernels.backends.cuda_sim:check",
    summary="the CUDA C++ kernels under a host SIMT emulator (tests)",
)
