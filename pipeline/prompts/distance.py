"""Exact Euclidean distance transform in numpy (scipy / OpenCV are not dependencies of this project).

Algorithm: Felzenszwalb & Huttenlocher, "Distance Transforms of Sampled Functions" (Theory of Computing
2012). The squared EDT is separable: pass 1 gives, per column, the squared distance to the nearest
background pixel in that column (vectorised with running max/min of indices); pass 2 computes, per row,
the lower envelope of the parabolas ``(q - p)^2 + f(p)``. Pass 2 is run for ALL rows in lock-step
(one Python iteration per column, numpy over rows), so the Python cost is O(shorter side), not O(H*W);
the axes are swapped so that the loop runs along the shorter one. The result is exact (tested
against brute force).
"""
from __future__ import annotations

import numpy as np


def _column_sq_dist(background: np.ndarray, big: float) -> np.ndarray:
    """bool ``[H, W]`` -> float64 ``[H, W]``: squared distance to the nearest background pixel in the
    same column (``big`` where the column has none)."""
    h = background.shape[0]
    idx = np.arange(h, dtype=np.int64)[:, None]
    far = 4 * (h + 1)
    above = np.maximum.accumulate(np.where(background, idx, -far), axis=0)
    below = np.minimum.accumulate(np.where(background, idx, far + h)[::-1], axis=0)[::-1]
    d = np.minimum(idx - above, below - idx).astype(np.float64)
    out = d * d
    out[d >= far] = big
    return out


def _row_envelope(f: np.ndarray) -> np.ndarray:
    """float64 ``[R, n]`` -> ``[R, n]`` with ``out[r, q] = min_p (q - p)^2 + f[r, p]`` (all rows at once).

    ``f`` must be finite (use a large sentinel for "no site").
    """
    r, n = f.shape
    rows = np.arange(r)
    pos = np.arange(n, dtype=np.float64)
    g = f + pos * pos  # f(p) + p^2, the parabola intersection numerator terms
    v = np.zeros((r, n), dtype=np.int64)  # envelope parabola apexes
    z = np.empty((r, n + 1), dtype=np.float64)  # envelope breakpoints
    z[:, 0] = -np.inf
    z[:, 1] = np.inf
    k = np.zeros(r, dtype=np.int64)
    for q in range(1, n):
        vk = v[rows, k]
        s = (g[:, q] - g[rows, vk]) / (2.0 * (q - vk))
        pop = s <= z[rows, k]
        while pop.any():  # drop envelope parabolas hidden by the new one (z[., 0] = -inf stops it)
            sel = np.flatnonzero(pop)
            k[sel] -= 1
            vs = v[sel, k[sel]]
            s[sel] = (g[sel, q] - g[sel, vs]) / (2.0 * (q - vs))
            pop[sel] = s[sel] <= z[sel, k[sel]]
        k += 1
        v[rows, k] = q
        z[rows, k] = s
        z[rows, k + 1] = np.inf
    out = np.empty_like(f)
    k[:] = 0
    for q in range(n):
        adv = z[rows, k + 1] < q
        while adv.any():
            k[adv] += 1
            adv = z[rows, k + 1] < q
        vk = v[rows, k]
        out[:, q] = (q - vk) ** 2 + f[rows, vk]
    return out


def squared_edt(mask: np.ndarray) -> np.ndarray:
    """bool ``[H, W]`` -> float64 ``[H, W]``: squared Euclidean distance from each pixel to the nearest
    ``False`` pixel (0 on the background; ``inf`` everywhere if the mask has no background)."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    if mask.all():
        return np.full(mask.shape, np.inf)
    transpose = mask.shape[1] > mask.shape[0]  # loop of pass 2 runs along axis 1: make it the shorter
    m = mask.T if transpose else mask
    big = 4.0 * float(sum(m.shape) + 1) ** 2  # larger than any real squared distance
    out = _row_envelope(_column_sq_dist(~m, big))
    return out.T if transpose else out

