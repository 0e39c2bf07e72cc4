"""Point prompts: k random positive clicks, and the oracle ("centre") click.

Points are ``(x, y)`` integer pixel indices stored as float32 (SAM's prompt encoder adds 0.5 itself).
"""
from __future__ import annotations

import numpy as np

from pipeline.prompts.distance import squared_edt


def foreground_index(mask: np.ndarray) -> np.ndarray:
    """Row-major flat indices of the ``True`` pixels (compute once per view, reuse for every draw)."""
    return np.flatnonzero(np.asarray(mask, dtype=bool))


def sample_positive_points(fg: np.ndarray, width: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` points drawn uniformly from the foreground, float32 ``[k, 2]`` (x, y).

    ``fg`` = :func:`foreground_index` of the mask (width = mask width). Distinct pixels when the mask has
    at least ``k`` of them, otherwise drawn with replacement. No negative points (docs/METHOD.md §3).
    """
    if fg.size == 0:
        raise ValueError("empty mask: no positive point (the view should have been quarantined)")
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    pick = fg[rng.choice(fg.size, size=k, replace=fg.size < k)]
    return np.stack([pick % width, pick // width], axis=1).astype(np.float32)


def oracle_point(mask: np.ndarray) -> np.ndarray:
    """The interior pixel farthest from the mask boundary, float32 ``[1, 2]`` (x, y).

    RITM / HQ-SAM convention: the image border counts as boundary (the mask is zero-padded by one pixel
    before the distance transform). The distance is the exact Euclidean one (pipeline.prompts.distance);
    ties go to the first pixel in row-major order. Computed on the mask's bounding box (+1 px of
    background), which gives the same distances as the full frame.
    """
    mask = np.asarray(mask, dtype=bool)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask: no oracle point (the view should have been quarantined)")
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask[y0:y1, x0:x1], 1)
    dist = squared_edt(crop)[1:-1, 1:-1]
    iy, ix = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return np.array([[x0 + ix, y0 + iy]], dtype=np.float32)
