from .conv import PaLoRAConv2d
from .linear import PaLoRALinear

__all__ = ["PaLoRAConv2d", "PaLoRALinear"]
