"""The training sanity check: mIoU before and after training on enough views to mean something.

For every training view (or the first ``train.sanity_views``) and every eval view (same cap), three
prompts are drawn from the GT with the prompts stage's own functions, seeded per (seed, view, kind):
a GT box, a noisy box and one positive point. Each is decoded through the
predictor's decode and post-processing (the evaluation path) and scored at the view's original resolution. "Fit" (train) next to "generalisation" (eval) says whether a plugin learned its
training data at all, and whether that carried over.

    result = sanity_iou(Predictor(sam, model), sanity_views(Path("data/embeddings"), 0), params)
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.config import Params
from pipeline.data import rle
from pipeline.data.embedding_reader import iter_views
from pipeline.evaluation.metrics import mask_iou_many
from pipeline.inference.predictor import Predictor
from pipeline.inference.prompts import Prompt, collate, group_by_signature
from pipeline.prompts.boxes import mask_to_box, noisy_box
from pipeline.prompts.points import foreground_index, sample_positive_points
from pipeline.prompts.seeding import rng_for

SANITY_TYPES = ("gt_box", "noisy_box", "point_1")
SPLITS = ("train", "eval")


@dataclass
class SanityView:
    """One view to score: its cached embedding (fp16 ``[C, g, g]``), GT (bool ``[H, W]``) and input size."""

    view_id: str
    split: str
    embedding: torch.Tensor
    mask: np.ndarray
    input_hw: tuple[int, int]


def sanity_views(embeddings: Path, limit: int) -> list[SanityView]:
    """The first ``limit`` views (0 = all) with a non-empty GT of each split, in stored order."""
    views: list[SanityView] = []
    for split in SPLITS:
        n = 0
        for row in iter_views(embeddings, split):
            mask = rle.decode(row["mask_rle"], int(row["height"]), int(row["width"]))
            if not mask.any():
                continue
            views.append(SanityView(row["view_id"], split, row["embedding"].half(), mask,
                                    (int(row["input_h"]), int(row["input_w"]))))
            n += 1
            if limit and n >= limit:
                break
    return views


def sanity_prompts(view: SanityView, params: Params) -> list[Prompt]:
    """GT box, noisy box and one positive point for ``view`` (seeded by the view, never by the run)."""
    out = []
    gt = mask_to_box(view.mask)
    for kind in SANITY_TYPES:
        rng = rng_for(params.seed, "sanity", view.view_id, kind)
        if kind == "gt_box":
            out.append(Prompt(box=gt, prompt_type=kind))
        elif kind == "noisy_box":
            nb = noisy_box(gt, view.mask.shape, params.prompts.box_noise_scale, params.prompts.noisy_box_min_iou, rng)
            out.append(Prompt(box=nb.box, prompt_type=kind))
        else:
            pts = sample_positive_points(foreground_index(view.mask), view.mask.shape[1], 1, rng)
            out.append(Prompt(points=pts, prompt_type=kind))
    return out


@torch.no_grad()
def sanity_iou(predictor: Predictor, views: Sequence[SanityView], params: Params, batch_size: int = 64) -> dict[str, Any]:
    """``{split: {kind: mIoU in percent}, "views": {split: count}}`` for the predictor's method.

    Prompts of many views are decoded together (grouped by signature, one embedding per row) through
    :meth:`Predictor.decode`, then each mask is post-processed to its own view's size.
    """
    if not views:
        return {}
    decoder = predictor.decoder
    was_training = decoder.training
    decoder.eval()
    rows: list[tuple[SanityView, Prompt]] = []
    for view in views:
        for prompt in sanity_prompts(view, params):
            rows.append((view, prompt.in_input_frame(view.mask.shape, predictor.img_size, predictor.mode)))  # type: ignore[arg-type]
    scores: dict[str, dict[str, list[float]]] = {s: {k: [] for k in SANITY_TYPES} for s in SPLITS}
    try:
        for _sig, members in group_by_signature([p for _, p in rows]):
            for start in range(0, len(members), batch_size):
                chunk = [rows[i] for i in members[start : start + batch_size]]
                emb = torch.stack([v.embedding for v, _ in chunk]).to(predictor.device, torch.float32)
                low = predictor.decode(emb, collate([p for _, p in chunk], predictor.device)).low_res_logits[:, :1]
                for j, (view, prompt) in enumerate(chunk):
                    mask = predictor.postprocess(low[j : j + 1], view.input_hw, view.mask.shape)[0, 0] > 0  # type: ignore[arg-type]
                    gt = torch.from_numpy(view.mask).to(mask.device)
                    scores[view.split][prompt.prompt_type].append(float(mask_iou_many(mask[None], gt)[0]))
    finally:
        decoder.train(was_training)
    out: dict[str, Any] = {"views": {s: sum(v.split == s for v in views) for s in SPLITS}}
    for split, by_kind in scores.items():
        if by_kind[SANITY_TYPES[0]]:
            out[split] = {k: round(100.0 * float(np.mean(v)), 3) for k, v in by_kind.items()}
    return out


__all__ = ["SANITY_TYPES", "SanityView", "sanity_iou", "sanity_prompts", "sanity_views"]
