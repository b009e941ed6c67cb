"""BatchNorm with training statistics per ray group, so M rays can share one pass.

Ray-stacked training (docs/design.md section 3) runs the batch repeated M times, copy m with
ray m, instead of M passes. A plain BatchNorm would then normalise with statistics
pooled over all M copies, which the M-pass loop never sees. ``RayGroupBatchNorm{1,2}d``
splits the batch into ``num_groups`` contiguous groups (rows [g*B, (g+1)*B) = group g)
and normalises each with its own batch statistics, exactly as pass g of the loop would.

Running statistics: pass g of the loop updates them in order g = 0..G-1,
    num_batches_tracked += 1
    running = (1 - f) * running + f * stat_g,     f = momentum (or 1/num_batches_tracked
                                                   when momentum is None)
with stat_g the group's mean and unbiased variance. ``forward`` applies the same G
updates in the same order, so after a step the buffers equal the loop's (tested to fp32
rounding). With ``num_groups == 1`` or in eval mode the module is exactly its torch
parent (same state_dict keys, same kernel).

Under DDP each rank keeps its own groups (as a plain BatchNorm keeps per-rank
statistics); ``nn.SyncBatchNorm.convert_sync_batchnorm`` would replace these modules and
pool the groups, so do not apply it to a ray-stacked model.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ._base import check_positive


class _RayGroupMixin:
    num_groups: int

    def _grouped_forward(self, x: torch.Tensor) -> torch.Tensor:
        G = self.num_groups
        N, C = x.shape[0], x.shape[1]
        if N % G:
            raise ValueError(f"x: {type(self).__name__} with num_groups={G} expects a batch of G equal "
                             f"contiguous ray groups, got batch size {N} (not a multiple of {G})")
        B, rest = N // G, x.shape[2:]
        # (G*B, C, ...) -> (B, G*C, ...): channel g*C + c of xg holds channel c of group g, so one
        # batch_norm call reduces each (group, channel) pair separately.
        xg = x.reshape(G, B, C, *rest).transpose(0, 1).reshape(B, G * C, *rest)
        weight = self.weight.repeat(G) if self.weight is not None else None
        bias = self.bias.repeat(G) if self.bias is not None else None
        update = self.training and self.track_running_stats
        # momentum=1 into zeroed scratch buffers returns exactly the batch mean and unbiased variance
        # that F.batch_norm feeds its running update in the loop, computed by the same kernel
        mean_g = torch.zeros(G * C, dtype=self.running_mean.dtype, device=x.device) if update else None
        var_g = torch.zeros_like(mean_g) if update else None
        y = F.batch_norm(xg, mean_g, var_g, weight, bias, True, 1.0, self.eps)
        if update:
            self._update_running(mean_g.view(G, C), var_g.view(G, C))
        return y.reshape(B, G, C, *rest).transpose(0, 1).reshape(x.shape)

    @torch.no_grad()
    def _update_running(self, mean_g: torch.Tensor, var_g: torch.Tensor) -> None:
        for g in range(mean_g.shape[0]):      # G vector updates of C entries: what the loop's passes do
            self.num_batches_tracked.add_(1)
            f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            self.running_mean.mul_(1 - f).add_(mean_g[g].to(self.running_mean.dtype), alpha=f)
            self.running_var.mul_(1 - f).add_(var_g[g].to(self.running_var.dtype), alpha=f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        batch_stats = self.training or self.running_mean is None
        if self.num_groups == 1 or not batch_stats:
            return super().forward(x)
        return self._grouped_forward(x)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", num_groups={self.num_groups}"


class RayGroupBatchNorm2d(_RayGroupMixin, nn.BatchNorm2d):
    """nn.BatchNorm2d whose training statistics are kept per contiguous ray group.

    x: (G*B, C, H, W) with rows [g*B, (g+1)*B) the copy of the batch for ray g.
    ``num_groups`` is an attribute: set it per step (or use :func:`ray_groups`).
    """

    def __init__(self, num_features: int, num_groups: int = 1, eps: float = 1e-5, momentum=0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.num_groups = check_positive("num_groups", num_groups)


class RayGroupBatchNorm1d(_RayGroupMixin, nn.BatchNorm1d):
    """nn.BatchNorm1d whose training statistics are kept per contiguous ray group.

    x: (G*B, C) or (G*B, C, L) with rows [g*B, (g+1)*B) the copy of the batch for ray g.
    """

    def __init__(self, num_features: int, num_groups: int = 1, eps: float = 1e-5, momentum=0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.num_groups = check_positive("num_groups", num_groups)


RAY_GROUP_BATCHNORMS = (RayGroupBatchNorm1d, RayGroupBatchNorm2d)


def _ray_group_layers(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, RAY_GROUP_BATCHNORMS)]


def set_ray_groups(model: nn.Module, num_groups: int) -> None:
    """Set ``num_groups`` of every RayGroupBatchNorm in ``model``."""
    check_positive("num_groups", num_groups)
    for m in _ray_group_layers(model):
        m.num_groups = num_groups


@contextlib.contextmanager
def ray_groups(model: nn.Module, num_groups: int):
    """``with ray_groups(model, M):`` -- every RayGroupBatchNorm uses M groups; restored after."""
    check_positive("num_groups", num_groups)
    saved = [(m, m.num_groups) for m in _ray_group_layers(model)]
    for m, _ in saved:
        m.num_groups = num_groups
    try:
        yield model
    finally:
        for m, g in saved:
            m.num_groups = g


def convert_batchnorm(model: nn.Module, num_groups: int = 1) -> nn.Module:
    """Replace every nn.BatchNorm1d/2d of ``model`` (in place) by its RayGroup version with the
    same parameters and buffers; returns ``model``. A bare BatchNorm module is returned converted."""
    def swap(bn):
        cls = RayGroupBatchNorm2d if isinstance(bn, nn.BatchNorm2d) else RayGroupBatchNorm1d
        like = bn.weight if bn.weight is not None else bn.running_mean     # None: nothing to match
        new = cls(bn.num_features, num_groups, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                  device=None if like is None else like.device, dtype=None if like is None else like.dtype)
        new.load_state_dict(bn.state_dict())
        new.train(bn.training)
        return new

    kinds = (nn.BatchNorm1d, nn.BatchNorm2d)
    if isinstance(model, kinds) and not isinstance(model, RAY_GROUP_BATCHNORMS):
        return swap(model)
    for name, mod in list(model.named_modules()):
        if name and isinstance(mod, kinds) and not isinstance(mod, RAY_GROUP_BATCHNORMS):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, swap(mod))
    return model
