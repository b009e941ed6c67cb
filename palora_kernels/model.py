"""Model-level helpers: swap layers in, set preferences, export merged copies."""
from __future__ import annotations

import contextlib
import copy
import logging
import re
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import nn

from .functional import check_finite, check_preference
from .nn import PaLoRAConv2d, PaLoRALinear

log = logging.getLogger("palora_kernels")
Patterns = Optional[Union[str, Sequence[str]]]
PALORA_LAYERS = (PaLoRALinear, PaLoRAConv2d)


def _matches(name: str, patterns: Patterns) -> bool:
    """PEFT's rule: a string is a regex matched against the full name; a list matches a name
    equal to an entry or ending with '.' + entry."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def palora_layers(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, PALORA_LAYERS))


def convert(model: nn.Module, num_tasks: int, rank: int, target_modules: Patterns = None,
            exclude: Patterns = None, *, lora_alpha: float = 1.0,
            parameterization: str = "factorized", lora_dropout: float = 0.0) -> nn.Module:
    """Swap nn.Linear / nn.Conv2d layers of ``model`` for PaLoRA layers, in place; returns ``model``.

    target_modules: None (every Linear and Conv2d), a regex matched against the full module
    name, or a list of names (a module matches when its name equals one or ends with
    '.' + one), as in PEFT. exclude: the same forms, applied after. Grouped convolutions and
    padding="same"/"valid" are converted as well (see PaLoRAConv2d); an error names the module.
    lora_dropout: every new layer's (docs/dropout.md); the loralib conv parameterisation refuses p > 0.
    A call that raises leaves the model as it was (every new layer is built before any swap).
    """
    targets = []
    for name, mod in model.named_modules():
        if not name or not isinstance(mod, (nn.Linear, nn.Conv2d)) or isinstance(mod, PALORA_LAYERS):
            continue
        if target_modules is not None and not _matches(name, target_modules):
            continue
        if exclude is not None and _matches(name, exclude):
            continue
        targets.append((name, mod))
    if target_modules is not None and not targets:
        raise ValueError(f"target_modules: no nn.Linear/nn.Conv2d of the model matches {target_modules!r}")
    swaps = []
    for name, mod in targets:
        try:
            if isinstance(mod, nn.Linear):
                new = PaLoRALinear.from_module(mod, num_tasks=num_tasks, rank=rank, lora_alpha=lora_alpha,
                                               lora_dropout=lora_dropout)
            else:
                new = PaLoRAConv2d.from_module(mod, num_tasks=num_tasks, rank=rank, lora_alpha=lora_alpha,
                                               parameterization=parameterization, lora_dropout=lora_dropout)
        except (TypeError, ValueError) as exc:     # name the module: the message alone names an argument
            raise type(exc)(f"{name} ({type(mod).__name__}): {exc}") from exc
        swaps.append((name, new))
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def set_preference(model: nn.Module, preference: Optional[torch.Tensor]) -> None:
    """Set the default preference of every PaLoRA layer in ``model`` (None clears it)."""
    layers = [m for _, m in palora_layers(model)]
    if not layers:
        raise ValueError("model: expected at least one PaLoRA layer (use palora_kernels.convert first), got none")
    for m in layers:   # validate all before setting any: a failed call changes nothing
        if preference is not None and m.num_tasks != layers[0].num_tasks:
            raise ValueError("model: layers disagree on num_tasks; set preferences per layer")
    if preference is not None:
        check_preference(preference, layers[0].num_tasks, None, None)
        check_finite(preference)
        for name, m in palora_layers(model):     # a merged layer computes its merged preference only
            if m.merged:
                try:
                    m._check_merged_call(preference)
                except ValueError as exc:
                    raise ValueError(f"{name or type(m).__name__}: {exc}") from None
    for m in layers:
        m._preference = preference


@contextlib.contextmanager
def preference(model: nn.Module, preference: torch.Tensor):
    """``with preference(model, p):`` -- every PaLoRA layer uses ``p``; the old ones come back after."""
    saved = [(m, m._preference) for _, m in palora_layers(model)]
    set_preference(model, preference)
    try:
        yield model
    finally:
        for m, p in saved:
            m._preference = p


@torch.no_grad()
def export_merged(model: nn.Module, preference: torch.Tensor) -> nn.Module:
    """A deep copy of ``model`` with every PaLoRA layer replaced by a plain nn.Linear / nn.Conv2d
    computing it at ``preference`` (T,), for deployment at one trade-off."""
    out = copy.deepcopy(model)
    for name, mod in list(palora_layers(out)):
        plain = mod.to_linear(preference) if isinstance(mod, PaLoRALinear) else mod.to_conv2d(preference)
        parent_name, _, child = name.rpartition(".")
        if not name:
            return plain
        setattr(out.get_submodule(parent_name) if parent_name else out, child, plain)
    return out
