"""Score one method's masks for the prompts of one image, through :class:`pipeline.inference.Predictor`.

The image (or its cached embedding) is set on the predictor once; all its prompts are decoded together
by :meth:`Predictor.predict_prompts` (grouped by signature, never padded, post-processed to the original
resolution in bounded chunks) and scored at once (:mod:`pipeline.evaluation.metrics`); only the RLE of
each predicted mask is kept.

    from pipeline.evaluation.predict import load_predictor, predict_and_score
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from pipeline.common.cli import StageError
from pipeline.evaluation.metrics import boundary_iou_many, mask_iou_many, mask_to_boundary_many
from pipeline.inference.predictor import Predictor, resolve_bf16, resolve_device as _resolve_device
from pipeline.inference.prompts import Prompt

log = logging.getLogger(__name__)


class EvaluationError(StageError):
    """An evaluation that cannot produce results (nothing readable to score); the message says why."""


@dataclass
class ImageScores:
    """Per-prompt results for one image, in the order of the prompts given.

    ``iou``/``biou``: float64 ``[P]`` in [0, 1]; ``score``: SAM's predicted IoU ``[P]``; ``alpha1``: DRP's
    weight of the deformed features ``[P]`` or None; ``rles``: COCO RLE dicts (``counts`` as str).
    """

    iou: np.ndarray
    biou: np.ndarray
    score: np.ndarray
    alpha1: np.ndarray | None
    rles: list[dict[str, Any]]


def _encode_rles(masks: torch.Tensor) -> list[dict[str, Any]]:
    """bool ``[n, H, W]`` -> n COCO RLE dicts with str counts."""
    arr = np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
    out = mask_utils.encode(arr)
    for r in out:
        r["counts"] = r["counts"].decode("ascii")
    return out


@torch.inference_mode()
def predict_and_score(predictor: Predictor, prompts: Sequence[Prompt], gt: np.ndarray, *,
                      dilation_ratio: float = 0.02, batch_size: int = 64) -> ImageScores:
    """Decode every prompt of the predictor's current image and score it against ``gt`` (bool ``[H, W]``,
    the original size). Returns :class:`ImageScores` in the order of ``prompts``."""
    if predictor.original_size != tuple(gt.shape):
        raise ValueError(f"GT mask is {tuple(gt.shape)} but the predictor's image is {predictor.original_size}")
    gt_t = torch.from_numpy(np.ascontiguousarray(gt)).to(predictor.device)
    gt_boundary = mask_to_boundary_many(gt_t[None], dilation_ratio)[0]
    p = len(prompts)
    iou, biou, score, alpha1 = (np.full(p, np.nan) for _ in range(4))
    has_alpha = False
    rles: list[dict[str, Any] | None] = [None] * p
    for chunk in predictor.predict_prompts(prompts, batch_size=batch_size):
        idx = chunk.indices
        iou[idx] = mask_iou_many(chunk.masks, gt_t)
        biou[idx] = boundary_iou_many(chunk.masks, gt_t, dilation_ratio, gt_boundary=gt_boundary)
        score[idx] = chunk.scores
        if chunk.alpha1 is not None:
            has_alpha = True
            alpha1[idx] = chunk.alpha1
        for j, r in zip(idx, _encode_rles(chunk.masks)):
            rles[j] = r
    return ImageScores(iou, biou, score, alpha1 if has_alpha else None, rles)  # type: ignore[arg-type]


@torch.inference_mode()
def predict_rles(predictor: Predictor, prompts: Sequence[Prompt], *,
                 batch_size: int = 64) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray | None]:
    """Masks without scoring (prompts with no single GT, e.g. detections).

    Returns (COCO RLE dicts with str counts, predicted IoU ``[P]``, alpha1 ``[P]`` or None).
    """
    rles: list[dict[str, Any] | None] = [None] * len(prompts)
    score = np.full(len(prompts), np.nan)
    alpha1 = np.full(len(prompts), np.nan)
    has_alpha = False
    for chunk in predictor.predict_prompts(prompts, batch_size=batch_size):
        score[chunk.indices] = chunk.scores
        if chunk.alpha1 is not None:
            has_alpha = True
            alpha1[chunk.indices] = chunk.alpha1
        for j, r in zip(chunk.indices, _encode_rles(chunk.masks)):
            rles[j] = r
    return rles, score, (alpha1 if has_alpha else None)  # type: ignore[return-value]


def stability_from_rles(rles: Sequence[dict[str, Any]]) -> float:
    """OUR ST (:func:`pipeline.evaluation.metrics.stability`) of K masks given as RLEs, in percent.

    Uses pycocotools' exact RLE IoU (no dense masks needed); a pair of empty masks counts as IoU 1.
    """
    k = len(rles)
    if k == 0:
        raise ValueError("stability_from_rles: needs at least one mask")
    if k == 1:
        return 100.0
    iou = np.asarray(mask_utils.iou(list(rles), list(rles), [0] * k), dtype=np.float64).reshape(k, k)
    area = np.asarray(mask_utils.area(list(rles)), dtype=np.int64)
    empty = area == 0
    iou[np.ix_(empty, empty)] = 1.0  # pycocotools returns 0 for an empty union; docs/METHOD.md §5 counts it as 1
    return float(iou[np.triu_indices(k, 1)].mean() * 100.0)




# ------------------------------------------------------------------------------------------ methods
def load_predictor(params: Any, method: str, base: Path, plugins: Path | None) -> Predictor:
    """The frozen base in ``base`` + ``method`` with its trained weights from ``plugins/<method>.pt``, on
    ``evaluate.device``, post-processing ``evaluate.postprocess``, the decoder in bf16 per ``evaluate.bf16``; the
    architecture follows ``params.plugin``."""
    plugin = None
    if plugins is not None and (Path(plugins) / f"{method}.pt").is_file():
        plugin = Path(plugins) / f"{method}.pt"
    device = resolve_device(params.evaluate.device)
    bf16 = resolve_bf16(params.evaluate.bf16, device)
    log.info("%s: decoder in %s on %s (evaluate.bf16: %s)", method, "bf16" if bf16 else "fp32", device,
             params.evaluate.bf16)
    return Predictor.from_pretrained(base, method, plugin, device=device, plugin_cfg=params.plugin,
                                     postprocess=params.evaluate.postprocess, bf16=bf16)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an :class:`EvaluationError`."""
    try:
        return _resolve_device(name)
    except RuntimeError as exc:
        raise EvaluationError(f"evaluate.device: {exc}") from None


__all__ = [
    "EvaluationError",
    "ImageScores",
    "Prompt",
    "load_predictor",
    "predict_and_score",
    "predict_rles",
    "resolve_device",
    "stability_from_rles",
]
