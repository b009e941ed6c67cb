"""Hypervolume of a set of points (minimisation) with respect to a reference point.

:func:`hypervolume` uses moocore (a maintained C implementation, O(n log n) in 2-D and
3-D) when it is installed, else :func:`hypervolume_exact`, an exact sweep for 1-3
objectives written here. Both are tested against hand-computed fronts.
"""
from __future__ import annotations

import numpy as np


def _as_points(points, ref):
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim == 1:
        pts = pts[None, :]
    if pts.ndim != 2:
        raise ValueError(f"points: expected shape (n, d), got {pts.shape}")
    ref = np.broadcast_to(np.asarray(ref, dtype=np.float64), (pts.shape[1],)).copy()
    return pts, ref


def nondominated(points) -> np.ndarray:
    """Boolean mask of the rows of ``points`` (n, d) that no other row weakly dominates
    with at least one strict improvement (minimisation); duplicates are all kept."""
    pts = np.asarray(points, dtype=np.float64)
    le = (pts[:, None, :] <= pts[None, :, :]).all(-1)       # le[i, j]: i weakly dominates j
    lt = (pts[:, None, :] < pts[None, :, :]).any(-1)
    dominated = (le & lt).any(0)
    return ~dominated


def _hv2d(pts: np.ndarray, ref: np.ndarray) -> float:
    # sweep by the first objective; each point adds the strip below the best second objective so far
    pts = pts[np.lexsort((pts[:, 1], pts[:, 0]))]
    hv, best_y = 0.0, ref[1]
    for x, y in pts:
        if y < best_y:
            hv += (ref[0] - x) * (best_y - y)
            best_y = y
    return hv


def hypervolume_exact(points, ref) -> float:
    """Exact hypervolume dominated by ``points`` (n, d), d in 1..3, bounded by ``ref`` (d,).
    Points that do not strictly dominate ``ref`` in every objective contribute nothing.
    3-D: slabs between consecutive third coordinates, each a 2-D hypervolume (O(n^2 log n))."""
    pts, ref = _as_points(points, ref)
    pts = pts[(pts < ref).all(axis=1)]
    if pts.shape[0] == 0:
        return 0.0
    d = pts.shape[1]
    if d == 1:
        return float(ref[0] - pts[:, 0].min())
    if d == 2:
        return _hv2d(pts, ref)
    if d == 3:
        order = np.argsort(pts[:, 2], kind="stable")
        pts = pts[order]
        zs = np.append(pts[:, 2], ref[2])
        hv = 0.0
        for i in range(pts.shape[0]):
            depth = zs[i + 1] - zs[i]
            if depth > 0:
                hv += depth * _hv2d(pts[: i + 1, :2], ref[:2])
        return hv
    raise ValueError(f"points: hypervolume_exact handles 1 to 3 objectives, got {d}")


def hypervolume(points, ref) -> tuple[float, str]:
    """(hypervolume, implementation name) for minimisation; moocore when installed."""
    pts, ref = _as_points(points, ref)
    try:
        import moocore
    except ImportError:
        return hypervolume_exact(pts, ref), "exact (multidigits.pareto)"
    return float(moocore.hypervolume(pts, ref=ref)), f"moocore {moocore.__version__}"
