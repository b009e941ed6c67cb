"""The ``triton`` backend: Triton kernels of the palora:: ops (imported by dispatch on first use).

Runs on CUDA tensors when triton imports; on CPU tensors only under the Triton interpreter,
which must be switched on (TRITON_INTERPRET=1) before triton is first imported, because
``@triton.jit`` picks the interpreter when the kernels are decorated.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dispatch import register_availability, register_kernel
from . import linear

INTERPRET = linear.INTERPRET


def _check(device: torch.device) -> Optional[str]:
    device = torch.device(device)
    if device.type == "cuda" or INTERPRET:
        return None
    return (f"Triton kernels run on {device.type} tensors only under the Triton interpreter: set "
            "TRITON_INTERPRET=1 before triton is imported (it was not set when "
            "palora_kernels.triton was imported)")


register_availability("triton", _check)


@register_kernel("triton", "lora_mm")
def lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale):
    """z (N, M+R) = [x wm + bias + ((x down) * S) up | x down]; the path comes from the cost model."""
    return linear.lora_mm(x, wm, bias, down, up, pref, rows_per_sample, scale)
