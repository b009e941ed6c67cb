"""Functional API: validate, normalise the preference, pick the backend, call the op.

Data flows module -> functional -> dispatch -> backend kernel.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from . import _rng, dispatch, reference
from ._math import conv_groups_composite, linear_composite, loralib_delta, merged_delta, stack_A, stack_B
from .ops.conv2d import PaLoRAConv2dFunction
from .ops.linear import PaLoRALinearFunction

IntPair = Union[int, Tuple[int, int]]


def _pair(v: IntPair, name: str) -> list:
    out = [v, v] if isinstance(v, int) else list(v)
    if len(out) != 2 or not all(isinstance(i, int) for i in out):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {v!r}")
    return out


def check_preference(preference, num_tasks: int, batch: Optional[int], device, name="preference"):
    """Raise a ValueError/TypeError naming ``name`` unless it is a float tensor (T,) or (batch, T).

    Shapes, dtype and device only: reading the values would synchronise with the GPU on every
    layer call. Finiteness is checked where a preference is set (:func:`check_finite`); a NaN or
    inf passed straight to ``forward`` propagates into the output, as in the naive loop."""
    if not isinstance(preference, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape ({num_tasks},) or (batch, {num_tasks}), "
                        f"got {type(preference).__name__}")
    if not preference.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {preference.dtype}")
    if preference.dim() not in (1, 2) or preference.shape[-1] != num_tasks:
        raise ValueError(f"{name}: expected shape ({num_tasks},) or (batch, {num_tasks}), "
                         f"got {tuple(preference.shape)}")
    if preference.dim() == 2 and batch is not None and preference.shape[0] != batch:
        raise ValueError(f"{name}: per-sample preference must have one row per sample: expected "
                         f"{batch} rows (x.shape[0]), got {preference.shape[0]}")
    if device is not None and preference.device != torch.device(device):
        raise ValueError(f"{name}: expected device {device} (the input's), got {preference.device}")


def check_finite(preference: torch.Tensor, name: str = "preference") -> None:
    """Raise unless every value is finite. Reads the values (a GPU sync): for set-up, not per call."""
    if preference.numel() and not bool(torch.isfinite(preference).all()):
        raise ValueError(f"{name}: expected finite values, got {preference.tolist()}")


def _check_tensor(name: str, t, dim: int, what: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor of shape {what}, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() != dim:
        raise ValueError(f"{name}: expected a {dim}-D tensor of shape {what}, got shape {tuple(t.shape)}")


def _check_shape(name: str, t: torch.Tensor, expected: tuple, what: str) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)} {what}, got {tuple(t.shape)}")


def _check_params(weight, bias, lora_A, lora_B, a_shape: tuple, b_shape: tuple, a_what: str, b_what: str):
    """Shapes, dtypes and devices of the parameters against ``weight`` (checked before)."""
    if bias is not None:
        _check_tensor("bias", bias, 1, "(out,)")
        _check_shape("bias", bias, (weight.shape[0],), "(weight.shape[0],)")
    _check_tensor("lora_A", lora_A, len(a_shape), a_what)
    T = lora_A.shape[0]
    if T < 1:
        raise ValueError(f"lora_A: expected at least one task (lora_A.shape[0] >= 1), got shape {tuple(lora_A.shape)}")
    _check_shape("lora_A", lora_A, (T,) + a_shape[1:], a_what)
    _check_tensor("lora_B", lora_B, len(b_shape), b_what)
    _check_shape("lora_B", lora_B, (T,) + b_shape[1:], b_what)
    for name, t in (("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t is None:
            continue
        if t.dtype != weight.dtype:
            raise TypeError(f"{name}: expected dtype {weight.dtype} (weight's), got {t.dtype}")
        if t.device != weight.device:
            raise ValueError(f"{name}: expected device {weight.device} (weight's), got {t.device}")


def _check_common(x, weight, lora_A, lora_B, x_dim_name: str, x_feat: int, in_feat: int):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
    if x_feat != in_feat:
        raise ValueError(f"x: expected {x_dim_name} = {in_feat}, got {x_feat} (x.shape = {tuple(x.shape)})")
    for name, t in (("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B)):
        if t.device != x.device:
            raise ValueError(f"x: expected device {t.device} (the {name}'s), got {x.device}")


def _autocast(x, *params):
    """Under autocast, run in the autocast dtype as nn.Linear / nn.Conv2d do: floating tensors are
    cast to it, except fp64 ones, which autocast leaves alone."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and dev in ("cuda", "cpu"):
        dt = torch.get_autocast_dtype(dev)
        cast = lambda t: t if t is None or t.dtype == torch.float64 else t.to(dt)  # noqa: E731
        x, params = cast(x), tuple(cast(p) for p in params)
    for p in params:
        if p is not None and p.dtype != x.dtype:
            raise TypeError(f"x: expected dtype {p.dtype} (the layer's parameters), got {x.dtype}")
    return (x,) + params


def _pref_rows(preference, N: int, batch: int, dtype):
    """(T,) or (B, T) -> (pref (P, T) in the compute dtype, rows_per_sample)."""
    pdt = torch.promote_types(dtype, torch.float32)          # fp32 scales for fp16/bf16 inputs
    if preference.dim() == 1:
        return preference.to(pdt).reshape(1, -1), max(N, 1)
    return preference.to(pdt), (N // batch if batch else 1)


def check_dropout(lora_dropout, name: str = "lora_dropout") -> float:
    """A dropout probability in [0, 1), as a float."""
    if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, (int, float)) \
            or not 0.0 <= lora_dropout < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {lora_dropout!r}")
    return float(lora_dropout)


def _dropout_state(lora_dropout, dropout_seed, numel: int):
    """None (no dropout) or (p, seed, offset); draws (seed, offset) from torch's default generator
    unless given (docs/dropout.md). Call after every check: a failed call must not consume it."""
    if lora_dropout == 0.0:
        return None
    if dropout_seed is None:
        return (lora_dropout,) + _rng.draw_seed_offset(numel)
    seed, offset = dropout_seed
    if not (isinstance(seed, int) and isinstance(offset, int) and 0 <= seed < 2**63 and 0 <= offset
            and offset + numel < 2**63):
        raise ValueError(f"dropout_seed: expected (seed, offset), ints >= 0 with offset + x.numel() < 2**63, "
                         f"got {dropout_seed!r}")
    return (lora_dropout, seed, offset)


def palora_linear(x, weight, bias, lora_A, lora_B, preference, scale: float, *,
                  lora_dropout: float = 0.0, dropout_seed: Optional[Tuple[int, int]] = None,
                  backend: Optional[str] = None):
    """y = x W^T + b + scale * sum_t p_t (x~ A_t^T) B_t^T,  x~ = x under LoRA dropout, else x.

    x: (..., in); weight: (out, in); bias: (out,) or None; lora_A: (T, r, in);
    lora_B: (T, out, r); preference: (T,) or (B, T) with B = x.shape[0] (a row applies to
    every position of its sample). Returns (..., out).
    lora_dropout: p in [0, 1); p > 0 drops elements of the adapters' input only (the base sees x),
    x~ = x * mask / (1-p), the mask regenerated in the backward (docs/dropout.md). Pass 0 in eval.
    dropout_seed: (seed, offset) of the mask; default: drawn from torch's default CPU generator.
    """
    lora_dropout = check_dropout(lora_dropout)
    _check_tensor("weight", weight, 2, "(out, in)")
    out_f, in_f = weight.shape
    r = lora_A.shape[1] if isinstance(lora_A, torch.Tensor) and lora_A.dim() == 3 else -1
    _check_params(weight, bias, lora_A, lora_B, (-1, r, in_f), (-1, out_f, r),
                  "(T, rank, in) with in = weight.shape[1]", "(T, out, rank) with out = weight.shape[0]")
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        raise ValueError(f"x: expected a tensor of shape (..., {in_f}), got a 0-D tensor")
    _check_common(x, weight, lora_A, lora_B, "x.shape[-1] (in_features)", x.shape[-1] if x.dim() else -1,
                  weight.shape[1])
    per_sample = isinstance(preference, torch.Tensor) and preference.dim() == 2
    if per_sample and x.dim() < 2:
        raise ValueError(f"x: a per-sample preference needs x of shape (batch, ..., in), got {tuple(x.shape)}")
    check_preference(preference, lora_A.shape[0], x.shape[0] if x.dim() >= 2 else None, x.device)
    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    op = "lora_mm_dropout" if lora_dropout else "lora_mm"
    name = dispatch.select_backend(x.device, op, x.dtype, backend)
    drop = _dropout_state(lora_dropout, dropout_seed, x.numel())
    if dispatch.is_composite(name, op):   # same output dtype as the kernels: x's
        kw = {} if drop is None else {"x_lora": _rng.dropout_input(x, *drop)}
        return dispatch.kernel(name, op)(x, weight, bias, lora_A, lora_B, preference, scale, **kw).to(x.dtype)
    lead = x.shape[:-1]
    x2 = x.reshape(math.prod(lead), x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    pref, L = _pref_rows(preference, x2.shape[0], x.shape[0] if per_sample else 1, x.dtype)
    if 0 in x2.shape or 0 in lora_A.shape or weight.shape[0] == 0:
        # zero-size: no kernel to launch; the stacked form in torch ops gives nn.Linear's answer (the
        # bias for in = 0, empty for N = 0) and zero gradients, on every backend
        y = linear_composite(x2, weight, lora_A, lora_B, pref.to(x.dtype), L, float(scale), drop)
        return (y if bias is None else y + bias).reshape(*lead, weight.shape[0])
    y = PaLoRALinearFunction.apply(x2, weight, bias, lora_A, lora_B, pref, L, float(scale), name, drop)
    return y.reshape(*lead, weight.shape[0])


def _resolve_padding(padding, x, kernel, stride, dilation):
    """nn.Conv2d's padding: an int, a pair, "valid" (0) or "same" (stride 1; total padding
    dilation*(k-1) per dim, half on each side, the odd one on the bottom/right as torch does it).
    Returns (x, symmetric padding): x padded by the odd remainder where there is one."""
    if not isinstance(padding, str):
        return x, _pair(padding, "padding")
    if padding == "valid":
        return x, [0, 0]
    if padding != "same":
        raise ValueError(f"padding: expected an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    if any(s != 1 for s in stride):
        raise ValueError(f"padding: 'same' needs stride 1 (as nn.Conv2d), got stride {tuple(stride)}")
    total = [d * (k - 1) for d, k in zip(dilation, kernel)]
    half = [t // 2 for t in total]
    extra = [t - 2 * h for t, h in zip(total, half)]
    if any(extra):
        x = F.pad(x, [0, extra[1], 0, extra[0]])
    return x, half


def palora_conv2d(x, weight, bias, lora_A, lora_B, preference, scale: float, *,
                  stride: IntPair = 1, padding: Union[IntPair, str] = 0, dilation: IntPair = 1,
                  groups: int = 1, parameterization: str = "factorized", lora_dropout: float = 0.0,
                  dropout_seed: Optional[Tuple[int, int]] = None, backend: Optional[str] = None):
    """Conv2d + scale * sum_t p_t * adapter_t(x~),  x~ = x under LoRA dropout, else x.

    x: (N, C_in, H, W); weight: (C_out, C_in/groups, kh, kw); bias: (C_out,) or None.
    factorized: lora_A (T, r, C_in, kh, kw), lora_B (T, C_out, r) (full-channel, also for groups > 1).
    loralib (the PaLoRA reference's): lora_A (T, r*k, C_in*k), lora_B (T, C_out/groups*k, r*k),
    update (B_t A_t).view(W.shape), grouped as W is.
    padding: int, pair, "same" or "valid" as nn.Conv2d. preference: (T,) or (N, T).
    lora_dropout, dropout_seed: as :func:`palora_linear`; the mask is over x's logical NCHW elements
    (factorized only: loralib's adapter has no input of its own, see docs/dropout.md).
    Returns (N, C_out, Ho, Wo).
    """
    if parameterization not in ("factorized", "loralib"):
        raise ValueError(f"parameterization: expected 'factorized' or 'loralib', got {parameterization!r}")
    lora_dropout = check_dropout(lora_dropout)
    if lora_dropout and parameterization == "loralib":
        raise ValueError(f"lora_dropout: parameterization='loralib' folds its update into the conv weight and has "
                         f"no adapter input to drop (loralib's ConvLoRA ignores its lora_dropout too); use "
                         f"parameterization='factorized' or lora_dropout=0, got lora_dropout={lora_dropout}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups: expected an int >= 1, got {groups!r}")
    if isinstance(x, torch.Tensor) and x.dim() != 4:
        raise ValueError(f"x: expected a 4-D tensor (N, C_in, H, W), got shape {tuple(x.shape)}")
    _check_tensor("weight", weight, 4, "(C_out, C_in/groups, kh, kw)")
    C_out, C_in, kh, kw = weight.shape
    # zero-size channels and images: nn.Conv2d raises for C_out = 0 and for an empty image (H or W = 0) and
    # returns a tensor with 0 channels, not C_out, for C_in = 0; all three are refused here, on every backend
    if C_out == 0 or C_in == 0:
        raise ValueError(f"weight: expected C_out = weight.shape[0] >= 1 and C_in/groups = weight.shape[1] >= 1, "
                         f"got shape {tuple(weight.shape)}")
    if isinstance(x, torch.Tensor) and (x.shape[2] == 0 or x.shape[3] == 0):
        raise ValueError(f"x: expected an image of H, W >= 1 (nn.Conv2d takes only a zero batch or zero "
                         f"channels), got shape {tuple(x.shape)}")
    if C_out % groups:
        raise ValueError(f"weight: expected C_out = weight.shape[0] divisible by groups = {groups}, got {C_out}")
    C_in *= groups
    if parameterization == "factorized":
        r = lora_A.shape[1] if isinstance(lora_A, torch.Tensor) and lora_A.dim() == 5 else -1
        _check_params(weight, bias, lora_A, lora_B, (-1, r, C_in, kh, kw), (-1, C_out, r),
                      "(T, rank, C_in, kh, kw) as weight", "(T, C_out, rank)")
    else:
        if kh != kw:
            raise ValueError(f"weight: parameterization='loralib' needs a square kernel, got {kh}x{kw}")
        rk = lora_A.shape[1] if isinstance(lora_A, torch.Tensor) and lora_A.dim() == 3 else -1
        if rk % kh:
            raise ValueError(f"lora_A: expected shape (T, rank*{kh}, {C_in * kh}) (loralib), got {tuple(lora_A.shape)}")
        _check_params(weight, bias, lora_A, lora_B, (-1, rk, C_in * kh), (-1, C_out // groups * kh, rk),
                      "(T, rank*k, C_in*k) (loralib)", "(T, C_out/groups*k, rank*k) (loralib)")
    _check_common(x, weight, lora_A, lora_B, "x.shape[1] (in_channels)", x.shape[1], C_in)
    check_preference(preference, lora_A.shape[0], x.shape[0], x.device)
    stride, dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
    for name, v in (("stride", stride), ("dilation", dilation)):
        if min(v) < 1:
            raise ValueError(f"{name}: expected values >= 1, got {tuple(v)}")
    x, padding = _resolve_padding(padding, x, (kh, kw), stride, dilation)
    if min(padding) < 0:
        raise ValueError(f"padding: expected values >= 0, got {tuple(padding)}")
    for i, (size, k) in enumerate(zip(x.shape[2:], (kh, kw))):
        if size + 2 * padding[i] < dilation[i] * (k - 1) + 1:
            raise ValueError(f"x: expected a padded input at least as large as the dilated kernel "
                             f"{dilation[0] * (kh - 1) + 1}x{dilation[1] * (kw - 1) + 1}, got "
                             f"{x.shape[2]}x{x.shape[3]} with padding {tuple(padding)}")
    x, weight, bias, lora_A, lora_B = _autocast(x, weight, bias, lora_A, lora_B)
    op = "loralib_conv2d" if parameterization == "loralib" else "lora_conv2d_dropout" if lora_dropout else "lora_conv2d"
    if groups > 1:
        want = dispatch.requested_backend(backend)
        if want not in (None, "torch", "reference"):
            raise RuntimeError(f"backend {want!r} was requested for a grouped conv (groups={groups}) but has no "
                               "grouped kernel: groups > 1 runs on 'torch' (cuDNN/oneDNN grouped conv plus the "
                               "adapter) or 'reference'")
        drop = _dropout_state(lora_dropout, dropout_seed, x.numel())
        x_lora = x if drop is None else _rng.dropout_input(x, *drop)    # autograd saves it: no fused grouped path
        if want == "reference":
            return reference.palora_conv2d(x, weight, bias, lora_A, lora_B, preference, scale, stride, padding,
                                           dilation, parameterization, groups=groups, x_lora=x_lora).to(x.dtype)
        pref, _ = _pref_rows(preference, x.shape[0], x.shape[0], x.dtype)
        return conv_groups_composite(x, weight, bias, lora_A, lora_B, pref, float(scale), stride, padding,
                                      dilation, groups, parameterization, x_lora=x_lora)
    name = dispatch.select_backend(x.device, op, x.dtype, backend)
    drop = _dropout_state(lora_dropout, dropout_seed, x.numel())
    if dispatch.is_composite(name, op):
        kw = {} if drop is None else {"x_lora": _rng.dropout_input(x, *drop)}
        return dispatch.kernel(name, op)(x, weight, bias, lora_A, lora_B, preference, scale, stride, padding,
                                         dilation, parameterization, **kw).to(x.dtype)
    pref, _ = _pref_rows(preference, x.shape[0], x.shape[0], x.dtype)
    return PaLoRAConv2dFunction.apply(x, weight, bias, lora_A, lora_B, pref, stride, padding, dilation,
                                      float(scale), name, drop)


def merged_linear_weight(weight, lora_A, lora_B, preference, scale):
    """W + s B_cat diag(p) A_cat for a per-batch preference p (T,): (out, in)."""
    return weight + merged_delta(stack_A(lora_A), stack_B(lora_B), preference, lora_A.shape[1], scale)


def merged_conv_weight(weight, lora_A, lora_B, preference, scale, parameterization, groups: int = 1):
    """The conv weight that computes the layer at a per-batch preference p (T,)."""
    if parameterization == "factorized" and groups > 1:
        raise ValueError(f"groups: a factorized adapter on a grouped conv (groups={groups}) mixes all channels and "
                         "cannot fold into the grouped weight; merge needs groups=1 or parameterization='loralib'")
    if parameterization == "loralib":
        deltas = loralib_delta(lora_A, lora_B, weight.shape)
        return weight + torch.tensordot(preference.to(weight.dtype) * scale, deltas, dims=1)
    T, r = lora_A.shape[:2]
    delta = merged_delta(stack_A(lora_A).flatten(1), stack_B(lora_B), preference, r, scale)
    return weight + delta.view(weight.shape)
