"""palora-kernels: fused kernels for preference-conditioned low-rank adapters (PaLoRA, MTLoRA)."""
from . import _ops, dispatch, functional, reference, samplers  # noqa: F401  (_ops registers palora::)
from ._ext import _C_AVAILABLE  # noqa: F401

_ops._register_cpp_fakes()
from .dispatch import select_backend, use_backend
from .functional import palora_conv2d, palora_linear
from .model import convert, export_merged, preference, set_preference
from .nn import MTLoRALinear, MTLoRAQKV, PaLoRAConv2d, PaLoRALinear
from .ops.mtlora import mtlora_linear
from .mtlora_convert import convert_mtlora
from . import interop  # noqa: E402  (checkpoints of the PaLoRA reference code and of PEFT)

__version__ = "0.1.0"
__all__ = ["PaLoRALinear", "PaLoRAConv2d", "MTLoRALinear", "MTLoRAQKV", "mtlora_linear", "convert_mtlora", "convert", "set_preference", "preference", "export_merged",
           "palora_linear", "palora_conv2d", "select_backend", "use_backend", "samplers", "reference", "interop"]
