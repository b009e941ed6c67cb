"""convert_mtlora: put MTLoRA's layers into a model where the MTLoRA reference code puts them."""
from __future__ import annotations

import logging
from typing import Mapping, Optional, Sequence, Union

from torch import nn

from .model import Patterns, _matches
from .nn.mtlora import MTLoRALinear

log = logging.getLogger("palora_kernels")


def _default_task_specific(model: nn.Module, targets) -> set:
    """The reference's placement (Swin, models/swin_transformer_mtlora.py): task-specific adapters in
    the last block of each stage -- the last entry of every ModuleList named ``blocks`` -- on every
    target linear there except ``qkv`` (the reference builds qkv with tasks=None)."""
    names = {n for n, _ in targets}
    picked = set()
    for lname, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and lname.rpartition(".")[2] == "blocks" and len(mod):
            last = f"{lname}.{len(mod) - 1}."
            picked |= {n for n in names if n.startswith(last) and n.rpartition(".")[2] != "qkv"}
    return picked


def convert_mtlora(model: nn.Module, tasks: Sequence[str], r: Union[int, Mapping[str, int]], *,
                   lora_shared_scale: float = 1.0, lora_task_scale: Union[float, Mapping[str, float]] = 1.0,
                   lora_dropout: float = 0.0, shared_mode: str = "matrix", trainable_scale_shared: bool = False,
                   trainable_scale_per_task: bool = False, target_modules: Patterns = None,
                   task_specific_modules: Optional[Patterns] = None, freeze_base: bool = True) -> nn.Module:
    """Swap the target nn.Linear layers of ``model`` for MTLoRALinear, in place; returns ``model``.

    Every target gets the task-agnostic (shared) adapter; the ``task_specific_modules`` among them also
    get one adapter per task (the reference's TS-LoRA, built with ``tasks``; the others are built with
    tasks=None and return (y, None)). target_modules / task_specific_modules: None, a regex matched
    against the full module name, or a list of names (equal, or ending with '.' + name), as in PEFT.
    task_specific_modules=None places TS-LoRA as the reference does: the last block of each stage
    (the last entry of every ModuleList named ``blocks``), on every target there but ``qkv``.
    The layers return (y, {task: y_t} or None) and take (x, x_tasks), as the reference's: the model's
    forward must thread the task outputs along as the reference Swin does. The base weights are copied;
    freeze_base=True sets requires_grad=False on them (MTLoRA's FREEZE_PRETRAINED for these layers;
    the rest of the model is left as it is). A call that raises leaves the model as it was.
    """
    targets = [(n, m) for n, m in model.named_modules()
               if n and type(m) is nn.Linear and (target_modules is None or _matches(n, target_modules))]
    if not targets:
        raise ValueError(f"target_modules: no nn.Linear of the model matches {target_modules!r}")
    if task_specific_modules is None:
        ts = _default_task_specific(model, targets)
    else:
        ts = {n for n, _ in targets if _matches(n, task_specific_modules)}
        if not ts:
            raise ValueError(f"task_specific_modules: none of the target linears matches {task_specific_modules!r}")
    kw = dict(r=r, lora_shared_scale=lora_shared_scale, lora_task_scale=lora_task_scale, lora_dropout=lora_dropout,
              trainable_scale_shared=trainable_scale_shared, trainable_scale_per_task=trainable_scale_per_task,
              shared_mode=shared_mode)
    swaps = []
    for name, mod in targets:
        try:
            new = MTLoRALinear.from_linear(mod, tasks=list(tasks) if name in ts else None, **kw)
        except (TypeError, ValueError) as exc:      # name the module: the message alone names an argument
            raise type(exc)(f"{name} (nn.Linear): {exc}") from exc
        if freeze_base:
            new.linear.requires_grad_(False)
        swaps.append((name, new))
    for name, new in swaps:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    log.debug("convert_mtlora: %d layers, task-specific: %s", len(swaps), sorted(ts))
    return model
