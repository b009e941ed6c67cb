"""Checkpoint interop: the PaLoRA reference code's state_dict, and PEFT LoRA checkpoints.

Layouts read (keys and shapes; no code of either project is used or copied):

PaLoRA reference (github.com/nik-dim/palora, ``src/callbacks/methods/ll/palora_modules.py``; its
checkpoint file, written by ``src/callbacks/utils/save_model.py``, holds ``{"state_dict": ...}``):
    linear ``<m>``:  <m>.weight (out, in), <m>.bias, <m>.lora_A.<t> (r, in), <m>.lora_B.<t> (out, r)
    conv ``<m>``:    <m>.conv.weight (C_out, C_in/g, k, k), <m>.conv.bias,
                     <m>.lora_A.<t> (r*k, C_in*k), <m>.lora_B.<t> (C_out/g*k, r*k)
    t = 0 .. T-1 (ParameterDicts), scaling lora_alpha / r, update sum_t ray_t * scaling * B_t A_t
    (convs: (B_t A_t).view(W.shape)), i.e. our ``parameterization="loralib"``.

PEFT LoRA (its LoraModel wrapper):
    full model state_dict: base_model.model.<m>.base_layer.weight / .bias,
        base_model.model.<m>.lora_A.<adapter>.weight, base_model.model.<m>.lora_B.<adapter>.weight,
        other modules base_model.model.<x>.<param>
    one saved adapter (save_pretrained / get_peft_model_state_dict): the adapter name is dropped,
        base_model.model.<m>.lora_A.weight, base_model.model.<m>.lora_B.weight; no base weights
    Linear: lora_A (r, in), lora_B (out, r). Conv2d: lora_A (r, C_in, kh, kw) (a conv with the
    base's kernel/stride/padding), lora_B (C_out, r, 1, 1): our ``parameterization="factorized"``.
    Scaling lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora; rank_pattern / alpha_pattern
    override r / alpha for modules whose name matches ``(.*\\.)?<pattern>$``. Several active
    adapters add up: y = base(x) + sum_t scaling_t B_t A_t x.

Saving (to_peft / save_peft): one PEFT adapter per task in the saved-adapter layout above, with
adapter_config.json (r and lora_alpha of the first layer, rank_pattern / alpha_pattern for layers that
differ) and adapter_model.bin (no safetensors here), plus the base model's own state_dict, since PaLoRA
trains the base. PEFT with adapter t alone then computes the model at the one-hot preference e_t.

Loading PEFT adapters into a PaLoRA layer of rank R (>= every adapter's r) and scaling s: A_t and
B_t are zero-padded to rank R and B_t is multiplied by scaling_t / s, so the layer at preference p
computes base(x) + sum_t p_t scaling_t B_t A_t x: PEFT's output with adapter t alone at p = e_t, and
with all adapters active at p = (1, ..., 1).
"""
from __future__ import annotations

import math
import re
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .model import palora_layers
from .nn import PaLoRAConv2d

StateDict = Mapping[str, torch.Tensor]
PEFT_PREFIX = "base_model.model."


def _read(source, name: str) -> Dict[str, torch.Tensor]:
    """A state_dict, a checkpoint dict holding one under "state_dict", or a path to either."""
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        source = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(source, Mapping):
        raise TypeError(f"{name}: expected a state_dict, a checkpoint with a 'state_dict' entry or a path, "
                        f"got {type(source).__name__}")
    if "state_dict" in source and isinstance(source["state_dict"], Mapping):
        source = source["state_dict"]
    return dict(source)


def _tasks(sd: Mapping[str, Any], prefix: str) -> List[str]:
    """The task keys t of <prefix>.lora_A.<t>, in order 0..T-1 (checked to be exactly those)."""
    pat = re.compile(re.escape(prefix) + r"lora_A\.([^.]+)$")
    keys = sorted((m.group(1) for k in sd for m in [pat.match(k)] if m), key=lambda t: (len(t), t))
    if keys != [str(i) for i in range(len(keys))]:
        raise ValueError(f"{prefix}lora_A: expected task keys 0..T-1, got {keys}")
    return keys


def _get(sd: Mapping[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"{name}: expected key {key!r} in the checkpoint, got none (keys near it: "
                       f"{sorted(k for k in sd if k.startswith(key.rsplit('.', 1)[0]))[:6]})")
    return sd[key]


def _pop(sd: Dict[str, torch.Tensor], key: str, name: str) -> torch.Tensor:
    value = _get(sd, key, name)
    del sd[key]
    return value


# ---------------------------------------------------------------------------------------- PaLoRA reference
def from_palora_reference(model: nn.Module, source, *, strict: bool = True) -> nn.Module:
    """Load a PaLoRA reference checkpoint (a state_dict, ``{"state_dict": ...}`` or a path) into
    ``model``: the same architecture with its layers converted by :func:`palora_kernels.convert`
    (``parameterization="loralib"`` for convs; the reference's rank and lora_alpha). Other keys
    (BatchNorm, heads) load as they are. Returns ``model``."""
    sd = _read(source, "source")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for name, layer in palora_layers(model):
        p = f"{name}." if name else ""
        tasks = _tasks(sd, p)
        if len(tasks) != layer.num_tasks:
            raise ValueError(f"{name}: expected {layer.num_tasks} tasks (the layer's num_tasks), got "
                             f"{len(tasks)} in the checkpoint ({p}lora_A.<t>)")
        if isinstance(layer, PaLoRAConv2d):
            if layer.parameterization != "loralib":
                raise ValueError(f"{name}: the PaLoRA reference's conv adapters are (B_t A_t).view(W.shape): "
                                 f"expected parameterization='loralib', got {layer.parameterization!r}")
            base = f"{p}conv."
        else:
            base = p
        out[p + "weight"] = _pop(sd, base + "weight", name)
        if layer.bias is not None:
            out[p + "bias"] = _pop(sd, base + "bias", name)
        out[p + "lora_A"] = torch.stack([_pop(sd, f"{p}lora_A.{t}", name) for t in tasks])
        out[p + "lora_B"] = torch.stack([_pop(sd, f"{p}lora_B.{t}", name) for t in tasks])
    out.update(sd)
    model.load_state_dict(out, strict=strict)
    return model


def to_palora_reference(model: nn.Module) -> Dict[str, Any]:
    """``{"state_dict": ...}`` in the PaLoRA reference code's layout (what its checkpoints hold).
    Merged layers are saved unmerged (the reference has no merged state); convs must be 'loralib'."""
    sd = model.state_dict()
    for name, layer in palora_layers(model):
        p = f"{name}." if name else ""
        conv = isinstance(layer, PaLoRAConv2d)
        if conv and layer.parameterization != "loralib":
            raise ValueError(f"{name}: the PaLoRA reference stores conv adapters as (B_t A_t).view(W.shape): "
                             f"expected parameterization='loralib', got {layer.parameterization!r}")
        sd.pop(p + "merged_preference", None)
        base = f"{p}conv." if conv else p
        for param in ("weight", "bias"):
            if p + param in sd:
                sd[base + param] = sd.pop(p + param)
        A, B = sd.pop(p + "lora_A"), sd.pop(p + "lora_B")
        for t in range(A.shape[0]):
            sd[f"{p}lora_A.{t}"], sd[f"{p}lora_B.{t}"] = A[t].clone(), B[t].clone()
    return {"state_dict": sd}


# ---------------------------------------------------------------------------------------- PEFT
def _cfg(config, field: str, default=None):
    if isinstance(config, Mapping):
        return config.get(field, default)
    return getattr(config, field, default)


def _pattern(patterns: Optional[Mapping[str, Any]], module: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the first key matching ``(.*\\.)?<key>$``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def peft_scaling(config, module: str, r: int) -> float:
    """scaling of one PEFT adapter on ``module``: lora_alpha / r, or / sqrt(r) with use_rslora."""
    alpha = _pattern(_cfg(config, "alpha_pattern"), module, _cfg(config, "lora_alpha", 8))
    if alpha is None or not math.isfinite(float(alpha)):
        raise ValueError(f"config: expected a finite lora_alpha for {module}, got {alpha!r}")
    return float(alpha) / (math.sqrt(r) if _cfg(config, "use_rslora", False) else r)


def from_peft(model: nn.Module, adapters: Union[StateDict, Sequence[StateDict]], configs: Sequence[Any], *,
              adapter_names: Optional[Sequence[str]] = None, base_state_dict: Optional[StateDict] = None,
              strict: bool = True) -> nn.Module:
    """Load PEFT LoRA adapters, one per task in task order, into ``model`` (the base architecture
    converted by :func:`palora_kernels.convert` with ``parameterization="factorized"`` for convs and a
    rank >= every adapter's r). Returns ``model``.

    adapters: either ONE full PEFT model state_dict holding several adapters, with
        ``adapter_names`` (task t is adapter ``adapter_names[t]``; base weights come from its
        ``base_layer`` keys), or a list of T saved adapters (``...lora_A.weight`` keys), with the
        base weights from ``base_state_dict`` (the base model's own state_dict) or left as they are.
    configs: one LoraConfig (or a mapping with lora_alpha, use_rslora, alpha_pattern) per task; r
        is read from the tensors (rank_pattern needs no config here).
    Ranks and alphas may differ per task: adapters are zero-padded to the layer's rank and
    scaling_t / layer.scaling is folded into lora_B (module docstring).
    """
    if adapter_names is not None:
        full = _read(adapters, "adapters")
        tasks = [{k[len(PEFT_PREFIX):]: v for k, v in full.items()} for _ in adapter_names]
        names = list(adapter_names)
    else:
        if isinstance(adapters, Mapping) or isinstance(adapters, (str, bytes)):
            raise TypeError("adapters: expected a list of saved adapters (one per task), or one full state_dict "
                            "with adapter_names, got a single state_dict without adapter_names")
        tasks = [{(k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k): v for k, v in _read(a, "adapters").items()}
                 for a in adapters]
        names = [None] * len(tasks)
    if len(configs) != len(tasks):
        raise ValueError(f"configs: expected one per task ({len(tasks)}), got {len(configs)}")
    layers = dict(palora_layers(model))
    for name, layer in layers.items():
        if len(tasks) != layer.num_tasks:
            raise ValueError(f"adapters: expected {layer.num_tasks} tasks ({name}.num_tasks), got {len(tasks)}")
        if isinstance(layer, PaLoRAConv2d) and layer.parameterization != "factorized":
            raise ValueError(f"{name}: PEFT conv adapters are a kxk conv then a 1x1 conv: expected "
                             f"parameterization='factorized', got {layer.parameterization!r}")
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict((k, v.detach().clone()) for k, v in model.state_dict().items())
    if adapter_names is not None:         # base weights and every other module from the full state_dict
        for k, v in tasks[0].items():
            if ".lora_" in k:
                continue
            out[k.replace(".base_layer.", ".")] = v
    elif base_state_dict is not None:
        out.update(_read(base_state_dict, "base_state_dict"))
    used = set()
    for name, layer in layers.items():
        A_all, B_all = torch.zeros_like(layer.lora_A), torch.zeros_like(layer.lora_B)
        for t, (sd, adapter, config) in enumerate(zip(tasks, names, configs)):
            mid = f".{adapter}" if adapter is not None else ""
            ka, kb = f"{name}.lora_A{mid}.weight", f"{name}.lora_B{mid}.weight"
            A, B = _get(sd, ka, name).to(A_all.dtype), _get(sd, kb, name).to(B_all.dtype)
            used.update({(t, ka), (t, kb)})
            r = A.shape[0]
            if r > layer.rank:
                raise ValueError(f"{name}: expected adapter ranks <= the layer's rank {layer.rank} (convert with "
                                 f"rank >= the largest r), got r = {r} for task {t}")
            if isinstance(layer, PaLoRAConv2d):
                B = B.reshape(B.shape[0], B.shape[1]) if B.dim() == 4 and B.shape[2:] == (1, 1) else B
            want_A = (r,) + tuple(layer.lora_A.shape[2:])
            want_B = (layer.lora_B.shape[1], r)
            if tuple(A.shape) != want_A or tuple(B.shape) != want_B:
                raise ValueError(f"{name}: expected lora_A {want_A} and lora_B {want_B} for task {t} (r = {r}), "
                                 f"got {tuple(A.shape)} and {tuple(B.shape)}")
            A_all[t, :r] = A
            B_all[t, :, :r] = B * (peft_scaling(config, name, r) / layer.scaling)
        out[f"{name}.lora_A"], out[f"{name}.lora_B"] = A_all, B_all
    def mine(t, k):        # a LoRA tensor of task t: any of a saved adapter's, the named adapter's of a full one
        return ".lora_" in k and (names[t] is None or f".{names[t]}." in k)
    unused = sorted(k for t, sd in enumerate(tasks) for k in sd if mine(t, k) and (t, k) not in used)
    if strict and unused:
        raise ValueError(f"adapters: expected every LoRA tensor to belong to a PaLoRA layer of the model, got "
                         f"{len(unused)} unused: {unused[:6]}")
    model.load_state_dict(out, strict=strict)
    return model


PEFT_ADAPTER_WEIGHTS = "adapter_model.bin"      # PEFT's file name without safetensors (safe_serialization=False)
PEFT_ADAPTER_CONFIG = "adapter_config.json"
BASE_WEIGHTS = "base_model.pt"


def to_peft(model: nn.Module):
    """The model as T PEFT LoRA adapters, one per task, plus the base weights.

    Returns (adapters, configs, base_state_dict):
      adapters[t]: the state_dict PEFT's save_pretrained writes for adapter t (adapter name dropped):
        ``base_model.model.<m>.lora_A.weight`` (r, in) / (r, C_in, kh, kw) and ``...lora_B.weight``
        (out, r) / (C_out, r, 1, 1);
      configs[t]: its adapter_config.json fields (peft_type LORA, r, lora_alpha, target_modules, and
        rank_pattern / alpha_pattern for layers whose rank or lora_alpha differs from the first one's);
      base_state_dict: the plain model's state_dict (``<m>.weight``, ``<m>.bias``, every other module):
        PaLoRA trains the base, so the adapters alone do not reproduce the model. Merged layers give their
        unmerged weight.
    PEFT's model with adapter t alone computes this model at the one-hot preference e_t; with all
    adapters active, at (1, ..., 1). Convs must be ``parameterization="factorized"`` and groups=1
    (PEFT's conv LoRA is a kh x kw conv then a 1x1 conv over all channels).
    """
    layers = list(palora_layers(model))
    if not layers:
        raise ValueError("model: expected at least one PaLoRA layer (convert the model first), got none")
    T = {layer.num_tasks for _, layer in layers}
    if len(T) != 1:
        raise ValueError(f"model: expected the same num_tasks in every PaLoRA layer, got {sorted(T)}")
    T = T.pop()
    sd = model.state_dict()
    base: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    lora = {}
    for name, layer in layers:
        p = f"{name}." if name else ""
        if isinstance(layer, PaLoRAConv2d) and (layer.parameterization != "factorized" or layer.groups != 1):
            raise ValueError(f"{name}: PEFT conv adapters are a kxk conv then a 1x1 conv over all channels: expected "
                             f"parameterization='factorized' and groups=1, got {layer.parameterization!r} and "
                             f"groups={layer.groups}")
        lora[name] = (sd.pop(p + "lora_A"), sd.pop(p + "lora_B"), layer)
        sd.pop(p + "merged_preference", None)
    base.update(sd)
    r0, a0 = layers[0][1].rank, layers[0][1].lora_alpha
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "inference_mode": True,
              "r": r0, "lora_alpha": a0, "lora_dropout": 0.0, "use_rslora": False, "use_dora": False,
              "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
              "layers_to_transform": None, "layers_pattern": None,
              "target_modules": sorted(lora),
              "rank_pattern": {re.escape(n): lay.rank for n, (_, _, lay) in lora.items() if lay.rank != r0},
              "alpha_pattern": {re.escape(n): lay.lora_alpha for n, (_, _, lay) in lora.items()
                                if lay.lora_alpha != a0}}
    adapters = []
    for t in range(T):
        ad: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        for name, (A, B, layer) in lora.items():
            Bt = B[t][:, :, None, None] if isinstance(layer, PaLoRAConv2d) else B[t]
            ad[f"{PEFT_PREFIX}{name}.lora_A.weight"] = A[t].clone()
            ad[f"{PEFT_PREFIX}{name}.lora_B.weight"] = Bt.clone()
        adapters.append(ad)
    return adapters, [dict(config) for _ in range(T)], base


def save_peft(model: nn.Module, directory, adapter_names: Sequence[str]) -> None:
    """Write :func:`to_peft` as PEFT lays a multi-adapter save_pretrained out without safetensors:
    ``<directory>/<adapter_names[t]>/adapter_config.json`` and ``.../adapter_model.bin`` per task, and
    the base weights in ``<directory>/base_model.pt`` (a plain state_dict of the base architecture)."""
    import json
    import os
    adapters, configs, base = to_peft(model)
    names = list(adapter_names)
    if len(names) != len(adapters) or len(set(names)) != len(names) or not all(
            isinstance(n, str) and n and "/" not in n and "." not in n for n in names):
        raise ValueError(f"adapter_names: expected {len(adapters)} distinct names (one per task) without '/' or "
                         f"'.', got {names!r}")
    os.makedirs(directory, exist_ok=True)
    torch.save(base, os.path.join(directory, BASE_WEIGHTS))
    for name, ad, cfg in zip(names, adapters, configs):
        sub = os.path.join(directory, name)
        os.makedirs(sub, exist_ok=True)
        torch.save(dict(ad), os.path.join(sub, PEFT_ADAPTER_WEIGHTS))
        with open(os.path.join(sub, PEFT_ADAPTER_CONFIG), "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)


def load_peft(model: nn.Module, directory, adapter_names: Sequence[str], *, strict: bool = True) -> nn.Module:
    """Read what :func:`save_peft` wrote (or PEFT's own per-adapter folders, adapter_model.bin, with a
    base_model.pt beside them) into ``model`` through :func:`from_peft`. Returns ``model``."""
    import json
    import os
    adapters, configs = [], []
    for name in adapter_names:
        sub = os.path.join(directory, name)
        adapters.append(_read(os.path.join(sub, PEFT_ADAPTER_WEIGHTS), "adapters"))
        with open(os.path.join(sub, PEFT_ADAPTER_CONFIG)) as f:
            configs.append(json.load(f))
    base = os.path.join(directory, BASE_WEIGHTS)
    return from_peft(model, adapters, configs, base_state_dict=base if os.path.exists(base) else None,
                     strict=strict)
