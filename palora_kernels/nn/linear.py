"""PaLoRALinear: holds parameters, validates, calls the functional API."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import merged_linear_weight, palora_linear
from ._base import PaLoRALayerMixin, init_lora_


class PaLoRALinear(PaLoRALayerMixin, nn.Module):
    """nn.Linear plus T preference-weighted LoRA adapters; the base weight is trained too.

    y = x W^T + b + s * sum_t p_t (x~ A_t^T) B_t^T,   s = lora_alpha / rank.
    lora_dropout p: in training mode x~ = x * mask / (1-p), the adapters' input only (PEFT's
    lora_dropout); x~ = x in eval mode or for p = 0. The mask is regenerated in the backward.
    Parameters: weight (out, in), bias (out,), lora_A (T, r, in), lora_B (T, out, r).
    forward(x: (..., in), preference: (T,) | (B, T) | None) -> (..., out).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, num_tasks: int,
                 rank: int, lora_alpha: float = 1.0, lora_dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self._init_palora(num_tasks, rank, lora_alpha, lora_dropout)
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.lora_A = nn.Parameter(torch.empty(num_tasks, rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(num_tasks, out_features, rank, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))   # exactly nn.Linear's init
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        init_lora_(self.lora_A, self.lora_B)

    @classmethod
    def from_module(cls, layer: nn.Linear, *, num_tasks: int, rank: int, lora_alpha: float = 1.0,
                    lora_dropout: float = 0.0):
        """A PaLoRALinear with ``layer``'s weight and bias (copied) and fresh adapters."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer: expected nn.Linear, got {type(layer).__name__}")
        w = layer.weight
        new = cls(layer.in_features, layer.out_features, layer.bias is not None, num_tasks=num_tasks,
                  rank=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def _merged_weight(self, p):
        return merged_linear_weight(self.weight, self.lora_A, self.lora_B, p, self.scaling)

    def forward(self, x: torch.Tensor, preference: torch.Tensor | None = None) -> torch.Tensor:
        if self.merged:
            self._merged_call_preference(preference)
            return F.linear(x, self.weight, self.bias)
        p = self._resolve_preference(preference)
        return palora_linear(x, self.weight, self.bias, self.lora_A, self.lora_B, p, self.scaling,
                             lora_dropout=self._active_dropout())

    def to_linear(self, preference: torch.Tensor) -> nn.Linear:
        """A plain nn.Linear computing this layer at ``preference`` (T,)."""
        if self.merged:
            self._check_merged_call(preference)      # merged at another preference: raise, don't export it
        w = self.weight.detach() if self.merged else self.merged_weight(preference)
        lin = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
        return lin

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.extra_palora_repr()}")
