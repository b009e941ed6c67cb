"""Preference samplers (docs/design.md section 3) and evaluation ray grids.

All samplers return float tensors of shape (M, T) whose rows lie on the simplex. The three
training schedules follow the PaLoRA reference code's behaviour (github.com/nik-dim/palora):

* :class:`AnnealedRaySampler` - deterministic. Fixed points p_m, rays p_m^(mul*t) normalised,
  t = (step+1)/total_steps clamped to 1. 2 tasks: p_m = linspace(eps, 1-eps, M) with its
  mirror. 3+ tasks: ALL points of the smallest triangular grid with at least M points (the
  reference rounds M up the same way: M=5 gives the 6-point grid), pulled inside by eps.
* :class:`AnnealedDirichletSampler` - random, Dirichlet(alpha(t) * 1) with the reference's
  alpha(t) = p (1 - t) + 0.001: uniform on the simplex at the start (p=1), near the corners at
  the end. ``power`` k generalises the decay to p (1 - t)^k + floor (k = 1: the reference).
* :class:`EndGridSampler` - wraps another sampler and, from a given step on, draws the rays of a
  fixed grid (the evaluation rays) in a seeded random order, each once per pass over the grid.
* :class:`DirichletSampler` - random, fixed alpha (1: uniform on the simplex).
"""
from __future__ import annotations

import itertools
import math
from typing import Optional

import torch


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value!r}")


def _check_positive(name: str, value) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")


def simplex_grid(num_tasks: int, divisions: int, dtype=torch.float32) -> torch.Tensor:
    """Every point k/divisions on the (T-1)-simplex, k integer: C(divisions+T-1, T-1) rows.
    Ordered so that for T=2 the rows go from (0, 1) to (1, 0)."""
    _check_int("num_tasks", num_tasks, 1)
    _check_int("divisions", divisions, 0)
    pts = [c for c in itertools.product(range(divisions + 1), repeat=num_tasks - 1) if sum(c) <= divisions]
    rows = [list(c) + [divisions - sum(c)] for c in pts]
    return torch.tensor(rows, dtype=torch.float64).div_(max(divisions, 1)).to(dtype)


def ray_grid(num_tasks: int, num_rays: int = 11, dtype=torch.float32) -> torch.Tensor:
    """Rays to evaluate a front. 2 tasks: ``num_rays`` rays from (0, 1) to (1, 0).
    3+ tasks: the triangular grid with ``num_rays - 1`` divisions per edge (corners included)."""
    _check_int("num_tasks", num_tasks, 2)
    _check_int("num_rays", num_rays, 2)
    if num_tasks == 2:
        a = torch.linspace(0, 1, num_rays, dtype=torch.float64)
        return torch.stack([a, 1 - a], dim=1).to(dtype)
    return simplex_grid(num_tasks, num_rays - 1, dtype)


def grid_divisions(num_tasks: int, num_rays: int) -> int:
    """Divisions n of the smallest triangular grid with at least ``num_rays`` points."""
    n = 1
    while math.comb(n + num_tasks - 1, num_tasks - 1) < num_rays:
        n += 1
    return n


def base_points(num_tasks: int, num_rays: int, eps: float = 0.01) -> torch.Tensor:
    """The fixed points of the annealing schedule, strictly inside the simplex when eps > 0.
    2 tasks: linspace(eps, 1-eps, M) and its mirror (M rows). 3+ tasks: every point of the
    smallest triangular grid with at least M points (C(n+T-1, T-1) >= M rows, the reference's
    count), mapped to eps + (1 - T eps) * grid."""
    _check_int("num_tasks", num_tasks, 2)
    _check_int("num_rays", num_rays, 2)
    if not (isinstance(eps, (int, float)) and 0 <= eps < 1 / num_tasks):
        raise ValueError(f"eps: expected 0 <= eps < 1/num_tasks = {1 / num_tasks:g}, got {eps!r}")
    if num_tasks == 2:
        a = torch.linspace(eps, 1 - eps, num_rays, dtype=torch.float64)
        return torch.stack([a, 1 - a], dim=1)
    grid = simplex_grid(num_tasks, grid_divisions(num_tasks, num_rays), torch.float64)
    return eps + (1 - num_tasks * eps) * grid


class AnnealedRaySampler:
    """The PaLoRA paper's deterministic schedule: progress t = min(1, (step+1)/total_steps),
    rays lambda_m = p_m^(mul*t) / sum_k p_{m,k}^(mul*t). Near-uniform rays at t->0; at t=1 the
    outer points are pushed to the corners (p^5 of 0.99 vs 0.01 is 1 - 1e-10).

    ``num_rays`` is the requested M; for 3+ tasks the sampler returns ``self.num_rays`` rays,
    the full grid (>= M). One ray per step (M=1) is refused: a deterministic single ray would
    train a single trade-off (the reference asserts M > 1 too); use
    :class:`AnnealedDirichletSampler` to draw one random ray per step."""

    def __init__(self, num_tasks: int, num_rays: int, total_steps: int, mul: float = 5.0, eps: float = 0.01):
        _check_int("num_tasks", num_tasks, 2)
        if isinstance(num_rays, int) and not isinstance(num_rays, bool) and num_rays == 1:
            raise ValueError("num_rays: expected >= 2 for the deterministic schedule (one fixed ray trains one "
                             "trade-off only; for one ray per step use AnnealedDirichletSampler), got 1")
        _check_int("num_rays", num_rays, 2)
        _check_int("total_steps", total_steps, 1)
        _check_positive("mul", mul)
        self.num_tasks, self.total_steps, self.mul, self.eps = num_tasks, total_steps, float(mul), eps
        self.points = base_points(num_tasks, num_rays, eps)
        self.num_rays = self.points.shape[0]

    def progress(self, step: int) -> float:
        return min(1.0, (step + 1) / self.total_steps)

    def __call__(self, step: int, dtype=torch.float32, device=None) -> torch.Tensor:
        powered = self.points ** (self.mul * self.progress(step))
        return (powered / powered.sum(dim=1, keepdim=True)).to(dtype=dtype, device=device)


def _dirichlet(alpha: float, shape, generator) -> torch.Tensor:
    # Dirichlet as normalised Gamma draws, in log space: for alpha << 1 (the annealed schedule ends
    # at 0.001) Gamma(alpha) draws underflow, so use Gamma(a) = Gamma(a+1) * U^(1/a) (Marsaglia &
    # Tsang) and normalise with a softmax of the log-draws. A seeded generator is honoured.
    a = torch.full(shape, alpha + 1.0, dtype=torch.float64)
    g = torch._standard_gamma(a, generator=generator) if generator is not None else torch._standard_gamma(a)
    u = torch.rand(shape, dtype=torch.float64, generator=generator).clamp_min(torch.finfo(torch.float64).tiny)
    return torch.softmax(g.log() + u.log() / alpha, dim=1)


class AnnealedDirichletSampler:
    """Random rays from Dirichlet(alpha(t) * 1), the reference's annealed Dirichlet:
    alpha(t) = p (1 - t)^power + floor, t = min(1, (step+1)/total_steps); the reference has
    power = 1. With p = 1 the rays start uniform on the simplex and end near its corners
    (alpha = 0.001). ``power`` > 1 reaches small alpha (rays near the corners) earlier in the run,
    < 1 later. ``num_rays`` = 1 draws one ray per step."""

    def __init__(self, num_tasks: int, num_rays: int, total_steps: int, p: float = 1.0, floor: float = 0.001,
                 seed: Optional[int] = 0, power: float = 1.0):
        _check_int("num_tasks", num_tasks, 2)
        _check_int("num_rays", num_rays, 1)
        _check_int("total_steps", total_steps, 1)
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not math.isfinite(p) or p < 0:
            raise ValueError(f"p: expected a finite number >= 0, got {p!r}")
        _check_positive("floor", floor)
        _check_positive("power", power)
        self.num_tasks, self.num_rays, self.total_steps = num_tasks, num_rays, total_steps
        self.p, self.floor, self.power = float(p), float(floor), float(power)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def progress(self, step: int) -> float:
        return min(1.0, (step + 1) / self.total_steps)

    def alpha(self, step: int) -> float:
        return self.p * (1 - self.progress(step)) ** self.power + self.floor

    def __call__(self, step: int, dtype=torch.float32, device=None) -> torch.Tensor:
        rays = _dirichlet(self.alpha(step), (self.num_rays, self.num_tasks), self.generator)
        return rays.to(dtype=dtype, device=device)


class DirichletSampler:
    """Random rays from a fixed Dirichlet(alpha * 1); alpha = 1 is uniform on the simplex (the
    reference's ``DirichletSampler``, no annealing)."""

    def __init__(self, num_tasks: int, num_rays: int, alpha: float = 1.0, seed: Optional[int] = 0):
        _check_int("num_tasks", num_tasks, 2)
        _check_int("num_rays", num_rays, 1)
        _check_positive("alpha", alpha)
        self.num_tasks, self.num_rays, self.alpha_value = num_tasks, num_rays, float(alpha)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def __call__(self, step: int, dtype=torch.float32, device=None) -> torch.Tensor:
        return _dirichlet(self.alpha_value, (self.num_rays, self.num_tasks), self.generator).to(dtype=dtype,
                                                                                                  device=device)


class EndGridSampler:
    """``base`` for the steps before ``start_step``; from ``start_step`` on, the rows of ``grid``
    (K, T) (e.g. the evaluation rays), drawn in passes: each pass is a seeded random permutation
    of the K rows, so every grid ray is trained equally often (within one) in the final phase.
    A step takes the next ``num_rays`` (= base.num_rays) rays of that stream."""

    def __init__(self, base, grid: torch.Tensor, start_step: int, seed: Optional[int] = 0):
        _check_int("start_step", start_step, 0)
        if not (isinstance(grid, torch.Tensor) and grid.dim() == 2 and grid.shape[0] >= 1
                and grid.shape[1] == base.num_tasks):
            raise ValueError(f"grid: expected a (K, {base.num_tasks}) tensor of rays, got "
                             f"{tuple(grid.shape) if isinstance(grid, torch.Tensor) else type(grid).__name__}")
        self.base, self.grid, self.start_step = base, grid.to(torch.float64), start_step
        self.num_tasks, self.num_rays = base.num_tasks, base.num_rays
        self.seed = 0 if seed is None else seed

    def _stream(self, i: int) -> int:
        """Grid row of the i-th ray of the final phase."""
        K = self.grid.shape[0]
        perm = torch.randperm(K, generator=torch.Generator().manual_seed(self.seed * 1000003 + i // K))
        return int(perm[i % K])

    def __call__(self, step: int, dtype=torch.float32, device=None) -> torch.Tensor:
        if step < self.start_step:
            return self.base(step, dtype=dtype, device=device)
        i0 = (step - self.start_step) * self.num_rays
        rows = [self._stream(i0 + m) for m in range(self.num_rays)]
        return self.grid[rows].to(dtype=dtype, device=device)


SAMPLERS = ("annealed", "dirichlet", "random")


def make_sampler(kind: str, num_tasks: int, num_rays: int, total_steps: int, seed: Optional[int] = 0, **kw):
    """``kind``: 'annealed' (AnnealedRaySampler), 'dirichlet' (AnnealedDirichletSampler) or
    'random' (DirichletSampler, alpha 1)."""
    if kind == "annealed":
        return AnnealedRaySampler(num_tasks, num_rays, total_steps, **kw)
    if kind == "dirichlet":
        return AnnealedDirichletSampler(num_tasks, num_rays, total_steps, seed=seed, **kw)
    if kind == "random":
        return DirichletSampler(num_tasks, num_rays, seed=seed, **kw)
    raise ValueError(f"kind: expected one of {SAMPLERS}, got {kind!r}")
