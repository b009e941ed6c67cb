"""What a backend declares about itself: the ops it runs, on which dtypes and devices, and the
layout of what it returns. :func:`palora_kernels.dispatch.select_backend` reads these records and
nothing else; no other code asks which backend it is talking to.
"""
from __future__ import annotations

import dataclasses
import importlib
import sys
from typing import Callable, FrozenSet, Mapping, Optional

import torch

FLOATS = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
HALF_AND_FP32 = frozenset({torch.float16, torch.bfloat16, torch.float32})


def load(target: str) -> Callable:
    """'package.module:function' -> the function (imports the module on first use; a module already imported
    is taken from sys.modules, which torch.compile can trace where it refuses importlib)."""
    module, _, attr = target.partition(":")
    mod = sys.modules.get(module)
    return getattr(mod if mod is not None else importlib.import_module(module), attr)


@dataclasses.dataclass(frozen=True)
class Backend:
    name: str
    # op -> "module:function". Op names are those of palora_kernels._ops (lora_mm, lora_conv2d)
    # plus loralib_conv2d and pref_grad; lora_conv2d_dgrad (the conv's dX and dG) and
    # lora_conv2d_wgrad (dW and dA in one pass), lora_conv2d_pref_grad (d(preference) from the
    # conv's 4-D H and dG) where a backend has kernels for them (the conv backward falls back to
    # convolution_backward and torch reductions otherwise); mtlora_mm and mtlora_mm_dgrad (MTLoRA);
    # lora_mm_dropout / lora_conv2d_dropout where its kernel runs LoRA dropout, lora_dropout_dA where it
    # has the backward's dA under dropout (docs/dropout.md).
    kernels: Mapping[str, str]
    dtypes: FrozenSet[torch.dtype]
    # device types it runs on ("cpu", "cuda"); empty: any device torch runs on
    devices: FrozenSet[str] = frozenset()
    # automatic choice: lower first; None: only when asked for by name
    priority: Optional[int] = None
    # device types where automatic choice considers it (empty: all of ``devices``); the Triton
    # interpreter runs on CPU tensors, but only on request
    auto_devices: FrozenSet[str] = frozenset()
    # ops whose kernel is the whole layer as a differentiable torch composition (autograd records
    # it); the others are kernels with the signature of their palora:: op, run by our Functions
    composite: FrozenSet[str] = frozenset()
    # row stride of the 2-D H buffer a kernel returns, as a multiple of this many elements (a GEMM
    # reads H again in the backward; 16 elements = one 64-byte line in fp32, one 32-byte sector in bf16)
    h_row_align: int = 16
    # the linear backward takes dW and dA_cat in one pass over x from this backend's lora_conv2d_wgrad
    # (ops/linear.py); off where dW is better left to a GEMM library (triton on a GPU: cuBLAS, docs/cuda.md)
    linear_wgrad: bool = False
    # "module:function"(device) -> None if it can run there, else the reason; may import heavy things
    check: Optional[str] = None
    summary: str = ""

    def why_not(self, device: torch.device, op: str, dtype: torch.dtype) -> Optional[str]:
        """The reason this backend cannot run ``op`` on ``dtype`` tensors on ``device`` (None: it can)."""
        if op not in self.kernels:
            return f"it has no kernel for op {op!r} (it runs: {', '.join(sorted(self.kernels))})"
        if dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).replace("torch.", "") for d in self.dtypes))
            return f"it runs {names}, not {str(dtype).replace('torch.', '')}"
        if self.devices and device.type not in self.devices:
            return f"it runs on {', '.join(sorted(self.devices))} tensors, not {device.type}"
        return load(self.check)(device) if self.check else None

    def automatic_on(self, device: torch.device) -> bool:
        if self.priority is None:
            return False
        where = self.auto_devices or self.devices
        return not where or device.type in where

    def h_row_stride(self, R: int) -> int:
        return -(-R // self.h_row_align) * self.h_row_align
