from .batchnorm import (RayGroupBatchNorm1d, RayGroupBatchNorm2d, convert_batchnorm, ray_groups,
                        set_ray_groups)
from .conv import PaLoRAConv2d
from .linear import PaLoRALinear
from .mtlora import MTLoRALinear, MTLoRAQKV

__all__ = ["MTLoRALinear", "MTLoRAQKV", "PaLoRAConv2d", "PaLoRALinear", "RayGroupBatchNorm1d", "RayGroupBatchNorm2d",
           "convert_batchnorm", "ray_groups", "set_ray_groups"]
