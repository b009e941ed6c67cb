"""The ``reference`` backend: the naive loop of palora_kernels.reference, differentiated by autograd.
What the PaLoRA reference code and PEFT compute; the oracle of the tests and the benchmarks' ``unfused``."""
from ._record import FLOATS, Backend

RECORD = Backend(
    name="reference",
    kernels={"lora_mm": "palora_kernels.reference:palora_linear",
             "lora_conv2d": "palora_kernels.reference:palora_conv2d",
             "loralib_conv2d": "palora_kernels.reference:palora_conv2d",
             "lora_mm_dropout": "palora_kernels.reference:palora_linear",        # x_lora = the dropped x
             "lora_conv2d_dropout": "palora_kernels.reference:palora_conv2d"},
    composite=frozenset({"lora_mm", "lora_conv2d", "loralib_conv2d", "lora_mm_dropout", "lora_conv2d_dropout"}),
    dtypes=FLOATS,
    summary="naive loop over adapters, autograd through torch ops",
)
