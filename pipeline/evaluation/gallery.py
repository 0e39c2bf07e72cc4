"""The report's overlay gallery: which views to show (the same views for every method) and, per prompt type,
rows of image, GT and each method's predicted mask (drawn by :func:`pipeline.evaluation.plots.gallery`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow.parquet as pq

from pipeline.config import Params
from pipeline.data import rle
from pipeline.data.images import DecodeError, load_image, load_mask
from pipeline.evaluation import paper_numbers as paper
from pipeline.evaluation import plots
from pipeline.evaluation.metrics import mask_iou
from pipeline.evaluation.aggregate import ReportError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class GalleryInputs:
    """Where the gallery reads from (any of them missing -> no gallery, with a note)."""

    predictions_dir: Path | None
    prompts: Path | None
    index: Path | None
    root: Path | None


def _read_filtered(path: Path, columns: list[str], prompt_types: Iterable[str], draw: int) -> list[dict[str, Any]]:
    """Rows of ``path`` with the given prompt types and draw (filtered while scanning: predictions are big)."""
    try:
        table = pq.read_table(path, columns=columns,
                              filters=[("prompt_type", "in", list(prompt_types)), ("draw", "=", draw)])
    except Exception as exc:  # pyarrow raises several types for a bad/incomplete file
        raise ReportError(f"{path}: not a readable parquet with columns {columns} ({exc})") from None
    return table.to_pylist()


def select_gallery_views(candidates: Mapping[str, list[str]], n: int) -> list[tuple[str, str]]:
    """Pick ``n`` (benchmark, view_id): round robin over benchmarks, sorted view ids (not cherry-picked)."""
    queues = {b: sorted(v) for b, v in candidates.items() if v}
    picked: list[tuple[str, str]] = []
    i = 0
    while len(picked) < n and any(i < len(q) for q in queues.values()):
        for b, q in queues.items():
            if i < len(q) and len(picked) < n:
                picked.append((b, q[i]))
        i += 1
    return picked


def gallery_rows(
    params: Params, inputs: GalleryInputs, benchmarks: list[str], notes: list[str]
) -> dict[str, list[plots.GalleryRow]]:
    """``{prompt_type: rows}`` for the gallery: image + prompt, baseline mask, ours mask, GT per row.

    Every row's panel titles carry the IoU of that mask with the GT (computed here from the masks).
    Problems (missing inputs, an undecodable image) are appended to ``notes`` and the image skipped.
    """
    cfg = params.report
    n_images = params.evaluate.gallery_images
    methods = (cfg.baseline, cfg.ours)
    prompt_types = list(cfg.gallery_prompts)
    if n_images == 0 or not prompt_types:
        return {}
    missing = [f"{k} ({v or 'not given'})" for k, v in vars(inputs).items() if v is None or not Path(v).exists()]
    if missing:
        notes.append(f"gallery skipped: missing input(s): {', '.join(missing)}")
        return {}
    try:
        index_rows = {r["sample_id"]: r for r in pq.read_table(
            inputs.index, columns=["sample_id", "image_path", "mask_path"]).to_pylist()}
        prompt_rows = {(r["view_id"], r["prompt_type"]): r for r in _read_filtered(
            inputs.prompts, ["view_id", "prompt_type", "draw", "box", "points", "point_labels"], prompt_types,
            cfg.gallery_draw)}
    except Exception as exc:  # a gallery is optional: a broken index/prompts file skips it, with the reason
        notes.append(f"gallery skipped: cannot read {inputs.index} / {inputs.prompts}: {exc}")
        return {}
    preds: dict[tuple[str, str, str], str] = {}
    candidates: dict[str, list[str]] = {}
    for bench in benchmarks:
        per_method = []
        for method in methods:
            path = inputs.predictions_dir / bench / f"{method}.parquet"
            try:
                if not path.is_file():
                    raise ReportError(f"{path}: not found (evaluate {method} on {bench})")
                rows = _read_filtered(path, ["view_id", "prompt_type", "draw", "pred_rle"], prompt_types, cfg.gallery_draw)
            except ReportError as exc:
                notes.append(f"gallery: {bench} not shown: {exc}")
                per_method = []
                break
            for r in rows:
                preds[(method, r["view_id"], r["prompt_type"])] = r["pred_rle"]
            per_method.append({(r["view_id"], r["prompt_type"]) for r in rows})
        if not per_method:
            continue
        keys = set.intersection(*per_method) & set(prompt_rows)
        views = {v for v, _ in keys if all((v, p) in keys for p in prompt_types)}
        originals = {v for v in views if v.endswith("#0") and v.rsplit("#", 1)[0] in index_rows}
        if len(originals) < len(views):
            notes.append(f"gallery: {len(views) - len(originals)} {bench} view(s) are not original images; not shown")
        candidates[bench] = sorted(originals)
    picked = select_gallery_views(candidates, sum(len(v) for v in candidates.values()))  # skips refill
    out: dict[str, list[plots.GalleryRow]] = {p: [] for p in prompt_types}
    shown = 0
    for bench, view_id in picked:
        if shown == n_images:
            break
        sample = index_rows[view_id.rsplit("#", 1)[0]]
        try:
            image = load_image(inputs.root / sample["image_path"])
            gt = load_mask(inputs.root / sample["mask_path"], params.index.mask_threshold)
            rows = {p: _gallery_row(params, bench, view_id, image, gt, prompt_rows[(view_id, p)], preds) for p in prompt_types}
        except (DecodeError, OSError, ValueError) as exc:
            notes.append(f"gallery: skipped {view_id}: {exc}")
            continue
        for p, row in rows.items():
            out[p].append(row)
        shown += 1
    if shown < n_images:
        notes.append(f"gallery: {shown} of the {n_images} requested images available (evaluate.gallery_images)")
    return {p: rows for p, rows in out.items() if rows}


def _gallery_row(
    params: Params, bench: str, view_id: str, image: np.ndarray, gt: np.ndarray,
    prompt: Mapping[str, Any], preds: Mapping[tuple[str, str, str], str],
) -> plots.GalleryRow:
    h, w = gt.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and mask {(h, w)} sizes differ")
    box = None if prompt.get("box") is None else [float(v) for v in prompt["box"]]
    points = labels = None
    if prompt.get("points"):
        points = np.asarray(prompt["points"], dtype=np.float64).reshape(-1, 2)
        raw = prompt.get("point_labels")
        labels = np.ones(len(points), int) if raw is None else np.asarray(raw, dtype=int).reshape(-1)
    kind = prompt["prompt_type"].replace("_", " ")
    panels = [plots.GalleryPanel(f"image + {kind}", image, None, box=box, points=points, labels=labels)]
    colors = plots.method_colors(params.evaluate.methods)
    for method, name in ((params.report.baseline, "frozen " + paper.label(params.report.baseline)),
                         (params.report.ours, paper.label(params.report.ours))):
        mask = rle.decode(preds[(method, view_id, prompt["prompt_type"])], h, w)
        panels.append(plots.GalleryPanel(f"{name}: IoU {100 * mask_iou(mask, gt):.1f}", image, mask,
                                         colors.get(method, "#1f77b4"), box=box, points=points, labels=labels))
    panels.append(plots.GalleryPanel("ground truth", image, gt, plots.GT_COLOR))
    return plots.GalleryRow(f"{bench}\n{view_id.split('/', 1)[-1]}", panels)


__all__ = [
    "GalleryInputs", "gallery_rows", "select_gallery_views"
]
