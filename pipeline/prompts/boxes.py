"""Box prompts: the tight GT box and the noisy box of docs/METHOD.md §3.

Boxes are ``[x_min, y_min, x_max, y_max]`` float pixel coordinates with INCLUSIVE maxima (torchvision
``masks_to_boxes``), so a box covers the pixel area ``[x_min, x_max + 1) x [y_min, y_max + 1)``; the IoU
below uses that pixel-coverage area (a one-pixel object has a box of area 1, not 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Bounded resampling loop of :func:`noisy_box`; see its fallback.
NOISY_BOX_MAX_TRIES = 100


def mask_to_box(mask: np.ndarray) -> np.ndarray:
    """bool ``HxW`` -> float32 ``[4]`` tight XYXY box (inclusive maxima). An empty mask raises."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        raise ValueError("empty mask: no box (the view should have been quarantined)")
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float32)


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two XYXY boxes with inclusive maxima (pixel-coverage areas, see module docstring)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1.0
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1.0
    inter = max(iw, 0.0) * max(ih, 0.0)
    area_a = (a[2] - a[0] + 1.0) * (a[3] - a[1] + 1.0)
    area_b = (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)
    union = area_a + area_b - inter
    return float(inter / union) if union > 0 else 0.0


def jitter_box(box: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """One DN-DETR / HQ-SAM box perturbation (no clipping): float64 ``[4]`` XYXY.

    (cx, cy, w, h) += U(-1, 1)^4 * (w/2, h/2, w, h) * scale, then back to XYXY (corners re-sorted, which
    only matters for scale > 1 where a side can flip).
    """
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    cxcywh = np.array([(x0 + x1) / 2, (y0 + y1) / 2, w, h])
    cxcywh += rng.uniform(-1.0, 1.0, size=4) * np.array([w / 2, h / 2, w, h]) * scale
    cx, cy, w, h = cxcywh
    xs = sorted((cx - w / 2, cx + w / 2))
    ys = sorted((cy - h / 2, cy + h / 2))
    return np.array([xs[0], ys[0], xs[1], ys[1]])


def clip_box(box: np.ndarray, height: int, width: int) -> np.ndarray:
    """Clip XYXY to the image's pixel range ``[0, W-1] x [0, H-1]``."""
    out = np.asarray(box, dtype=np.float64).copy()
    out[0::2] = np.clip(out[0::2], 0.0, width - 1.0)
    out[1::2] = np.clip(out[1::2], 0.0, height - 1.0)
    return out


@dataclass(frozen=True)
class NoisyBox:
    box: np.ndarray  # float32 [4]
    iou: float       # IoU with the GT box
    tries: int       # candidates drawn
    fallback: bool   # True when no candidate reached min_iou (box is then the GT box)


def noisy_box(
    gt_box: np.ndarray,
    hw: tuple[int, int],
    scale: float,
    min_iou: float,
    rng: np.random.Generator,
    max_tries: int = NOISY_BOX_MAX_TRIES,
) -> NoisyBox:
    """docs/METHOD.md §3 noisy box: :func:`jitter_box`, clip to the image, RESAMPLE until IoU(noisy, GT) >= min_iou.

    With scale 0.4 and min_iou 0.5 a candidate is accepted with high probability, so ``max_tries`` is a
    safety bound, not a tuning knob. Fallback (documented, counted by the stage): if no candidate of
    ``max_tries`` qualifies (e.g. min_iou near 1 with a large scale), the GT box itself is returned with
    ``fallback=True``; the guarantee IoU >= min_iou therefore always holds.
    """
    gt = np.asarray(gt_box, dtype=np.float64)
    for tries in range(1, max_tries + 1):
        cand = clip_box(jitter_box(gt, scale, rng), *hw).astype(np.float32)  # test what is stored
        iou = box_iou(cand, gt)
        if iou >= min_iou:
            return NoisyBox(cand, iou, tries, False)
    return NoisyBox(gt.astype(np.float32), 1.0, max_tries, True)
