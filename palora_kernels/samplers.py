"""Preference samplers (DESIGN.md section 3) and evaluation ray grids.

All return float tensors of shape (M, T) whose rows lie on the simplex.
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch


def simplex_grid(num_tasks: int, divisions: int, dtype=torch.float32) -> torch.Tensor:
    """Every point k/divisions on the (T-1)-simplex, k integer: C(divisions+T-1, T-1) rows.
    Ordered so that for T=2 the rows go from (0, 1) to (1, 0)."""
    if num_tasks < 1 or divisions < 0:
        raise ValueError(f"simplex_grid: expected num_tasks >= 1 and divisions >= 0, got {num_tasks}, {divisions}")
    pts = [c for c in itertools.product(range(divisions + 1), repeat=num_tasks - 1) if sum(c) <= divisions]
    rows = [list(c) + [divisions - sum(c)] for c in pts]
    return torch.tensor(rows, dtype=torch.float64).div_(max(divisions, 1)).to(dtype)


def ray_grid(num_tasks: int, num_rays: int = 11, dtype=torch.float32) -> torch.Tensor:
    """Rays to evaluate a front. 2 tasks: ``num_rays`` rays from (0, 1) to (1, 0).
    3+ tasks: the triangular grid with ``num_rays - 1`` divisions per edge (corners included)."""
    if num_rays < 2:
        raise ValueError(f"num_rays: expected >= 2, got {num_rays}")
    if num_tasks == 2:
        a = torch.linspace(0, 1, num_rays, dtype=torch.float64)
        return torch.stack([a, 1 - a], dim=1).to(dtype)
    return simplex_grid(num_tasks, num_rays - 1, dtype)


def base_points(num_tasks: int, num_rays: int, eps: float = 0.01) -> torch.Tensor:
    """The M fixed points of the annealing schedule, strictly inside the simplex.
    2 tasks: linspace(eps, 1-eps, M). 3+ tasks: M points spread evenly over the smallest
    triangular grid with at least M points, pulled inside by eps."""
    if num_tasks == 1:
        return torch.ones(num_rays, 1, dtype=torch.float64)
    if num_tasks == 2:
        a = torch.linspace(eps, 1 - eps, num_rays, dtype=torch.float64)
        return torch.stack([a, 1 - a], dim=1)
    n = 1
    while math.comb(n + num_tasks - 1, num_tasks - 1) < num_rays:
        n += 1
    grid = simplex_grid(num_tasks, n, torch.float64)
    idx = torch.linspace(0, grid.shape[0] - 1, num_rays, dtype=torch.float64).round().long()
    return eps + (1 - num_tasks * eps) * grid[idx]


class AnnealedRaySampler:
    """The PaLoRA paper's deterministic schedule: progress t = min(1, (step+1)/total_steps),
    rays lambda_m = p_m^(mul*t) / sum_k p_{m,k}^(mul*t). Uniform rays at t=0, corners at t=1."""

    def __init__(self, num_tasks: int, num_rays: int, total_steps: int, mul: float = 5.0, eps: float = 0.01):
        if total_steps < 1 or num_rays < 1:
            raise ValueError(f"AnnealedRaySampler: expected total_steps >= 1 and num_rays >= 1, "
                             f"got {total_steps}, {num_rays}")
        self.num_tasks, self.num_rays, self.total_steps, self.mul = num_tasks, num_rays, total_steps, mul
        self.points = base_points(num_tasks, num_rays, eps)

    def progress(self, step: int) -> float:
        return min(1.0, (step + 1) / self.total_steps)

    def __call__(self, step: int, dtype=torch.float32, device=None) -> torch.Tensor:
        powered = self.points ** (self.mul * self.progress(step))
        return (powered / powered.sum(dim=1, keepdim=True)).to(dtype=dtype, device=device)


class AnnealedDirichletSampler:
    """Random rays from Dirichlet(alpha(t) * 1): alpha anneals geometrically from ``alpha_start``
    (rays concentrated near uniform) to ``alpha_end`` (spread over the simplex; < 1 favours corners)."""

    def __init__(self, num_tasks: int, num_rays: int, total_steps: int, alpha_start: float = 20.0,
                 alpha_end: float = 1.0, seed: Optional[int] = 0):
        if alpha_start <= 0 or alpha_end <= 0:
            raise ValueError(f"alpha_start, alpha_end: expected > 0, got {alpha_start}, {alpha_end}")
        self.num_tasks, self.num_rays, self.total_steps = num_tasks, num_rays, total_steps
        self.alpha_start, self.alpha_end = alpha_start, alpha_end
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def alpha(self, step: int) -> float:
        t = min(1.0, (step + 1) / self.total_steps)
        return self.alpha_start * (self.alpha_end / self.alpha_start) ** t

    def __call__(self, step: int, dtype=torch.float32, device=None) -> torch.Tensor:
        # Dirichlet via normalised Gamma draws so the seeded generator is honoured
        a = torch.full((self.num_rays, self.num_tasks), self.alpha(step), dtype=torch.float64)
        g = torch._standard_gamma(a, generator=self.generator) if self.generator is not None else torch._standard_gamma(a)
        return (g / g.sum(dim=1, keepdim=True)).to(dtype=dtype, device=device)
