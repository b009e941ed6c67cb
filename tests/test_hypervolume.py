"""Hypervolume (minimisation) against fronts computed by hand, for the exact sweep and moocore."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from multidigits.pareto import hypervolume, hypervolume_exact, nondominated  # noqa: E402

# (points, reference, hypervolume worked out by hand)
HAND = [
    # staircase: strips 3*1 + 2*1 + 1*1
    ([[1, 3], [2, 2], [3, 1]], [4, 4], 6.0),
    # a dominated point, a point beyond the reference and a duplicate add nothing
    ([[1, 3], [2, 2], [3, 1], [3, 3], [5, 0], [2, 2]], [4, 4], 6.0),
    # one point: the box to the reference
    ([[0.04, 0.05]], [1, 1], 0.96 * 0.95),
    # a point on the reference boundary contributes zero volume
    ([[1, 4]], [4, 4], 0.0),
    # 3-D one box
    ([[1, 1, 1]], [2, 2, 2], 1.0),
    # 3-D two boxes 4 + 2 overlapping in [1,2]^3: 4 + 2 - 1
    ([[0, 0, 1], [1, 1, 0]], [2, 2, 2], 5.0),
    # 3-D three boxes of 6, pairwise overlaps of 2, triple overlap 1: 18 - 6 + 1
    ([[1, 2, 3], [2, 3, 1], [3, 1, 2]], [4, 4, 4], 13.0),
    # 1-D
    ([[0.3], [0.5]], [1.0], 0.7),
]


@pytest.mark.parametrize("points,ref,expected", HAND)
def test_exact_against_hand(points, ref, expected):
    assert hypervolume_exact(points, ref) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("points,ref,expected", [h for h in HAND if len(h[1]) > 1])
def test_library_against_hand(points, ref, expected):
    pytest.importorskip("moocore")
    hv, impl = hypervolume(points, ref)
    assert impl.startswith("moocore")
    assert hv == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_exact_matches_moocore_on_random_fronts(d):
    moocore = pytest.importorskip("moocore")
    rng = np.random.default_rng(d)
    for _ in range(20):
        pts = rng.random((rng.integers(1, 30), d))
        ref = np.full(d, 1.1)
        assert hypervolume_exact(pts, ref) == pytest.approx(float(moocore.hypervolume(pts, ref=ref)), rel=1e-12)


def test_exact_matches_monte_carlo_3d():
    rng = np.random.default_rng(0)
    pts = rng.random((6, 3))
    samples = rng.random((200_000, 3))
    dominated = (pts[None, :, :] <= samples[:, None, :]).all(-1).any(-1)
    assert hypervolume_exact(pts, [1, 1, 1]) == pytest.approx(dominated.mean(), abs=5e-3)


def test_nondominated():
    mask = nondominated([[1, 3], [2, 2], [3, 3], [2, 2], [0, 5]])
    assert mask.tolist() == [True, True, False, True, True]


def test_too_many_objectives():
    with pytest.raises(ValueError, match="1 to 3"):
        hypervolume_exact([[0, 0, 0, 0]], [1, 1, 1, 1])
