"""What PaLoRALinear and PaLoRAConv2d share: preference resolution and merging."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..functional import check_dropout, check_finite, check_preference


def check_positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}: expected an int >= 1, got {value}")
    return value


def init_lora_(lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """A_t kaiming-uniform(a=sqrt(5)) per task (fan_in of one adapter, not of the stack); B zeros."""
    with torch.no_grad():
        for t in range(lora_A.shape[0]):
            nn.init.kaiming_uniform_(lora_A[t].view(lora_A.shape[1], -1), a=math.sqrt(5))
        lora_B.zero_()


class PaLoRALayerMixin:
    """Holds the layer's default preference and the merged state; no math."""

    num_tasks: int
    rank: int
    scaling: float

    def _init_palora(self, num_tasks: int, rank: int, lora_alpha: float, lora_dropout: float = 0.0) -> None:
        self.num_tasks = check_positive("num_tasks", num_tasks)
        self.lora_dropout = check_dropout(lora_dropout)
        self.rank = check_positive("rank", rank)
        if not isinstance(lora_alpha, (int, float)) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha: expected a finite number, got {lora_alpha!r}")
        self.lora_alpha = float(lora_alpha)
        self.scaling = self.lora_alpha / self.rank
        self._preference: Optional[torch.Tensor] = None
        self._unmerged_weight: Optional[torch.Tensor] = None
        self._merged_preference: Optional[torch.Tensor] = None

    # -- preferences ------------------------------------------------------------------
    def set_preference(self, preference: Optional[torch.Tensor]) -> None:
        """Default preference for calls that pass none: (T,) or (B, T); None clears it.

        A merged layer computes one preference only: another one raises (nothing is set)."""
        if preference is not None:
            check_preference(preference, self.num_tasks, None, None)
            check_finite(preference)          # here, once, not in every forward (a GPU sync)
            if self.merged:
                self._check_merged_call(preference)
        self._preference = preference

    def _resolve_preference(self, preference):
        p = preference if preference is not None else self._preference
        if p is None:
            raise ValueError(
                f"preference: {type(self).__name__} needs a preference of shape ({self.num_tasks},) or "
                f"(batch, {self.num_tasks}): pass forward(x, preference=...), or use "
                "palora_kernels.set_preference(model, p) / `with palora_kernels.preference(model, p):`")
        # move a preference to the layer's device for convenience, but leave what cannot be moved
        # (not a tensor, a meta tensor) to the functional API's checks, which raise a clear error
        if isinstance(p, torch.Tensor) and p.device != self.weight.device and not p.is_meta:
            p = p.to(self.weight.device)
        return p

    @property
    def merged(self) -> bool:
        return self._unmerged_weight is not None

    # -- merging ----------------------------------------------------------------------
    def _check_merge_preference(self, preference) -> torch.Tensor:
        check_preference(preference, self.num_tasks, None, None)
        check_finite(preference)
        if preference.dim() != 1:
            raise ValueError(f"preference: merging needs one preference for the whole batch, shape "
                             f"({self.num_tasks},), got {tuple(preference.shape)}")
        return preference.to(self.weight.device)

    @torch.no_grad()
    def merged_weight(self, preference: torch.Tensor) -> torch.Tensor:
        """The base weight that computes this layer at ``preference`` (T,)."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merged_weight: the layer is merged; unmerge() first")
        return self._merged_weight(self._check_merge_preference(preference))

    @torch.no_grad()
    def merge(self, preference: torch.Tensor) -> None:
        """Fold the adapters at ``preference`` into ``weight``; forward then runs the plain op."""
        if self.merged:
            raise RuntimeError(f"{type(self).__name__}.merge: already merged; unmerge() first")
        p = self._check_merge_preference(preference)
        merged = self._merged_weight(p)
        self._unmerged_weight = self.weight.detach().clone()  # kept, not subtracted back: exact unmerge
        self._merged_preference = p.detach().clone()
        self.weight.copy_(merged)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the original weight bit for bit."""
        if not self.merged:
            raise RuntimeError(f"{type(self).__name__}.unmerge: the layer is not merged")
        self.weight.copy_(self._unmerged_weight)
        self._unmerged_weight = None
        self._merged_preference = None

    def _check_merged_call(self, preference, source: str = "preference") -> None:
        """Refuse any preference but the merged one, wherever it comes from (an argument, the
        default set by set_preference / ``with preference(model, p)``): a merged layer computes
        only its merged preference, and silently computing that one would be a wrong result."""
        if preference is not None:
            check_preference(preference, self.num_tasks, None, None, name=source)   # a list, wrong T: clear
        if preference is not None and not (preference.dim() == 1 and torch.equal(
                preference.to(self._merged_preference), self._merged_preference)):
            got = tuple(preference.shape) if preference.dim() != 1 else preference.tolist()
            raise ValueError(f"{source}: the layer is merged at {self._merged_preference.tolist()}; "
                             f"call unmerge() to use another preference, got {got}")

    def _merged_call_preference(self, preference) -> None:
        """forward() of a merged layer: check the passed preference, else the default one."""
        if preference is not None:
            self._check_merged_call(preference)
        else:
            self._check_merged_call(self._preference, "preference (the layer's default, set by "
                                                      "set_preference or `with preference(model, p)`)")

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.cuda()`` and friends move the saved unmerged weight with ``weight``
        (it keeps weight's dtype, so ``unmerge`` after ``.half()`` gives the fp16 weight an unmerged
        layer would have); the merged preference only follows the device (it stays the exact values
        the state_dict saves)."""
        super()._apply(fn, recurse)
        if self.merged:
            self._unmerged_weight = fn(self._unmerged_weight)
            self._merged_preference = self._merged_preference.to(self.weight.device)
        return self

    # -- state_dict: the merged state travels with the weights ------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A merged layer saves its unmerged weight (as PEFT does) plus ``merged_preference``; loading
        that into any PaLoRA layer restores the adapters and merges again at the same preference,
        bit for bit. An unmerged layer's state_dict is unchanged."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.merged:
            w = self._unmerged_weight
            destination[prefix + "weight"] = w if keep_vars else w.detach()
            destination[prefix + "merged_preference"] = self._merged_preference.clone()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "merged_preference"
        merged_p = state_dict.pop(key, None)        # load_state_dict passes its own copy of the dict
        if merged_p is not None:
            try:
                self._check_merge_preference(merged_p)
            except (TypeError, ValueError) as exc:
                error_msgs.append(f"{key}: {exc}")
                return
        was_merged = self.merged
        if was_merged:        # load into the unmerged layer: the weight it would read is the unmerged one
            self.unmerge()
        n_err = len(error_msgs)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if len(error_msgs) > n_err:
            return            # load_state_dict raises; our state stays unmerged-consistent
        if merged_p is not None:
            self.merge(merged_p)

    def _active_dropout(self) -> float:
        """LoRA dropout applies in training mode only (eval gives exactly the no-dropout layer)."""
        return self.lora_dropout if self.training else 0.0

    def extra_palora_repr(self) -> str:
        drop = f", lora_dropout={self.lora_dropout}" if self.lora_dropout else ""
        return f"num_tasks={self.num_tasks}, rank={self.rank}, lora_alpha={self.lora_alpha}{drop}"
