"""Training views (docs/METHOD.md §3): the original image, large-scale-jitter views and occlusion synthesis.

Every training image gets a deterministic list of views; every eval image only its original:

- ``#0`` ``original``: the image as indexed.
- ``#1..#J`` ``jitter`` (J = ``views.jitter_views``): HQ-SAM's large-scale jitter. Flip with
  ``hflip_p``; resize so the long side is ``s * output_size`` with ``s ~ U(scale_min, scale_max)``;
  random crop to at most ``output_size``; pad bottom/right to ``output_size²`` with ``pad_fill``
  (HQ-SAM pads images with 128, masks with 0). A draw whose GT keeps fewer than ``min_mask_pixels``
  pixels is redrawn (up to ``max_tries``), otherwise the view is dropped (counted).
- ``#J+1`` ``occluded`` (with probability ``occlusion_p``): another training image's object (its GT
  mask region, scale-jittered so its image's long side is ``u * `` the occludee's, ``u ~
  U(occluder_scale_min, occluder_scale_max)``, maybe flipped) is pasted over the original image with
  its centre inside the occludee's box; the view's GT is the occludee's GT minus the occluder. A view
  keeping less than ``min_visible_frac`` of the GT area is dropped (counted).

View ids are fixed by position (``<sample_id>#<k>``), so a dropped view leaves a gap, never a shift.
Randomness comes from ``np.random.default_rng([views.seed, hash(sample_id), stream])``, and the occluder
is chosen on a hash ring of training sample ids, so adding or removing images leaves the views of the
others unchanged (except the few whose ring successor changed).

Each view stores a JSON ``spec`` holding every parameter (source paths, their content sha256, sizes,
flip, resize, crop, paste): :func:`render_view` rebuilds the view's pixels bit-exactly from it. All
geometry runs through albumentations 2.x with fixed parameters (``fill``/``fill_mask`` for padding).

    python -m stages.views --params params.yaml --index data/index/index.parquet --root data/hqseg44k --out data/views
"""
from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.atomic import atomic_path, atomic_write_json
from pipeline.config import Params, ViewsConfig
from pipeline.data import rle
from pipeline.data.index import index_metadata, mask_box, read_index
from pipeline.data.view_render import (  # the geometry half: re-exported, callers may import either module
    SPEC_VERSION,
    ViewRenderError,
    _load_checked_mask,
    jitter_image,
    jitter_mask,
    occluder_patch,
    paste_occluder,
    pasted_occluder_mask,
    render_view,
)

log = logging.getLogger(__name__)

VIEWS_FILE = "views.parquet"
SUMMARY_FILE = "summary.json"
KINDS = ("original", "jitter", "occluded")
_JITTER_STREAM = 1000  # rng stream of jitter view k is 1000 + k
_OCCLUSION_STREAM = 2000

VIEWS_SCHEMA = pa.schema([
    ("view_id", pa.string()),
    ("sample_id", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("kind", pa.string()),
    ("spec", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("mask_rle", pa.string()),
    ("mask_area", pa.int64()),
    ("box", pa.list_(pa.float32(), 4)),
])


# --------------------------------------------------------------------------------------------------
# Deterministic randomness
def stable_u64(text: str) -> int:
    """A 64-bit integer hash of ``text`` that is the same on every machine and Python run."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def sample_rng(seed: int, sample_id: str, stream: int) -> np.random.Generator:
    """The generator for one (sample, purpose) pair; independent of every other sample."""
    return np.random.default_rng([seed, stable_u64(sample_id), stream])


class OccluderRing:
    """Consistent-hash ring over training sample ids: ``pick(rng, self_id)`` returns another sample id.

    A uniformly drawn 64-bit key selects its successor on the ring, so adding an image only changes the
    picks that land next to it (instead of reshuffling everyone, as ``rng.choice(list)`` would).
    """

    def __init__(self, sample_ids: Iterable[str]) -> None:
        pairs = sorted((stable_u64("occluder-ring:" + s), s) for s in set(sample_ids))
        self.keys = [k for k, _ in pairs]
        self.ids = [s for _, s in pairs]

    def __len__(self) -> int:
        return len(self.ids)

    def pick(self, rng: np.random.Generator, self_id: str) -> str | None:
        """Another sample id (``None`` when the ring holds no other sample)."""
        if len(self.ids) < 2 and (not self.ids or self.ids[0] == self_id):
            return None
        key = int(rng.integers(0, 2**64, dtype=np.uint64))
        i = bisect.bisect_left(self.keys, key) % len(self.ids)
        if self.ids[i] == self_id:
            i = (i + 1) % len(self.ids)
        return self.ids[i]


# --------------------------------------------------------------------------------------------------
# Sampling views for one sample
@dataclass
class ViewCounts:
    """What the views stage made and dropped."""

    views: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    dropped_jitter_empty: int = 0
    occlusion_attempts: int = 0
    dropped_occlusions: int = 0
    visible_frac_sum: float = 0.0

    def add(self, other: "ViewCounts") -> None:
        for k, v in other.views.items():
            self.views[k] += v
        self.dropped_jitter_empty += other.dropped_jitter_empty
        self.occlusion_attempts += other.occlusion_attempts
        self.dropped_occlusions += other.dropped_occlusions
        self.visible_frac_sum += other.visible_frac_sum

    def as_dict(self) -> dict[str, Any]:
        kept = self.views["occluded"]
        return {
            "views": dict(self.views),
            "total_views": sum(self.views.values()),
            "dropped_jitter_empty": self.dropped_jitter_empty,
            "occlusion_attempts": self.occlusion_attempts,
            "dropped_occlusions": self.dropped_occlusions,
            "mean_visible_frac": round(self.visible_frac_sum / kept, 4) if kept else None,
        }


def _base_spec(row: Mapping[str, Any], kind: str, threshold: int) -> dict[str, Any]:
    return {
        "v": SPEC_VERSION,
        "kind": kind,
        "sample_id": row["sample_id"],
        "image_path": row["image_path"],
        "mask_path": row["mask_path"],
        "source_hw": [int(row["height"]), int(row["width"])],
        "source_sha256": row["content_sha256"],
        "mask_threshold": int(threshold),
    }


def _view_row(src: Mapping[str, Any], k: int, kind: str, spec: dict[str, Any], mask: np.ndarray) -> dict[str, Any]:
    return {
        "view_id": f"{src['sample_id']}#{k}",
        "sample_id": src["sample_id"],
        "dataset": src["dataset"],
        "split": src["split"],
        "kind": kind,
        "spec": json.dumps(spec, sort_keys=True, separators=(",", ":")),
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "mask_rle": rle.encode(mask),
        "mask_area": int(mask.sum()),
        "box": list(mask_box(mask)),
    }


def draw_jitter_spec(rng: np.random.Generator, hw: tuple[int, int], cfg: ViewsConfig, output_size: int) -> dict[str, Any]:
    """One large-scale-jitter draw: flip, resize ``[h, w]``, crop ``[x0, y0, x1, y1)``, canvas side."""
    h, w = hw
    flip = bool(rng.random() < cfg.hflip_p)
    s = float(rng.uniform(cfg.scale_min, cfg.scale_max))
    scale = s * output_size / max(h, w)
    rh, rw = max(1, int(round(h * scale))), max(1, int(round(w * scale)))
    ch, cw = min(output_size, rh), min(output_size, rw)
    y0 = int(rng.integers(0, rh - ch + 1))
    x0 = int(rng.integers(0, rw - cw + 1))
    return {"flip": flip, "scale": round(s, 6), "resize": [rh, rw], "crop": [x0, y0, x0 + cw, y0 + ch],
            "canvas": int(output_size), "pad_fill": int(cfg.pad_fill)}


def draw_occluder_spec(
    rng: np.random.Generator, target: Mapping[str, Any], occluder: Mapping[str, Any], cfg: ViewsConfig
) -> dict[str, Any]:
    """Placement of ``occluder``'s object on ``target``'s original image (both index rows)."""
    ox0, oy0, ox1, oy1 = (float(v) for v in occluder["box"])
    crop = [int(ox0), int(oy0), int(ox1) + 1, int(oy1) + 1]  # the occluder's GT box, exclusive max
    u = float(rng.uniform(cfg.occluder_scale_min, cfg.occluder_scale_max))
    f = u * max(int(target["height"]), int(target["width"])) / max(int(occluder["height"]), int(occluder["width"]))
    rh = max(1, int(round((crop[3] - crop[1]) * f)))
    rw = max(1, int(round((crop[2] - crop[0]) * f)))
    flip = bool(rng.random() < cfg.hflip_p)
    tx0, ty0, tx1, ty1 = (float(v) for v in target["box"])
    cx = int(rng.integers(int(tx0), int(tx1) + 1))  # the occluder's centre lies inside the target's box
    cy = int(rng.integers(int(ty0), int(ty1) + 1))
    return {
        "sample_id": occluder["sample_id"],
        "image_path": occluder["image_path"],
        "mask_path": occluder["mask_path"],
        "source_hw": [int(occluder["height"]), int(occluder["width"])],
        "source_sha256": occluder["content_sha256"],
        "crop": crop,
        "scale": round(u, 6),
        "resize": [rh, rw],
        "flip": flip,
        "centre": [cx, cy],
        "paste": [cx - rw // 2, cy - rh // 2],
    }


def sample_views(
    src: Mapping[str, Any],
    lookup: Mapping[str, Mapping[str, Any]],
    ring: OccluderRing,
    root: Path,
    cfg: ViewsConfig,
    output_size: int,
    threshold: int,
) -> tuple[list[dict[str, Any]], ViewCounts]:
    """All view rows of one index row ``src`` (masks only are decoded: the views stage needs no pixels)."""
    counts = ViewCounts()
    sid = src["sample_id"]
    hw = (int(src["height"]), int(src["width"]))
    mask = _load_checked_mask(root, src["mask_path"], threshold, hw)
    rows = [_view_row(src, 0, "original", _base_spec(src, "original", threshold), mask)]
    counts.views["original"] += 1
    if src["split"] != "train":
        return rows, counts

    for k in range(1, cfg.jitter_views + 1):
        rng = sample_rng(cfg.seed, sid, _JITTER_STREAM + k)
        for _ in range(cfg.max_tries):
            spec = {**_base_spec(src, "jitter", threshold), **draw_jitter_spec(rng, hw, cfg, output_size)}
            vmask = jitter_mask(mask, spec)
            if int(vmask.sum()) >= cfg.min_mask_pixels:
                rows.append(_view_row(src, k, "jitter", spec, vmask))
                counts.views["jitter"] += 1
                break
        else:
            counts.dropped_jitter_empty += 1

    rng = sample_rng(cfg.seed, sid, _OCCLUSION_STREAM)
    if rng.random() < cfg.occlusion_p:
        occ_id = ring.pick(rng, sid)
        if occ_id is not None:
            counts.occlusion_attempts += 1
            occ_row = lookup[occ_id]
            occ = draw_occluder_spec(rng, src, occ_row, cfg)
            occ_mask = _load_checked_mask(root, occ_row["mask_path"], threshold, occ["source_hw"])
            _, p_mask = occluder_patch(None, occ_mask, occ)
            vmask = mask & ~pasted_occluder_mask(hw, p_mask, occ["paste"])
            area = int(vmask.sum())
            frac = area / max(1, int(mask.sum()))
            if area == 0 or frac < cfg.min_visible_frac:
                counts.dropped_occlusions += 1
            else:
                spec = {**_base_spec(src, "occluded", threshold), "occluder": occ, "visible_frac": round(frac, 6)}
                rows.append(_view_row(src, cfg.jitter_views + 1, "occluded", spec, vmask))
                counts.views["occluded"] += 1
                counts.visible_frac_sum += frac
    return rows, counts


# --------------------------------------------------------------------------------------------------
# The stage
def index_lookup(index: pa.Table) -> dict[str, dict[str, Any]]:
    """``{sample_id: index row dict}`` for an index table."""
    return {r["sample_id"]: r for r in index.to_pylist()}


def resolve_output_size(params: Params) -> int:
    """``views.output_size``, or the base model's input side when it is 0 (the registry's ``img_size``)."""
    if params.views.output_size > 0:
        return params.views.output_size
    if params.sam.variant == "tiny":
        return params.base_pretrain.img_size
    from pipeline.modeling.backbones import get_spec  # noqa: PLC0415 - pulls in torch: only when needed

    return get_spec(params.sam.variant).img_size


_WORKER: dict[str, Any] = {}


def _init_worker(lookup: dict, ring: OccluderRing, root: Path, cfg: ViewsConfig, output_size: int, threshold: int) -> None:
    _WORKER.update(lookup=lookup, ring=ring, root=root, cfg=cfg, output_size=output_size, threshold=threshold)


def _work(sample_ids: list[str]) -> list[tuple[list[dict[str, Any]], ViewCounts]]:
    w = _WORKER
    return [sample_views(w["lookup"][s], w["lookup"], w["ring"], w["root"], w["cfg"], w["output_size"], w["threshold"])
            for s in sample_ids]


def _chunks(items: list[str], n: int) -> Iterator[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


def build_views(
    index: pa.Table,
    root: str | os.PathLike[str],
    cfg: ViewsConfig,
    *,
    output_size: int,
    mask_threshold: int,
    workers: int = 1,
    progress: bool = True,
) -> tuple[pa.Table, ViewCounts]:
    """Sample every view of ``index`` -> (views table sorted by dataset, sample_id, k; counts).

    ``workers > 1`` uses a process pool; the result does not depend on it.
    """
    from tqdm import tqdm  # noqa: PLC0415

    lookup = index_lookup(index)
    ring = OccluderRing(s for s, r in lookup.items() if r["split"] == "train")
    order = sorted(lookup, key=lambda s: (lookup[s]["dataset"], s))
    results: list[tuple[list[dict[str, Any]], ViewCounts]] = []
    bar = tqdm(total=len(order), desc="views", unit="img", disable=not progress)
    args = (lookup, ring, Path(root), cfg, output_size, mask_threshold)
    if workers > 1 and len(order) > 1:
        with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=args) as pool:
            for chunk_result in pool.map(_work, _chunks(order, 16)):
                results.extend(chunk_result)
                bar.update(len(chunk_result))
    else:
        _init_worker(*args)
        for sid in order:
            results.extend(_work([sid]))
            bar.update(1)
    bar.close()
    counts = ViewCounts()
    rows: list[dict[str, Any]] = []
    for view_rows, c in results:
        rows.extend(view_rows)
        counts.add(c)
    return pa.Table.from_pylist(rows, schema=VIEWS_SCHEMA), counts


def read_views(path: str | os.PathLike[str]) -> pa.Table:
    """Read ``views.parquet`` (a file, or the folder holding it) and check its columns."""
    path = Path(path)
    if path.is_dir():
        path = path / VIEWS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: views table not found; run `python -m stages.views` (dvc repro views)")
    table = pq.read_table(path)
    missing = [n for n in VIEWS_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not a views table (missing columns {missing}); re-run `dvc repro views`")
    return table


def run_views(
    params: Params,
    index_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    workers: int | None = None,
    progress: bool = True,
    metrics: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """The ``views`` stage: index -> ``<out_dir>/views.parquet`` + ``summary.json`` (also written to ``metrics``
    when given); returns the summary."""
    index = read_index(index_path)
    threshold = int(index_metadata(index).get("mask_threshold", params.index.mask_threshold))
    output_size = resolve_output_size(params)
    workers = workers if workers is not None else (os.cpu_count() or 1)
    table, counts = build_views(index, root, params.views, output_size=output_size, mask_threshold=threshold,
                                workers=workers, progress=progress)
    summary = {**counts.as_dict(), "output_size": output_size, "images": index.num_rows}
    meta = {"spec_version": SPEC_VERSION, "output_size": output_size, "mask_threshold": threshold}
    table = table.replace_schema_metadata({b"stable_sam": json.dumps(meta, sort_keys=True).encode()})
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        pq.write_table(table, tmp / VIEWS_FILE)
        (tmp / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    if metrics is not None:
        atomic_write_json(metrics, summary)
    log.info("views: %s", summary)
    print(f"wrote {out_dir}/{VIEWS_FILE} ({summary['total_views']} views)")
    return summary


__all__ = [
    "KINDS", "OccluderRing", "VIEWS_SCHEMA", "ViewCounts", "ViewRenderError", "build_views", "draw_jitter_spec",
    "draw_occluder_spec", "index_lookup", "jitter_image", "jitter_mask", "occluder_patch",
    "paste_occluder", "pasted_occluder_mask", "read_views", "render_view", "resolve_output_size", "run_views",
    "sample_rng", "sample_views", "stable_u64",
]
