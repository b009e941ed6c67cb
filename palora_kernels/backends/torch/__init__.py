"""The ``torch`` backend: stacked GEMMs and convolutions composed from torch ops, on any device.

The CPU path users run today and the fallback of every other backend's automatic choice."""
from .._record import FLOATS, Backend

RECORD = Backend(
    name="torch",
    kernels={"lora_mm": "palora_kernels.backends.torch.kernels:lora_mm",
             "lora_conv2d": "palora_kernels.backends.torch.kernels:lora_conv2d",
             "loralib_conv2d": "palora_kernels.backends.torch.kernels:loralib_conv2d",
             "pref_grad": "palora_kernels._math:pref_grad",
             "lora_tmm": "palora_kernels._math:row_scaled_tmm",
             "mtlora_mm": "palora_kernels.backends.torch.mtlora:mtlora_mm",
             "mtlora_mm_dgrad": "palora_kernels.backends.torch.mtlora:mtlora_mm_dgrad",
             "lora_mm_dropout": "palora_kernels.backends.torch.kernels:lora_mm_dropout",
             "lora_dropout_dA": "palora_kernels.backends.torch.kernels:lora_dropout_dA",
             "lora_conv2d_dropout": "palora_kernels.backends.torch.kernels:lora_conv2d_dropout"},
    composite=frozenset({"loralib_conv2d"}),
    dtypes=FLOATS,
    priority=100,
    summary="stacked GEMMs / convolutions from torch ops (MKL/oneDNN on CPU, cuBLAS/cuDNN on CUDA)",
)
