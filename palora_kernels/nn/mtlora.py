"""MTLoRALinear and MTLoRAQKV: drop-ins for the layers of the MTLoRA reference code (Agiza et al.,
CVPR 2024; models/lora.py of github.com/scale-lab/MTLoRA), run by one fused op (docs/mtlora.md).

Same constructor arguments, parameter and buffer names, initialisation and
``forward(x, x_tasks=None) -> (y, {task: y_t} or None)``:

    pretrained = x W^T + b                       (computed once, for every output)
    matrix:    y = pretrained + s_sh (x A_sh^T) B_sh^T         y_t = pretrained + s_t (x_t A_t^T) B_t^T
    matrixv2:  as matrix, and every y_t also gets the shared term
    addition:  y = pretrained + LayerNorm(sum_t y_t)           (no shared adapter; lora_norm)
    lora_only: no task adapters (tasks is ignored), y as matrix; also any mode with tasks=None
x_t = x_tasks[t] when given, else x. The scales multiply directly (no alpha / r), as the reference.
LoRA dropout drops the adapters' input x (one mask for the shared and, without task inputs, the
task adapters, as the reference's single dropout call); task inputs are not dropped.

Accepted beyond the reference (which raises on these): an int ``r`` with tasks (every task gets
it), a float ``lora_task_scale`` without trainable scales, a mapping with trainable ones.
"""
from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Union

import torch
from torch import nn

from ..ops.mtlora import mtlora_linear

MODES = ("matrix", "matrixv2", "add", "addition", "lora_only")


def _per_task(name: str, value, tasks, kind):
    if isinstance(value, Mapping):
        missing = [t for t in tasks if t not in value]
        if missing:
            raise ValueError(f"{name}: expected a value for every task, missing {missing} (got keys {list(value)})")
        return {t: kind(value[t]) for t in tasks}
    return {t: kind(value) for t in tasks}


def _save_unmerged(module, state_dict, prefix, local_metadata):
    """A merged layer saves its unmerged weight: the checkpoint stays the reference's (and loads unmerged)."""
    if module.merged:
        w = module._unmerged_weight
        key = prefix + "linear.weight"
        state_dict[key] = w if isinstance(state_dict.get(key), nn.Parameter) else w.detach()


class MTLoRALinear(nn.Module):
    """nn.Linear with a task-agnostic LoRA and task-specific LoRAs; T + 1 outputs.

    x: (..., in_features); x_tasks: {task: (..., in_features)} or None.
    Returns (y (..., out_features), {task: (..., out_features)} or None).
    """

    def __init__(self, in_features: int, out_features: int, r: Union[int, Mapping[str, int]] = 0,
                 lora_shared_scale: float = 1.0, lora_task_scale: Union[float, Mapping[str, float]] = 1.0,
                 lora_dropout: float = 0.0, tasks=None, trainable_scale_shared: bool = False,
                 trainable_scale_per_task: bool = False, shared_mode: str = "matrix", **kwargs):
        super().__init__()
        if shared_mode not in MODES:
            raise ValueError(f"shared_mode: expected one of {', '.join(MODES)}, got {shared_mode!r}")
        if not isinstance(lora_dropout, (int, float)) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout: expected a probability in [0, 1), got {lora_dropout!r}")
        shared_mode = "addition" if shared_mode == "add" else shared_mode
        if shared_mode == "lora_only":
            tasks = None
        if tasks is None:
            shared_mode = "matrix"
        tasks = list(tasks) if tasks is not None else None
        if isinstance(r, bool) or not isinstance(r, (int, Mapping)):
            raise TypeError(f"r: expected an int or a mapping with 'shared' and one rank per task, got {r!r}")
        if isinstance(r, int):
            r = {"shared": r, **({t: r for t in tasks} if tasks else {})}
        if "shared" not in r:
            raise ValueError(f"r: expected a key 'shared', got keys {list(r)}")
        ranks = {"shared": int(r["shared"]), **_per_task("r", r, tasks or [], int)}
        if any(v < 0 for v in ranks.values()):
            raise ValueError(f"r: expected ranks >= 0, got {ranks}")
        # the reference's LoRALayer attributes
        self.r = ranks["shared"]
        self.lora_alpha = lora_shared_scale
        self.lora_dropout = nn.Dropout(p=lora_dropout) if lora_dropout > 0.0 else nn.Identity()
        self.lora_dropout_p = float(lora_dropout)
        self.merged = False
        self.linear = nn.Linear(in_features, out_features, **kwargs)
        self.in_features, self.out_features = in_features, out_features
        self.tasks = tasks
        self.shared_mode = shared_mode
        self.ranks = ranks
        self.merged_output: Optional[str] = None
        self._unmerged_weight: Optional[torch.Tensor] = None
        self._register_state_dict_hook(_save_unmerged)
        if self.r > 0:
            w = self.linear.weight
            fkw = {"device": w.device, "dtype": w.dtype}
            if tasks is not None:
                self.lora_tasks_A = nn.ParameterDict({t: nn.Parameter(torch.zeros(ranks[t], in_features, **fkw))
                                                      for t in tasks})
                self.lora_tasks_B = nn.ParameterDict({t: nn.Parameter(torch.zeros(out_features, ranks[t], **fkw))
                                                      for t in tasks})
                task_scales = _per_task("lora_task_scale", lora_task_scale, tasks, float)
                if trainable_scale_per_task:   # (1,) fp32, as the reference's torch.FloatTensor([s])
                    self.lora_task_scale = nn.ParameterDict({t: nn.Parameter(torch.tensor(
                        [task_scales[t]], dtype=torch.float32, device=w.device)) for t in tasks})
                else:
                    self.lora_task_scale = task_scales
            if shared_mode == "addition":
                self.lora_norm = nn.LayerNorm(out_features, **fkw)
            else:
                self.lora_shared_A = nn.Parameter(torch.zeros(self.r, in_features, **fkw))
                self.lora_shared_B = nn.Parameter(torch.zeros(out_features, self.r, **fkw))
            if trainable_scale_shared:
                self.lora_shared_scale = nn.Parameter(torch.tensor([float(lora_shared_scale)], dtype=torch.float32,
                                                                   device=w.device))
            else:
                self.lora_shared_scale = lora_shared_scale
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's order: shared A, then each task's A (kaiming-uniform, a=sqrt(5)); B zeros.
        The base layer is left alone (it holds pretrained weights)."""
        with torch.no_grad():
            if hasattr(self, "lora_shared_A"):
                nn.init.kaiming_uniform_(self.lora_shared_A, a=math.sqrt(5))
                nn.init.zeros_(self.lora_shared_B)
            if hasattr(self, "lora_tasks_A"):
                for t in self.tasks:
                    nn.init.kaiming_uniform_(self.lora_tasks_A[t], a=math.sqrt(5))
                    nn.init.zeros_(self.lora_tasks_B[t])

    @classmethod
    def from_linear(cls, layer: nn.Linear, **kwargs) -> "MTLoRALinear":
        """An MTLoRALinear with ``layer``'s weight and bias (copied) and fresh adapters; kwargs as __init__."""
        if not isinstance(layer, nn.Linear):
            raise TypeError(f"layer: expected nn.Linear, got {type(layer).__name__}")
        w = layer.weight
        new = cls(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device,
                  dtype=w.dtype, **kwargs)
        with torch.no_grad():
            new.linear.weight.copy_(w)
            if layer.bias is not None:
                new.linear.bias.copy_(layer.bias)
        return new

    # -- what the fused op needs -----------------------------------------------------------------
    @property
    def _has_task_adapters(self) -> bool:
        return self.r > 0 and self.tasks is not None

    def _adapters(self):
        """(A list, B list, scale list) over adapters 0 (shared) .. T; a rank-0 shared adapter in addition mode."""
        w = self.linear.weight
        if hasattr(self, "lora_shared_A"):
            A, B, S = [self.lora_shared_A], [self.lora_shared_B], [self.lora_shared_scale]
        else:   # addition: no shared adapter, and its scale (even a trainable one) is not used, as the reference
            A, B, S = [w.new_zeros(0, self.in_features)], [w.new_zeros(self.out_features, 0)], [0.0]
        for t in self.tasks or []:
            A.append(self.lora_tasks_A[t])
            B.append(self.lora_tasks_B[t])
            S.append(self.lora_task_scale[t])
        return A, B, S

    def _task_inputs(self, x_tasks):
        if x_tasks is None or not self._has_task_adapters:
            return None
        if not isinstance(x_tasks, Mapping):
            raise TypeError(f"x_tasks: expected a dict {{task: tensor}} or None, got {type(x_tasks).__name__}")
        missing = [t for t in self.tasks if t not in x_tasks]
        if missing:
            raise ValueError(f"x_tasks: expected an input for every task {self.tasks}, missing {missing}")
        return [x_tasks[t] for t in self.tasks]

    def _finish(self, Y):
        """Y (T+1, ..., out) -> (y, {task: y_t} or None), with the addition mode's LayerNorm."""
        if not self._has_task_adapters:
            return Y[0], None
        tasks = {t: Y[i + 1] for i, t in enumerate(self.tasks)}
        if self.shared_mode == "addition":
            return Y[0] + self.lora_norm(Y[1:].sum(0)), tasks
        return Y[0], tasks

    def forward(self, x: torch.Tensor, x_tasks: Optional[Dict[str, torch.Tensor]] = None, *,
                backend: Optional[str] = None):
        if self.r == 0:
            return self.linear(x), None
        if self.merged:
            if x_tasks is not None:
                raise ValueError(f"x_tasks: the layer is merged at output {self.merged_output!r} and computes it "
                                 "from x alone; unmerge() to pass task inputs")
            return self.linear(x), None
        A, B, S = self._adapters()
        Y = mtlora_linear(x, self._task_inputs(x_tasks), [self.linear.weight], [self.linear.bias], [A], [B], [S],
                          shared_to_tasks=self.shared_mode == "matrixv2", dropout=self.lora_dropout_p,
                          training=self.training, backend=backend)
        return self._finish(Y)

    # -- deployment -------------------------------------------------------------------------------
    def _delta(self, output: str) -> torch.Tensor:
        names = ["shared"] + list(self.tasks or [])
        if output not in names:
            raise ValueError(f"output: expected one of {names}, got {output!r}")
        if output == "shared" and self.shared_mode == "addition":
            raise ValueError("output: the shared output of shared_mode='addition' is LayerNorm(sum of task outputs), "
                             "not linear in x; it cannot be merged into one weight (merge a task output instead)")
        A, B, S = self._adapters()
        o = names.index(output)
        feeds = (0,) if o == 0 else ((0, o) if self.shared_mode == "matrixv2" else (o,))
        w = self.linear.weight
        delta = torch.zeros_like(w)
        for a in feeds:
            s = S[a].to(w.dtype).reshape(()) if isinstance(S[a], torch.Tensor) else float(S[a])
            delta += (B[a] @ A[a]) * s
        return delta

    @torch.no_grad()
    def merge(self, output: str = "shared") -> None:
        """Fold the adapters of one output ('shared' or a task name) into linear.weight for deployment:
        forward(x) then returns (that output, None) from one plain GEMM. unmerge() restores exactly."""
        if self.r == 0:
            raise RuntimeError("merge: the layer has no adapters (r['shared'] == 0)")
        if self.merged:
            raise RuntimeError(f"merge: already merged at output {self.merged_output!r}; unmerge() first")
        delta = self._delta(output)
        self._unmerged_weight = self.linear.weight.detach().clone()   # kept, not subtracted back: exact
        self.linear.weight.add_(delta)
        self.merged, self.merged_output = True, output

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore linear.weight bit for bit."""
        if not self.merged:
            raise RuntimeError("unmerge: the layer is not merged")
        self.linear.weight.copy_(self._unmerged_weight)
        self._unmerged_weight, self.merged, self.merged_output = None, False, None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.merged:       # load into the unmerged layer; it stays unmerged
            self.unmerge()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"shared_mode={self.shared_mode!r}, r={self.ranks}, tasks={self.tasks}, "
                f"dropout={self.lora_dropout_p}, merged={self.merged_output!r}")


class MTLoRAQKV(nn.Module):
    """q, k, v as three MTLoRALinear (in_features -> out_features each; names q.*, k.*, v.*, as the
    reference), run as ONE fused op over the concatenated weights. Returns
    (y (..., 3*out_features), {task: (..., 3*out_features)} or None), each the concatenation [q | k | v]."""

    def __init__(self, in_features: int, out_features: int, r: Union[int, Mapping[str, int]] = 0,
                 lora_shared_scale: float = 1.0, lora_task_scale: Union[float, Mapping[str, float]] = 1.0,
                 lora_dropout: float = 0.0, tasks=None, trainable_scale_shared: bool = False,
                 trainable_scale_per_task: bool = False, shared_mode: str = "matrix", **kwargs):
        super().__init__()
        kw = dict(r=r, lora_shared_scale=lora_shared_scale, lora_task_scale=lora_task_scale,
                  lora_dropout=lora_dropout, tasks=tasks, trainable_scale_shared=trainable_scale_shared,
                  trainable_scale_per_task=trainable_scale_per_task, shared_mode=shared_mode, **kwargs)
        self.q = MTLoRALinear(in_features, out_features, **kw)
        self.k = MTLoRALinear(in_features, out_features, **kw)
        self.v = MTLoRALinear(in_features, out_features, **kw)
        self.tasks = self.q.tasks
        self.r, self.lora_alpha = self.q.r, lora_shared_scale

    def reset_parameters(self) -> None:
        self.q.reset_parameters()
        self.k.reset_parameters()
        self.v.reset_parameters()

    @property
    def merged(self) -> bool:
        return self.q.merged

    def forward(self, x: torch.Tensor, x_tasks: Optional[Dict[str, torch.Tensor]] = None, *,
                backend: Optional[str] = None):
        parts = (self.q, self.k, self.v)
        if self.q.r == 0 or self.merged:
            outs = [m(x, x_tasks) for m in parts]
            return torch.cat([o[0] for o in outs], dim=-1), None
        adapters = [m._adapters() for m in parts]
        Y = mtlora_linear(x, self.q._task_inputs(x_tasks), [m.linear.weight for m in parts],
                          [m.linear.bias for m in parts], [a[0] for a in adapters], [a[1] for a in adapters],
                          [a[2] for a in adapters], shared_to_tasks=self.q.shared_mode == "matrixv2",
                          dropout=self.q.lora_dropout_p, training=self.training, backend=backend)
        if self.q.shared_mode == "addition":   # LayerNorm per q/k/v part, each with its own lora_norm
            M = self.q.out_features
            ys, tasks = zip(*[m._finish(Y[..., i * M:(i + 1) * M]) for i, m in enumerate(parts)])
            return torch.cat(ys, dim=-1), {t: torch.cat([d[t] for d in tasks], dim=-1) for t in self.tasks}
        return self.q._finish(Y)

    def merge(self, output: str = "shared") -> None:
        """Merge q, k and v at ``output`` (see MTLoRALinear.merge)."""
        for m in (self.q, self.k, self.v):
            m.merge(output)

    def unmerge(self) -> None:
        for m in (self.q, self.k, self.v):
            m.unmerge()
