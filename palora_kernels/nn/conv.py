"""PaLoRAConv2d: holds parameters, validates, calls the functional API."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from ..functional import merged_conv_weight, palora_conv2d
from ._base import PaLoRALayerMixin, check_positive, init_lora_

PARAMETERIZATIONS = ("factorized", "loralib")


class PaLoRAConv2d(PaLoRALayerMixin, nn.Module):
    """nn.Conv2d plus T preference-weighted LoRA adapters.

    parameterization="factorized" (PEFT-style, low rank in channel space):
        lora_A (T, r, C_in, kh, kw) is a conv with the base's stride/padding/dilation,
        lora_B (T, C_out, r) a 1x1 conv. Per-sample preferences cost one conv of C_out + R
        channels plus a rank-R expand.
    parameterization="loralib" (the PaLoRA reference code; square kernels, k = kh = kw):
        lora_A (T, r*k, C_in*k), lora_B (T, C_out*k, r*k), update (B_t A_t).view(W.shape).
        Per-batch preference: merged into one conv. Per-sample: one conv of (T+1)*C_out channels.
    groups > 1: the base weight is grouped as nn.Conv2d's (C_out, C_in/groups, kh, kw).
        factorized: the adapter stays full-channel (PEFT's shapes); it runs as a separate grouped
        base conv plus the shrink conv and expand (torch ops, every backend); it cannot be merged
        into the grouped weight (merge raises). loralib: the update (B_t A_t).view(W.shape) is
        grouped as W, lora_B (T, C_out/groups*k, r*k) as in the PaLoRA reference; it merges.
    padding: an int, a pair, "same" or "valid", as nn.Conv2d. padding_mode must be "zeros".
    lora_dropout p (factorized only): in training mode the adapters read x * mask / (1-p), the
    base reads x; eval mode or p = 0: no dropout. loralib's update has no input of its own (loralib's
    ConvLoRA folds it into the weight and ignores its lora_dropout): p > 0 raises there.
    forward(x: (N, C_in, H, W), preference: (T,) | (N, T) | None) -> (N, C_out, Ho, Wo).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, *, num_tasks: int, rank: int,
                 lora_alpha: float = 1.0, parameterization: str = "factorized",
                 padding_mode: str = "zeros", lora_dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self._init_palora(num_tasks, rank, lora_alpha, lora_dropout)
        check_positive("in_channels", in_channels)
        check_positive("out_channels", out_channels)
        groups = check_positive("groups", groups)
        for name, c in (("in_channels", in_channels), ("out_channels", out_channels)):
            if c % groups:
                raise ValueError(f"{name}: expected a multiple of groups = {groups}, got {c}")
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode: expected 'zeros', got {padding_mode!r}")
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization: expected one of {PARAMETERIZATIONS}, got {parameterization!r}")
        if parameterization == "loralib" and self.lora_dropout:
            raise ValueError(f"lora_dropout: parameterization='loralib' folds its update into the conv weight and "
                             f"has no adapter input to drop (loralib's ConvLoRA ignores its lora_dropout too); use "
                             f"parameterization='factorized' or lora_dropout=0, got {self.lora_dropout}")
        kh, kw = _pair(kernel_size)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"padding: expected an int, a pair of ints, 'same' or 'valid', got {padding!r}")
            if padding == "same" and _pair(stride) != (1, 1):
                raise ValueError(f"padding: 'same' needs stride 1 (as nn.Conv2d), got stride {_pair(stride)}")
        if parameterization == "loralib" and kh != kw:
            raise ValueError(f"kernel_size: parameterization='loralib' needs a square kernel, got {(kh, kw)}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = (kh, kw), _pair(stride)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.dilation, self.groups = _pair(dilation), groups
        self.parameterization = parameterization
        kw_ = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw, **kw_))
        self.bias = nn.Parameter(torch.empty(out_channels, **kw_)) if bias else None
        if parameterization == "factorized":
            a_shape, b_shape = (num_tasks, rank, in_channels, kh, kw), (num_tasks, out_channels, rank)
        else:
            a_shape = (num_tasks, rank * kh, in_channels * kh)
            b_shape = (num_tasks, out_channels // groups * kh, rank * kh)
        self.lora_A = nn.Parameter(torch.empty(a_shape, **kw_))
        self.lora_B = nn.Parameter(torch.empty(b_shape, **kw_))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))   # exactly nn.Conv2d's init
        if self.bias is not None:
            fan_in = self.weight[0].numel()
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)
        init_lora_(self.lora_A, self.lora_B)

    @classmethod
    def from_module(cls, layer: nn.Conv2d, *, num_tasks: int, rank: int, lora_alpha: float = 1.0,
                    parameterization: str = "factorized", lora_dropout: float = 0.0):
        """A PaLoRAConv2d with ``layer``'s weight and bias (copied) and fresh adapters."""
        if not isinstance(layer, nn.Conv2d):
            raise TypeError(f"layer: expected nn.Conv2d, got {type(layer).__name__}")
        w = layer.weight
        new = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                  layer.dilation, layer.groups, layer.bias is not None, num_tasks=num_tasks, rank=rank,
                  lora_alpha=lora_alpha, parameterization=parameterization,
                  padding_mode=layer.padding_mode, lora_dropout=lora_dropout, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            new.weight.copy_(w)
            if layer.bias is not None:
                new.bias.copy_(layer.bias)
        return new

    def _conv_kwargs(self):
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}

    def _merged_weight(self, p):
        return merged_conv_weight(self.weight, self.lora_A, self.lora_B, p, self.scaling, self.parameterization,
                                  self.groups)

    def forward(self, x: torch.Tensor, preference: torch.Tensor | None = None) -> torch.Tensor:
        if self.merged:
            self._merged_call_preference(preference)
            return F.conv2d(x, self.weight, self.bias, **self._conv_kwargs())
        p = self._resolve_preference(preference)
        return palora_conv2d(x, self.weight, self.bias, self.lora_A, self.lora_B, p, self.scaling,
                             parameterization=self.parameterization, lora_dropout=self._active_dropout(),
                             **self._conv_kwargs())

    def to_conv2d(self, preference: torch.Tensor) -> nn.Conv2d:
        """A plain nn.Conv2d computing this layer at ``preference`` (T,)."""
        if self.merged:
            self._check_merged_call(preference)      # merged at another preference: raise, don't export it
        w = self.weight.detach() if self.merged else self.merged_weight(preference)
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, bias=self.bias is not None,
                         device=w.device, dtype=w.dtype, **self._conv_kwargs())
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, parameterization={self.parameterization!r}, "
                f"{self.extra_palora_repr()}")
