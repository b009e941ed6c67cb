"""Preference samplers (docs/design.md section 3): the annealing schedule, annealed Dirichlet, ray grids."""
import math

import pytest
import torch

from palora_kernels.samplers import (AnnealedDirichletSampler, AnnealedRaySampler, DirichletSampler, EndGridSampler,
                                     base_points, grid_divisions, make_sampler, ray_grid, simplex_grid)


def assert_on_simplex(rays, T, atol=1e-6):
    assert rays.dim() == 2 and rays.shape[1] == T
    assert bool((rays >= 0).all()), rays
    torch.testing.assert_close(rays.sum(1).double(), torch.ones(rays.shape[0], dtype=torch.float64),
                               atol=atol, rtol=0)


# ------------------------------------------------------------------------- annealing schedule
@pytest.mark.parametrize("T, M", [(2, 5), (3, 6), (3, 10), (4, 7)])
def test_annealed_rays_on_simplex_every_step(T, M):
    s = AnnealedRaySampler(T, M, total_steps=20)
    for step in range(0, 25):
        rays = s(step)
        assert rays.shape == (s.num_rays, T) and s.num_rays >= M and rays.dtype == torch.float32
        assert_on_simplex(rays, T)
    assert s(3, dtype=torch.float64).dtype == torch.float64


def test_annealing_two_tasks_base_points_and_endpoints():
    eps, M = 0.01, 5
    s = AnnealedRaySampler(2, M, total_steps=100, eps=eps)
    a = torch.linspace(eps, 1 - eps, M, dtype=torch.float64)
    torch.testing.assert_close(s.points, torch.stack([a, 1 - a], 1))
    # t -> 0: every ray uniform (progress of step 0 is 1/total_steps)
    early = AnnealedRaySampler(2, M, total_steps=10 ** 6)(0, dtype=torch.float64)
    torch.testing.assert_close(early, torch.full((M, 2), 0.5, dtype=torch.float64), atol=1e-4, rtol=0)
    # t = 1: p^5 / sum -> the outer rays sit at the corners, the middle one stays uniform
    late = s(99, dtype=torch.float64)
    expected = s.points ** 5 / (s.points ** 5).sum(1, keepdim=True)
    torch.testing.assert_close(late, expected)
    assert late[0, 1] > 1 - 1e-9 and late[-1, 0] > 1 - 1e-9
    torch.testing.assert_close(late[M // 2], torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert torch.equal(s(99), s(10 ** 6))            # progress is clamped at 1


def test_annealing_intermediate_progress_is_the_paper_formula():
    s = AnnealedRaySampler(2, 3, total_steps=10, mul=5.0)
    t = (4 + 1) / 10
    p = s.points
    torch.testing.assert_close(s(4, dtype=torch.float64), p ** (5 * t) / (p ** (5 * t)).sum(1, keepdim=True))
    # rays spread monotonically from uniform towards the corners
    spread = [(s(k, dtype=torch.float64) - 0.5).abs().max().item() for k in range(10)]
    assert all(a < b for a, b in zip(spread, spread[1:])), spread


def test_annealing_three_task_grid():
    eps, M = 0.01, 10                               # C(3 + 2, 2) = 10: the full grid with 3 divisions
    s = AnnealedRaySampler(3, M, total_steps=50, eps=eps)
    pts = s.points
    assert pts.shape == (M, 3) and len({tuple(r) for r in pts.tolist()}) == M
    assert_on_simplex(pts, 3, atol=1e-12)
    assert bool((pts >= eps - 1e-12).all())          # strictly inside the simplex
    grid = eps + (1 - 3 * eps) * simplex_grid(3, 3, torch.float64)
    assert sorted(map(tuple, pts.tolist())) == sorted(map(tuple, grid.tolist()))
    early = AnnealedRaySampler(3, M, total_steps=10 ** 6)(0, dtype=torch.float64)
    torch.testing.assert_close(early, torch.full((M, 3), 1 / 3, dtype=torch.float64), atol=1e-4, rtol=0)
    late = s(49, dtype=torch.float64)
    assert_on_simplex(late, 3)
    corners = late.max(1).values > 0.999             # the three near-corner points reach the corners
    assert int(corners.sum()) == 3
    centre = (pts - 1 / 3).abs().sum(1).argmin()
    assert (late[centre] - 1 / 3).abs().max() < (late - 1 / 3).abs().max()


@pytest.mark.parametrize("T, M, n", [(3, 2, 1), (3, 3, 1), (3, 4, 2), (3, 5, 2), (3, 6, 2), (3, 7, 3), (3, 10, 3),
                                     (3, 11, 4), (5, 9, 2)])
def test_base_points_are_the_full_grid(T, M, n):
    # the reference's count for 3 tasks, n = int((sqrt(8M - 1) - 1) / 2), is the smallest grid with >= M points
    if T == 3:
        assert n == int((math.sqrt(8 * M - 1) - 1) / 2)
    assert grid_divisions(T, M) == n
    pts = base_points(T, M, eps=0.0)
    assert pts.shape == (math.comb(n + T - 1, T - 1), T) and pts.shape[0] >= M
    assert sorted(map(tuple, pts.tolist())) == sorted(map(tuple, simplex_grid(T, n, torch.float64).tolist()))
    assert_on_simplex(base_points(T, M), T, atol=1e-12)


def test_three_tasks_m5_trades_off_every_pair():
    # M=5 -> the 6-point grid: the three corners AND the three edge midpoints (1/2, 1/2, 0) etc.
    s = AnnealedRaySampler(3, 5, total_steps=10, eps=0.0)
    assert s.num_rays == 6
    rays = {tuple(r) for r in s(9, dtype=torch.float64).tolist()}
    assert rays == {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0), (0.5, 0.0, 0.5),
                    (0.0, 0.5, 0.5)}


def test_annealing_bad_arguments():
    with pytest.raises(ValueError, match=r"total_steps: expected an int >= 1, got 0"):
        AnnealedRaySampler(2, 3, total_steps=0)
    with pytest.raises(ValueError, match=r"num_tasks: expected an int >= 2, got 0"):
        AnnealedRaySampler(0, 5, 10)
    with pytest.raises(ValueError, match=r"eps: expected 0 <= eps < 1/num_tasks = 0.333333, got 0.6"):
        AnnealedRaySampler(3, 5, 10, eps=0.6)          # used to return NaN rays
    with pytest.raises(ValueError, match=r"eps: expected .* got -0.1"):
        AnnealedRaySampler(2, 5, 10, eps=-0.1)
    with pytest.raises(ValueError, match=r"num_rays: expected >= 2 for the deterministic schedule.*got 1"):
        AnnealedRaySampler(2, 1, 10)
    with pytest.raises(ValueError, match=r"num_rays: expected an int >= 2, got 2.5"):
        AnnealedRaySampler(2, 2.5, 10)
    with pytest.raises(ValueError, match=r"mul: expected a finite number > 0, got 0"):
        AnnealedRaySampler(2, 3, 10, mul=0)
    with pytest.raises(ValueError, match=r"num_rays: expected an int >= 2, got 1"):
        ray_grid(2, 1)
    with pytest.raises(ValueError, match=r"kind: expected one of"):
        make_sampler("sobol", 2, 3, 10)


# ------------------------------------------------------------------------- Dirichlet
def test_dirichlet_reproducible_with_seed():
    a, b = AnnealedDirichletSampler(3, 8, 100, seed=5), AnnealedDirichletSampler(3, 8, 100, seed=5)
    seq_a, seq_b = [a(k) for k in range(5)], [b(k) for k in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))
    assert not torch.equal(seq_a[0], seq_a[1])                 # successive draws differ
    c = AnnealedDirichletSampler(3, 8, 100, seed=6)
    assert not torch.equal(c(0), seq_a[0])


@pytest.mark.parametrize("T", [2, 3, 5])
def test_dirichlet_on_simplex_every_step(T):
    s = AnnealedDirichletSampler(T, 64, 10, seed=0)
    for step in range(12):                                     # includes alpha = 0.001: Gamma underflow
        rays = s(step)
        assert rays.shape == (64, T) and not bool(rays.isnan().any())
        assert_on_simplex(rays, T)
    assert_on_simplex(AnnealedDirichletSampler(T, 4, 10, seed=None)(0), T)
    assert_on_simplex(DirichletSampler(T, 16, seed=3)(0), T)


def test_dirichlet_reference_schedule():
    # the reference's alpha(t) = p (1 - t) + 0.001 with t = (step + 1) / total_steps
    s = AnnealedDirichletSampler(3, 4000, 10, p=1.0, seed=1)
    assert math.isclose(s.alpha(0), 0.9 + 0.001) and math.isclose(s.alpha(4), 0.5 + 0.001)
    assert math.isclose(s.alpha(9), 0.001) and math.isclose(s.alpha(100), 0.001)
    # alpha = 1: uniform on the simplex, x_i ~ Beta(1, 2), E|x_i - 1/3| = 16/81 ~= 0.198 (4000-sample check)
    u = DirichletSampler(3, 4000, alpha=1.0, seed=1)(0, dtype=torch.float64)
    assert abs((u - 1 / 3).abs().mean().item() - 16 / 81) < 0.01
    # alpha = 0.001: nearly every ray is within 1e-3 of a corner
    late = s(9, dtype=torch.float64)
    assert (late.max(1).values > 0.999).double().mean().item() > 0.97       # measured 0.986
    mid = s(4, dtype=torch.float64)
    assert (mid.max(1).values > 0.999).double().mean().item() < 0.2


def test_dirichlet_power_and_floor():
    # alpha(t) = p (1 - t)^power + floor; power 1 is the reference schedule, draw for draw
    s = AnnealedDirichletSampler(2, 1, 10, p=1.0, power=2.0, floor=0.05, seed=3)
    assert math.isclose(s.alpha(4), 0.5 ** 2 + 0.05) and math.isclose(s.alpha(0), 0.9 ** 2 + 0.05)
    assert math.isclose(s.alpha(9), 0.05)
    ref, one = AnnealedDirichletSampler(2, 1, 50, seed=7), AnnealedDirichletSampler(2, 1, 50, seed=7, power=1.0)
    assert all(torch.equal(ref(k), one(k)) for k in range(50))
    with pytest.raises(ValueError, match=r"power: expected a finite number > 0, got 0"):
        AnnealedDirichletSampler(2, 1, 10, power=0)


def test_end_grid_sampler():
    base = AnnealedDirichletSampler(2, 1, 40, seed=0)
    grid = ray_grid(2, 11, torch.float64)
    s = EndGridSampler(base, grid, start_step=18, seed=0)
    ref = AnnealedDirichletSampler(2, 1, 40, seed=0)
    assert all(torch.equal(s(k), ref(k)) for k in range(18))             # the base sampler before the start
    tail = torch.cat([s(k, dtype=torch.float64) for k in range(18, 18 + 22)])
    for p in range(2):                                                    # each pass: every grid ray once
        got = sorted(tuple(r) for r in tail[11 * p:11 * (p + 1)].tolist())
        assert got == sorted(tuple(r) for r in grid.tolist())
    assert not torch.equal(tail[:11], tail[11:])                          # a fresh order per pass
    assert torch.equal(s(25), s(25)) and s(25).dtype == torch.float32    # deterministic in the step
    m2 = EndGridSampler(AnnealedDirichletSampler(2, 2, 40, seed=0), grid, start_step=0, seed=1)
    rows = torch.cat([m2(k, dtype=torch.float64) for k in range(11)])     # M = 2: the next two of the stream
    assert m2(0).shape == (2, 2)
    assert sorted(tuple(r) for r in rows[:11].tolist()) == sorted(tuple(r) for r in grid.tolist())
    with pytest.raises(ValueError, match=r"grid: expected a \(K, 2\) tensor of rays, got \(10, 3\)"):
        EndGridSampler(base, ray_grid(3, 4), start_step=0)
    with pytest.raises(ValueError, match=r"start_step: expected an int >= 0, got -1"):
        EndGridSampler(base, grid, start_step=-1)


def test_dirichlet_one_ray_per_step_and_bad_arguments():
    s = AnnealedDirichletSampler(2, 1, total_steps=1, seed=0)
    assert s(0).shape == (1, 2)
    with pytest.raises(ValueError, match=r"total_steps: expected an int >= 1, got 0"):
        AnnealedDirichletSampler(2, 5, total_steps=0)           # used to raise ZeroDivisionError on call
    with pytest.raises(ValueError, match=r"p: expected a finite number >= 0, got -1"):
        AnnealedDirichletSampler(2, 5, 10, p=-1)
    with pytest.raises(ValueError, match=r"num_tasks: expected an int >= 2, got 1"):
        AnnealedDirichletSampler(1, 5, 10)
    with pytest.raises(ValueError, match=r"alpha: expected a finite number > 0, got 0.0"):
        DirichletSampler(2, 5, alpha=0.0)
    assert isinstance(make_sampler("dirichlet", 2, 1, 10), AnnealedDirichletSampler)
    assert isinstance(make_sampler("random", 2, 1, 10), DirichletSampler)
    assert make_sampler("annealed", 3, 5, 10).num_rays == 6


# ------------------------------------------------------------------------- ray grids
def test_ray_grid_two_tasks():
    g = ray_grid(2, 11)
    assert g.shape == (11, 2)
    assert torch.equal(g[0], torch.tensor([0.0, 1.0])) and torch.equal(g[-1], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(g[:, 0], torch.linspace(0, 1, 11))
    assert_on_simplex(g, 2)
    assert ray_grid(2, 2).tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_ray_grid_three_tasks():
    g = ray_grid(3, 5, dtype=torch.float64)              # 4 divisions per edge
    assert g.shape == (math.comb(4 + 2, 2), 3) and len({tuple(r) for r in g.tolist()}) == g.shape[0]
    assert_on_simplex(g, 3, atol=1e-12)
    rows = {tuple(r) for r in g.tolist()}
    assert {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)} <= rows
    torch.testing.assert_close(g * 4, (g * 4).round())
    assert simplex_grid(4, 3).shape == (math.comb(3 + 3, 3), 4)
