"""The ``triton`` backend: Triton kernels of the palora:: ops (linear.py: lora_mm; conv2d.py,
conv2d_bwd.py: lora_conv2d and its dgrad/wgrad; conv2d_loralib.py: the loralib conv layer; mtlora.py:
mtlora_mm and its dgrad).

Runs on CUDA tensors when triton imports; on CPU tensors only under the Triton interpreter,
which must be switched on (TRITON_INTERPRET=1) before triton is first imported, because
``@triton.jit`` picks the interpreter when the kernels are decorated. Automatic choice uses it
on CUDA only; on CPU it runs when asked for by name.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._record import FLOATS, Backend


def check(device: torch.device) -> Optional[str]:
    try:
        from . import linear
    except Exception as exc:     # no triton, or a triton that does not import here
        return f"importing palora_kernels.backends.triton.linear failed: {exc}"
    if device.type == "cuda" or linear.INTERPRET:
        return None
    return (f"Triton kernels run on {device.type} tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported (it was not set when the kernels were imported)")


RECORD = Backend(
    name="triton",
    kernels={"lora_mm": "palora_kernels.backends.triton.linear:lora_mm",
             "mtlora_mm": "palora_kernels.backends.triton.mtlora:mtlora_mm",
             "mtlora_mm_dgrad": "palora_kernels.backends.triton.mtlora:mtlora_mm_dgrad",
             "lora_conv2d": "palora_kernels.backends.triton.conv2d:lora_conv2d",
             "lora_conv2d_dgrad": "palora_kernels.backends.triton.conv2d_bwd:lora_conv2d_dgrad",
             "lora_conv2d_wgrad": "palora_kernels.backends.triton.conv2d_bwd:lora_conv2d_wgrad",
             "loralib_conv2d": "palora_kernels.backends.triton.conv2d_loralib:loralib_conv2d",
             "lora_mm_dropout": "palora_kernels.backends.triton.linear:lora_mm_dropout",
             "lora_dropout_dA": "palora_kernels.backends.triton.linear:lora_dropout_dA"},
    composite=frozenset({"loralib_conv2d"}),
    dtypes=FLOATS,
    devices=frozenset({"cuda", "cpu"}),
    auto_devices=frozenset({"cuda"}),
    priority=10,
    check="palora_kernels.backends.triton:check",
    summary="Triton kernels (lora_mm: in-loop shrink, split shrink, merged; lora_conv2d: implicit GEMM, in-loop "
            "or split shrink, with dX/dW kernels; loralib_conv2d: merged or one (T+1)-weight kernel)",
)
