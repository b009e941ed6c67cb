"""Preference samplers (DESIGN.md section 3): the annealing schedule, annealed Dirichlet, ray grids."""
import math

import pytest
import torch

from palora_kernels.samplers import (AnnealedDirichletSampler, AnnealedRaySampler, base_points, ray_grid,
                                     simplex_grid)


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
        assert rays.shape == (M, T) and rays.dtype == torch.float32
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


@pytest.mark.parametrize("T, M", [(3, 4), (3, 7), (5, 9)])
def test_base_points_any_count(T, M):
    pts = base_points(T, M)
    assert pts.shape == (M, T) and len({tuple(r) for r in pts.tolist()}) == M
    assert_on_simplex(pts, T, atol=1e-12)


def test_annealing_bad_arguments():
    with pytest.raises(ValueError, match=r"expected total_steps >= 1 and num_rays >= 1, got 0, 3"):
        AnnealedRaySampler(2, 3, total_steps=0)


# ------------------------------------------------------------------------- Dirichlet
def test_dirichlet_reproducible_with_seed():
    a, b = AnnealedDirichletSampler(3, 8, 100, seed=5), AnnealedDirichletSampler(3, 8, 100, seed=5)
    seq_a, seq_b = [a(k) for k in range(5)], [b(k) for k in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(seq_a, seq_b))
    assert not torch.equal(seq_a[0], seq_a[1])                 # successive draws differ
    c = AnnealedDirichletSampler(3, 8, 100, seed=6)
    assert not torch.equal(c(0), seq_a[0])


@pytest.mark.parametrize("T", [2, 3, 5])
def test_dirichlet_on_simplex(T):
    s = AnnealedDirichletSampler(T, 64, 10, alpha_start=20.0, alpha_end=0.3, seed=0)
    for step in range(12):
        rays = s(step)
        assert rays.shape == (64, T)
        assert_on_simplex(rays, T)
    assert_on_simplex(AnnealedDirichletSampler(T, 4, 10, seed=None)(0), T)


def test_dirichlet_anneals_from_concentrated_to_spread():
    s = AnnealedDirichletSampler(3, 4000, 10, alpha_start=20.0, alpha_end=1.0, seed=1)
    assert math.isclose(s.alpha(9), 1.0) and math.isclose(s.alpha(0), 20.0 * (1 / 20) ** 0.1)
    early = (s(0, dtype=torch.float64) - 1 / 3).abs().mean().item()
    late = (s(9, dtype=torch.float64) - 1 / 3).abs().mean().item()
    assert early < 0.5 * late, (early, late)
    # Dirichlet(1,1,1): x_i ~ Beta(1, 2), E|x_i - 1/3| = 16/81 ~= 0.198; a 4000-sample check of the law
    assert abs(late - 16 / 81) < 0.01, late
    with pytest.raises(ValueError, match=r"alpha_start, alpha_end: expected > 0, got 0.0, 1.0"):
        AnnealedDirichletSampler(3, 4, 10, alpha_start=0.0)


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
    with pytest.raises(ValueError, match=r"num_rays: expected >= 2, got 1"):
        ray_grid(2, 1)
