"""Training views (SPEC §3): the original image, large-scale-jitter views and occlusion synthesis.

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
from typing import Any, Iterable, Iterator, Mapping, Sequence

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipeline.common.cli import StageError
from pipeline.common.atomic import atomic_path  # noqa: E402
from pipeline.config import Params, ViewsConfig  # noqa: E402
from pipeline.data import rle  # noqa: E402
from pipeline.data.images import load_image, load_mask  # noqa: E402
from pipeline.data.index import index_metadata, mask_box, read_index  # noqa: E402

log = logging.getLogger(__name__)

SPEC_VERSION = 1
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


class ViewRenderError(StageError):
    """A view that cannot be rebuilt (missing/changed source file); the message names the file and the fix."""


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
# Geometry (albumentations with fixed parameters: deterministic, no random draws inside)
def _mask_u8(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * np.uint8(255)


def _run(transforms: list[A.BasicTransform], array: np.ndarray) -> np.ndarray:
    return A.Compose(transforms)(image=array)["image"]


def _jitter_transforms(spec: Mapping[str, Any], fill: int) -> list[A.BasicTransform]:
    rh, rw = spec["resize"]
    x0, y0, x1, y1 = spec["crop"]
    size = spec["canvas"]
    ts: list[A.BasicTransform] = [A.HorizontalFlip(p=1.0)] if spec["flip"] else []
    ts += [
        A.Resize(rh, rw, interpolation=cv2.INTER_LINEAR),
        A.Crop(x_min=x0, y_min=y0, x_max=x1, y_max=y1),
        A.PadIfNeeded(min_height=size, min_width=size, position="top_left",
                      border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=0),
    ]
    return ts


def jitter_image(image: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """uint8 ``HxWx3`` -> the jitter view's ``canvas x canvas x 3`` image (padding = ``pad_fill``)."""
    return _run(_jitter_transforms(spec, int(spec["pad_fill"])), image)


def jitter_mask(mask: np.ndarray, spec: Mapping[str, Any]) -> np.ndarray:
    """bool ``HxW`` -> the jitter view's bool ``canvas x canvas`` GT (bilinear on 0/255, > 127; pad 0)."""
    return _run(_jitter_transforms(spec, 0), _mask_u8(mask)) > 127


def _occluder_transforms(occ: Mapping[str, Any]) -> list[A.BasicTransform]:
    x0, y0, x1, y1 = occ["crop"]
    rh, rw = occ["resize"]
    ts: list[A.BasicTransform] = [A.Crop(x_min=x0, y_min=y0, x_max=x1, y_max=y1)]
    if occ["flip"]:
        ts.append(A.HorizontalFlip(p=1.0))
    ts.append(A.Resize(rh, rw, interpolation=cv2.INTER_LINEAR))
    return ts


def occluder_patch(
    image: np.ndarray | None, mask: np.ndarray, occ: Mapping[str, Any]
) -> tuple[np.ndarray | None, np.ndarray]:
    """The occluder's (image ``rh x rw x 3`` or None, bool mask ``rh x rw``) after crop, flip and resize."""
    ts = _occluder_transforms(occ)
    patch_mask = _run(ts, _mask_u8(mask)) > 127
    patch_img = _run(ts, image) if image is not None else None
    return patch_img, patch_mask


def _paste_window(
    canvas_hw: tuple[int, int], patch_hw: tuple[int, int], top_left: Sequence[int]
) -> tuple[slice, slice, slice, slice] | None:
    """(canvas rows, canvas cols, patch rows, patch cols) of a patch placed at ``(x, y)``; None if outside."""
    H, W = canvas_hw
    h, w = patch_hw
    x, y = int(top_left[0]), int(top_left[1])
    cy0, cx0 = max(0, y), max(0, x)
    cy1, cx1 = min(H, y + h), min(W, x + w)
    if cy1 <= cy0 or cx1 <= cx0:
        return None
    return slice(cy0, cy1), slice(cx0, cx1), slice(cy0 - y, cy1 - y), slice(cx0 - x, cx1 - x)


def pasted_occluder_mask(canvas_hw: tuple[int, int], patch_mask: np.ndarray, top_left: Sequence[int]) -> np.ndarray:
    """bool ``HxW``: where the occluder covers the canvas."""
    out = np.zeros(canvas_hw, dtype=bool)
    win = _paste_window(canvas_hw, patch_mask.shape, top_left)
    if win is not None:
        cr, cc, pr, pc = win
        out[cr, cc] = patch_mask[pr, pc]
    return out


def paste_occluder(image: np.ndarray, patch_img: np.ndarray, patch_mask: np.ndarray, top_left: Sequence[int]) -> np.ndarray:
    """A copy of ``image`` (``HxWx3``) with the occluder's pixels (where its mask is set) pasted in."""
    out = image.copy()
    win = _paste_window(image.shape[:2], patch_mask.shape, top_left)
    if win is not None:
        cr, cc, pr, pc = win
        sel = patch_mask[pr, pc]
        out[cr, cc][sel] = patch_img[pr, pc][sel]
    return out


# --------------------------------------------------------------------------------------------------
# Rendering a stored view
def _src(root: Path, rel: str) -> Path:
    return Path(root) / rel


def _load_checked_image(root: Path, rel: str, hw: Sequence[int]) -> np.ndarray:
    path = _src(root, rel)
    if not path.is_file():
        raise ViewRenderError(f"{path}: source image missing; re-run `dvc repro index views` (or fix --root)")
    image = load_image(path)
    if tuple(image.shape[:2]) != tuple(hw):
        raise ViewRenderError(
            f"{path}: image is {image.shape[1]}x{image.shape[0]}, the views were made for "
            f"{hw[1]}x{hw[0]}; the file changed: re-run `dvc repro index views`"
        )
    return image


def _load_checked_mask(root: Path, rel: str, threshold: int, hw: Sequence[int]) -> np.ndarray:
    path = _src(root, rel)
    if not path.is_file():
        raise ViewRenderError(f"{path}: source mask missing; re-run `dvc repro index views` (or fix --root)")
    mask = load_mask(path, threshold)
    if tuple(mask.shape) != tuple(hw):
        raise ViewRenderError(f"{path}: mask size changed since the views were made; re-run `dvc repro index views`")
    return mask


def _check_against_index(spec: Mapping[str, Any], index: Any) -> None:
    """Optional guard: the index's content hash must still be the one the view was made from."""
    lookup = index if isinstance(index, Mapping) else None
    if lookup is None:  # a pandas DataFrame or pyarrow Table
        return
    for src in [spec] + ([spec["occluder"]] if "occluder" in spec else []):
        row = lookup.get(src["sample_id"])
        if row is not None and row["content_sha256"] != src["source_sha256"]:
            raise ViewRenderError(
                f"view spec of {src['sample_id']} was made from other file contents than the index holds; "
                "re-run `dvc repro views`"
            )


def render_view(
    row: Mapping[str, Any],
    index: Any = None,
    root: str | os.PathLike[str] = ".",
    *,
    with_image: bool = True,
    with_mask: bool = True,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Rebuild one view's pixels: (image uint8 ``HxWx3``, GT bool ``HxW``); either is None when not asked for.

    ``row`` is a views-table row (needs ``spec``); ``index`` is optional (a ``{sample_id: index row}``
    mapping enables a content-hash check; the spec itself holds the source paths); ``root`` is the dataset root.
    """
    spec = json.loads(row["spec"])
    if spec.get("v") != SPEC_VERSION:
        raise ViewRenderError(f"view {row.get('view_id')}: spec version {spec.get('v')} != {SPEC_VERSION}; "
                              "re-run `dvc repro views`")
    if index is not None:
        _check_against_index(spec, index)
    root = Path(root)
    thr = int(spec["mask_threshold"])
    image = _load_checked_image(root, spec["image_path"], spec["source_hw"]) if with_image else None
    mask = _load_checked_mask(root, spec["mask_path"], thr, spec["source_hw"]) if with_mask else None
    kind = spec["kind"]
    if kind == "original":
        return image, mask
    if kind == "jitter":
        out_img = jitter_image(image, spec) if image is not None else None
        return out_img, (jitter_mask(mask, spec) if mask is not None else None)
    if kind == "occluded":
        occ = spec["occluder"]
        occ_img = _load_checked_image(root, occ["image_path"], occ["source_hw"]) if with_image else None
        occ_mask = _load_checked_mask(root, occ["mask_path"], thr, occ["source_hw"])
        p_img, p_mask = occluder_patch(occ_img, occ_mask, occ)
        out_img = paste_occluder(image, p_img, p_mask, occ["paste"]) if image is not None else None
        if mask is None:
            return out_img, None
        return out_img, mask & ~pasted_occluder_mask(mask.shape, p_mask, occ["paste"])
    raise ViewRenderError(f"view {row.get('view_id')}: unknown kind {kind!r}")


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
) -> dict[str, Any]:
    """The ``views`` stage: index -> ``<out_dir>/views.parquet`` + ``summary.json``; returns the summary."""
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
    log.info("views: %s", summary)
    return summary


__all__ = [
    "KINDS", "OccluderRing", "VIEWS_SCHEMA", "ViewCounts", "ViewRenderError", "build_views", "draw_jitter_spec",
    "draw_occluder_spec", "index_lookup", "jitter_image", "jitter_mask", "occluder_patch",
    "paste_occluder", "pasted_occluder_mask", "read_views", "render_view", "resolve_output_size", "run_views",
    "sample_rng", "sample_views", "stable_u64",
]
