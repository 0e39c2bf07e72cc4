"""Mask metrics of the evaluation protocol (docs/METHOD.md §5): mask IoU, Boundary IoU and our stability score.

Every metric works on boolean masks at the ORIGINAL image resolution. The single-mask functions take
numpy ``bool HxW`` arrays; the ``*_many`` variants take a batch ``[N, H, W]`` (numpy or torch) against one
ground truth and are what the evaluate stage uses (all prompts of one image at once).

Boundary IoU follows the reference ``mask_to_boundary`` of Cheng et al., "Boundary IoU: Improving
Object-Centric Image Segmentation Evaluation", CVPR 2021 (the version HQ-SAM evaluates with):
``d = max(1, round(ratio * diagonal))``, pad one pixel of zeros, erode ``d`` times with a 3x3 kernel,
boundary = mask - eroded. cv2 is not a dependency here, so the erosion is computed exactly in another
way (see :func:`erode`).

    python -c "from pipeline.evaluation.metrics import boundary_iou; import numpy as np; \
m = np.zeros((600, 800), bool); m[100:400, 100:500] = True; print(boundary_iou(m, np.roll(m, 20, 1)))"
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Masks are eroded in chunks of at most this many pixels (x N) so a batch of 120 masks of a
# 6-megapixel DIS5K image never needs more than a few hundred MiB of scratch space.
_CHUNK_PIXELS = 1 << 26


def _as_bool_tensor(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(masks) if not isinstance(masks, torch.Tensor) else masks
    return t if t.dtype == torch.bool else t != 0


def _check_2d(name: str, mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D HxW mask, got shape {mask.shape}")
    return mask.astype(bool, copy=False)


def _count(masks: torch.Tensor) -> np.ndarray:
    """Foreground pixels of each of ``bool [N, ...]`` -> int64 ``[N]`` (numpy's popcount on CPU: ~10x torch's sum)."""
    if masks.device.type == "cpu":
        return np.count_nonzero(masks.numpy().reshape(masks.shape[0], -1), axis=1).astype(np.int64)
    return masks.flatten(1).sum(1, dtype=torch.int64).cpu().numpy()


def _ratio(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """inter/union as float64, with an empty union counting as a perfect 1.0 (docs/METHOD.md §5)."""
    inter = np.asarray(inter, dtype=np.float64)
    union = np.asarray(union, dtype=np.float64)
    return np.where(union > 0, inter / np.maximum(union, 1.0), 1.0)


# ------------------------------------------------------------------------------------------ mask IoU
def mask_iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two ``bool HxW`` masks; an empty union (both empty) is 1.0."""
    pred, gt = _check_2d("pred", pred), _check_2d("gt", gt)
    if pred.shape != gt.shape:
        raise ValueError(f"mask_iou: shapes differ, pred {pred.shape} vs gt {gt.shape}")
    inter = np.count_nonzero(pred & gt)
    union = np.count_nonzero(pred | gt)
    return float(_ratio(inter, union))


def mask_iou_many(preds: np.ndarray | torch.Tensor, gt: np.ndarray | torch.Tensor) -> np.ndarray:
    """IoU of each of ``preds [N, H, W]`` with one ``gt [H, W]`` -> float64 ``[N]``."""
    p, g = _as_bool_tensor(preds), _as_bool_tensor(gt)
    if p.ndim != 3 or p.shape[1:] != g.shape:
        raise ValueError(f"mask_iou_many: expected preds [N,H,W] and gt [H,W], got {tuple(p.shape)} and {tuple(g.shape)}")
    return mask_iou_pairs(p, g.expand_as(p))


def mask_iou_pairs(preds: np.ndarray | torch.Tensor, gts: np.ndarray | torch.Tensor) -> np.ndarray:
    """IoU of ``preds[i]`` with ``gts[i]``, both ``[N, H, W]`` (bool, or nonzero = foreground) -> float64 ``[N]``."""
    p, g = _as_bool_tensor(preds), _as_bool_tensor(gts)
    if p.shape != g.shape or p.ndim != 3:
        raise ValueError(f"mask_iou_pairs: expected two [N,H,W] stacks, got {tuple(p.shape)} and {tuple(g.shape)}")
    return _ratio(_count(p & g), _count(p | g))


# ------------------------------------------------------------------------------------- Boundary IoU
def dilation_pixels(height: int, width: int, dilation_ratio: float = 0.02) -> int:
    """The reference erosion depth: ``max(1, round(ratio * sqrt(H^2 + W^2)))``."""
    return max(1, int(round(dilation_ratio * math.sqrt(height**2 + width**2))))


def _erode_axis(m: torch.Tensor, d: int, dim: int) -> torch.Tensor:
    """1-D erosion of bool ``m`` along ``dim`` by the window ``[i - d, i + d]`` (outside the image = 0).

    Van-Herk-style doubling: ``A_L[j] = all(P[j : j + L])`` of the zero-padded ``P`` is built for
    L = 1, 2, 4, ... (``A_2L[j] = A_L[j] & A_L[j + L]``); a window of k = 2d + 1 cells is the AND of the two
    overlapping power-of-two windows that start and end with it, so the cost is O(log k) bool passes.
    """
    n = m.shape[dim]
    k = 2 * d + 1
    pad = [d, d, 0, 0] if dim == m.ndim - 1 else [0, 0, d, d]
    a = F.pad(m, pad)  # bool zeros
    span = 1
    while 2 * span <= k:
        length = a.shape[dim] - span
        a = a.narrow(dim, 0, length) & a.narrow(dim, span, length)
        span *= 2
    return a.narrow(dim, 0, n) & a.narrow(dim, k - span, n)


def erode(masks: np.ndarray | torch.Tensor, iterations: int) -> torch.Tensor:
    """``iterations`` 3x3 erosions of ``bool [N, H, W]`` masks, with everything outside the image = 0.

    Equal to the reference ``cv2.erode(pad1(mask), ones(3, 3), iterations=d)[1:-1, 1:-1]``: the zero ring
    never changes (each ring pixel's own 0 is in its window) and pixels beyond it reach no image pixel,
    so the reference is ``d`` erosions of the zero-extended mask; ``d`` erosions by a 3x3 square are one
    erosion by the ``(2d+1)^2`` square (the Minkowski sum of ``d`` 3x3 squares), and a square erosion is a
    row erosion followed by a column erosion (min over a square = min over rows of min over columns).
    Each 1-D erosion is exact boolean logic (:func:`_erode_axis`), O(HW log d), on any device.
    """
    m = _as_bool_tensor(masks)
    if m.ndim != 3:
        raise ValueError(f"erode: expected [N, H, W] masks, got shape {tuple(m.shape)}")
    if iterations < 1:
        return m.clone()
    n, h, w = m.shape
    d = int(iterations)
    out = torch.empty_like(m)
    step = max(1, _CHUNK_PIXELS // max(1, (h + 2 * d) * (w + 2 * d)))
    for start in range(0, n, step):
        out[start : start + step] = _erode_axis(_erode_axis(m[start : start + step], d, 2), d, 1)
    return out


def mask_to_boundary_many(masks: np.ndarray | torch.Tensor, dilation_ratio: float = 0.02) -> torch.Tensor:
    """Reference boundaries of ``bool [N, H, W]`` masks -> ``bool [N, H, W]`` (mask minus its erosion)."""
    m = _as_bool_tensor(masks)
    d = dilation_pixels(m.shape[-2], m.shape[-1], dilation_ratio)
    return m & ~erode(m, d)


def mask_to_boundary(mask: np.ndarray, dilation_ratio: float = 0.02) -> np.ndarray:
    """Reference boundary of one ``bool HxW`` mask -> ``bool HxW`` (Cheng et al., CVPR 2021)."""
    mask = _check_2d("mask", mask)
    return mask_to_boundary_many(mask[None], dilation_ratio)[0].numpy()


def boundary_iou(pred: np.ndarray, gt: np.ndarray, dilation_ratio: float = 0.02) -> float:
    """Boundary IoU ``|B_G & B_P| / |B_G | B_P|`` of two ``bool HxW`` masks; empty union is 1.0."""
    pred, gt = _check_2d("pred", pred), _check_2d("gt", gt)
    if pred.shape != gt.shape:
        raise ValueError(f"boundary_iou: shapes differ, pred {pred.shape} vs gt {gt.shape}")
    return float(boundary_iou_many(pred[None], gt, dilation_ratio)[0])


def boundary_iou_many(
    preds: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    dilation_ratio: float = 0.02,
    gt_boundary: torch.Tensor | None = None,
) -> np.ndarray:
    """Boundary IoU of each of ``preds [N, H, W]`` with ``gt [H, W]`` -> float64 ``[N]``.

    ``gt_boundary`` (``bool [H, W]``) may be passed when it is already known (one per image).
    """
    p = _as_bool_tensor(preds)
    if gt_boundary is None:
        gt_boundary = mask_to_boundary_many(_as_bool_tensor(gt)[None], dilation_ratio)[0]
    if p.ndim != 3 or p.shape[1:] != gt_boundary.shape:
        raise ValueError(f"boundary_iou_many: expected preds [N,H,W] and gt [H,W], got {tuple(p.shape)} and {tuple(gt_boundary.shape)}")
    return mask_iou_many(mask_to_boundary_many(p, dilation_ratio), gt_boundary)


# ---------------------------------------------------------------------------------------- stability
def pairwise_iou(masks: np.ndarray | torch.Tensor) -> np.ndarray:
    """IoU matrix ``[K, K]`` (float64) of ``bool [K, H, W]`` masks; an empty union counts as 1.0."""
    m = _as_bool_tensor(masks)
    if m.ndim != 3:
        raise ValueError(f"pairwise_iou: expected [K, H, W] masks, got shape {tuple(m.shape)}")
    # float64 keeps the pixel counts exact (float32 would round counts above 2^24 ~ 16.7 MP).
    f = m.flatten(1).to(torch.float64)
    inter = (f @ f.T).cpu().numpy()
    area = np.diag(inter)
    union = area[:, None] + area[None, :] - inter
    return _ratio(inter, union)


def stability(masks: Sequence[np.ndarray] | np.ndarray | torch.Tensor) -> float:
    """OUR stability score (docs/METHOD.md §5 ST, not the paper's unpublished formula), in percent.

    The mean IoU over all unordered pairs of the K masks predicted for one image and one prompt type
    (its K random draws), times 100; K = 1 gives 100.
    """
    if isinstance(masks, (list, tuple)):
        if not masks:
            raise ValueError("stability: needs at least one mask")
        masks = np.stack([_check_2d(f"masks[{i}]", m) for i, m in enumerate(masks)])
    m = _as_bool_tensor(masks)
    k = m.shape[0]
    if k == 0:
        raise ValueError("stability: needs at least one mask")
    if k == 1:
        return 100.0
    iou = pairwise_iou(m)
    upper = iou[np.triu_indices(k, 1)]
    return float(upper.mean() * 100.0)


__all__ = [
    "boundary_iou",
    "boundary_iou_many",
    "dilation_pixels",
    "erode",
    "mask_iou",
    "mask_iou_many",
    "mask_to_boundary",
    "mask_to_boundary_many",
    "pairwise_iou",
    "stability",
]
