"""Prompt rows for one view: the training mix (docs/METHOD.md §3) and the fixed evaluation draws (docs/METHOD.md §5).

Every row is a plain dict with the columns of ``data/prompts/{train,eval}.parquet`` (docs/ARCHITECTURE.md):
boxes and points in the VIEW image's pixel frame; the coarse mask as COCO RLE at ``4g x 4g`` in the
padded model-input frame. Each (view, draw[, type]) has its own generator (pipeline.prompts.seeding), so
the rows of a view never depend on the other views.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import TRAIN_PROMPT_TYPES, PromptsConfig
from pipeline.data import rle
from pipeline.modeling.transforms import Postprocess
from pipeline.prompts.boxes import mask_to_box, noisy_box
from pipeline.prompts.coarse import coarse_mask, lowres_target
from pipeline.prompts.points import foreground_index, oracle_point, sample_positive_points
from pipeline.prompts.seeding import rng_for

Row = dict[str, Any]


@dataclass
class SynthesisStats:
    """Counters the stage reports (noisy-box fallbacks must stay ~0)."""

    types: Counter = field(default_factory=Counter)
    noisy_box_fallbacks: int = 0
    noisy_box_tries: int = 0
    noisy_boxes: int = 0

    def merge(self, other: "SynthesisStats") -> None:
        self.types.update(other.types)
        self.noisy_box_fallbacks += other.noisy_box_fallbacks
        self.noisy_box_tries += other.noisy_box_tries
        self.noisy_boxes += other.noisy_boxes


@dataclass(frozen=True)
class ModelFrame:
    """What the coarse mask needs to know about the model input (from the embedding cache's metadata)."""

    img_size: int
    grid: int
    mode: Postprocess = "sam"

    @property
    def lowres_side(self) -> int:
        return 4 * self.grid


def _row(view_id: str, prompt_type: str, draw: int, *, box: np.ndarray | None = None,
         points: np.ndarray | None = None, mask_input_rle: str | None = None) -> Row:
    return {
        "view_id": view_id,
        "prompt_type": prompt_type,
        "draw": int(draw),
        "box": None if box is None else [float(v) for v in np.asarray(box).reshape(4)],
        "points": None if points is None else [float(v) for v in np.asarray(points).reshape(-1)],
        "point_labels": None if points is None else [1] * int(np.asarray(points).shape[0]),
        "mask_input_rle": mask_input_rle,
    }


def _noisy(gt: np.ndarray, hw: tuple[int, int], cfg: PromptsConfig, rng: np.random.Generator,
           stats: SynthesisStats) -> np.ndarray:
    nb = noisy_box(gt, hw, cfg.box_noise_scale, cfg.noisy_box_min_iou, rng)
    stats.noisy_boxes += 1
    stats.noisy_box_tries += nb.tries
    stats.noisy_box_fallbacks += int(nb.fallback)
    return nb.box


def train_prompts(view_id: str, mask: np.ndarray, cfg: PromptsConfig, frame: ModelFrame,
                  stats: SynthesisStats | None = None) -> list[Row]:
    """``cfg.train_prompts_per_view`` training prompts for one view (bool ``HxW`` GT mask).

    Draw ``d`` is used in training epoch ``d mod n``. The type is drawn from ``cfg.train_type_probs``;
    ``points`` takes its count from ``cfg.train_point_counts`` (uniform).
    """
    stats = stats if stats is not None else SynthesisStats()
    names = [t for t in TRAIN_PROMPT_TYPES if cfg.train_type_probs.get(t, 0.0) > 0]
    probs = np.array([cfg.train_type_probs[t] for t in names], dtype=np.float64)
    probs /= probs.sum()
    hw = (int(mask.shape[0]), int(mask.shape[1]))
    gt = mask_to_box(mask)
    fg: np.ndarray | None = None
    soft: np.ndarray | None = None
    rows = []
    for draw in range(cfg.train_prompts_per_view):
        rng = rng_for(cfg.seed, "train", view_id, draw)
        kind = names[int(rng.choice(len(names), p=probs))]
        stats.types[kind] += 1
        if kind == "gt_box":
            rows.append(_row(view_id, kind, draw, box=gt))
        elif kind == "noisy_box":
            rows.append(_row(view_id, kind, draw, box=_noisy(gt, hw, cfg, rng, stats)))
        elif kind == "points":
            fg = foreground_index(mask) if fg is None else fg
            k = int(cfg.train_point_counts[int(rng.integers(len(cfg.train_point_counts)))])
            rows.append(_row(view_id, kind, draw, points=sample_positive_points(fg, hw[1], k, rng)))
        else:  # coarse_mask
            if soft is None:
                soft = lowres_target(mask, frame.img_size, frame.lowres_side, frame.mode)
            coarse = coarse_mask(soft, cfg.coarse_mask_band, rng)
            rows.append(_row(view_id, kind, draw, mask_input_rle=rle.encode(coarse)))
    return rows


def eval_prompts(view_id: str, mask: np.ndarray, cfg: PromptsConfig,
                 stats: SynthesisStats | None = None) -> list[Row]:
    """Every type of ``cfg.eval_types`` for one view: ``gt_box`` and ``oracle_point`` once (draw 0),
    random types (``noisy_box``, ``point_K`` = K random positive points) ``cfg.eval_draws`` times."""
    stats = stats if stats is not None else SynthesisStats()
    hw = (int(mask.shape[0]), int(mask.shape[1]))
    gt = mask_to_box(mask)
    fg = foreground_index(mask)
    rows = []
    for kind in cfg.eval_types:
        if kind == "gt_box":
            rows.append(_row(view_id, kind, 0, box=gt))
        elif kind == "oracle_point":
            rows.append(_row(view_id, kind, 0, points=oracle_point(mask)))
        else:
            for draw in range(cfg.eval_draws):
                rng = rng_for(cfg.seed, "eval", view_id, kind, draw)
                if kind == "noisy_box":
                    rows.append(_row(view_id, kind, draw, box=_noisy(gt, hw, cfg, rng, stats)))
                elif kind.startswith("point_"):
                    k = int(kind.split("_", 1)[1])
                    rows.append(_row(view_id, kind, draw, points=sample_positive_points(fg, hw[1], k, rng)))
                else:  # pragma: no cover - the config validates eval_types
                    raise ValueError(f"unknown eval prompt type {kind!r}")
        stats.types[kind] += 1
    return rows
