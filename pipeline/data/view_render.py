"""Rebuilding a training view's pixels from its stored spec (the geometry of pipeline/data/views.py).

A view row's JSON ``spec`` holds every parameter (source paths and their content sha256, sizes, flip,
resize, crop, paste); :func:`render_view` replays it bit-exactly with albumentations 2.x transforms with
fixed parameters (``fill``/``fill_mask`` for padding), so views are stored as a few hundred bytes of
JSON and rendered on demand by the embed stage.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import albumentations as A
import cv2
import numpy as np

from pipeline.common.cli import StageError
from pipeline.data.images import load_image, load_mask

SPEC_VERSION = 1


class ViewRenderError(StageError):
    """A view that cannot be rebuilt (missing/changed source file); the message names the file and the fix."""



# --------------------------------------------------------------------------------------------------
# Geometry (albumentations 2.x with fixed parameters: deterministic, no random draws inside)
def _mask_u8(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * np.uint8(255)


def _run(transforms: list[A.BasicTransform], array: np.ndarray) -> np.ndarray:
    return A.Compose(transforms)(image=array)["image"]


def _check_crop(box: Sequence[int], hw: Sequence[int]) -> None:
    """A crop outside the image it applies to means a stale or hand-edited views table."""
    x0, y0, x1, y1 = (int(v) for v in box)
    h, w = int(hw[0]), int(hw[1])
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ViewRenderError(f"view spec crop {list(box)} lies outside its {w}x{h} image; re-run `dvc repro views`")


def _jitter_transforms(spec: Mapping[str, Any], fill: int) -> list[A.BasicTransform]:
    rh, rw = spec["resize"]
    x0, y0, x1, y1 = spec["crop"]
    _check_crop(spec["crop"], (rh, rw))
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


def _occluder_transforms(occ: Mapping[str, Any], hw: Sequence[int]) -> list[A.BasicTransform]:
    x0, y0, x1, y1 = occ["crop"]
    _check_crop(occ["crop"], hw)
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
    ts = _occluder_transforms(occ, mask.shape[:2])
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


SourceCache = dict[tuple[str, str, int], np.ndarray]
"""Decoded source files shared by the views rendered with it: {("image"|"mask", path, threshold): array}."""


def _cached(sources: SourceCache | None, key: tuple[str, str, int], load: Callable[[], np.ndarray]) -> np.ndarray:
    """``load()``, or the array an earlier call with the same ``sources`` decoded (kept read-only: shared)."""
    if sources is None:
        return load()
    array = sources.get(key)
    if array is None:
        array = load()
        array.setflags(write=False)
        sources[key] = array
    return array


def _load_checked_image(root: Path, rel: str, hw: Sequence[int], sources: SourceCache | None = None) -> np.ndarray:
    path = _src(root, rel)

    def load() -> np.ndarray:
        if not path.is_file():
            raise ViewRenderError(f"{path}: source image missing; re-run `dvc repro index views` (or fix --root)")
        return load_image(path)

    image = _cached(sources, ("image", str(path), 0), load)
    if tuple(image.shape[:2]) != tuple(hw):
        raise ViewRenderError(
            f"{path}: image is {image.shape[1]}x{image.shape[0]}, the views were made for "
            f"{hw[1]}x{hw[0]}; the file changed: re-run `dvc repro index views`"
        )
    return image


def _load_checked_mask(
    root: Path, rel: str, threshold: int, hw: Sequence[int], sources: SourceCache | None = None
) -> np.ndarray:
    path = _src(root, rel)

    def load() -> np.ndarray:
        if not path.is_file():
            raise ViewRenderError(f"{path}: source mask missing; re-run `dvc repro index views` (or fix --root)")
        return load_mask(path, threshold)

    mask = _cached(sources, ("mask", str(path), int(threshold)), load)
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
    sources: SourceCache | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Rebuild one view's pixels: (image uint8 ``HxWx3``, GT bool ``HxW``); either is None when not asked for.

    ``row`` is a views-table row (needs ``spec``); ``index`` is optional (a ``{sample_id: index row}``
    mapping enables a content-hash check; the spec itself holds the source paths); ``root`` is the dataset root.
    ``sources`` (optional, e.g. one per batch of views) memoises decoded source files across calls: views of
    one image and shared occluders are decoded once; what it returns may then be read-only (never mutate it).
    """
    spec = json.loads(row["spec"])
    if spec.get("v") != SPEC_VERSION:
        raise ViewRenderError(f"view {row.get('view_id')}: spec version {spec.get('v')} != {SPEC_VERSION}; "
                              "re-run `dvc repro views`")
    if index is not None:
        _check_against_index(spec, index)
    root = Path(root)
    thr = int(spec["mask_threshold"])
    image = _load_checked_image(root, spec["image_path"], spec["source_hw"], sources) if with_image else None
    mask = _load_checked_mask(root, spec["mask_path"], thr, spec["source_hw"], sources) if with_mask else None
    kind = spec["kind"]
    if kind == "original":
        return image, mask
    if kind == "jitter":
        out_img = jitter_image(image, spec) if image is not None else None
        return out_img, (jitter_mask(mask, spec) if mask is not None else None)
    if kind == "occluded":
        occ = spec["occluder"]
        occ_img = _load_checked_image(root, occ["image_path"], occ["source_hw"], sources) if with_image else None
        occ_mask = _load_checked_mask(root, occ["mask_path"], thr, occ["source_hw"], sources)
        p_img, p_mask = occluder_patch(occ_img, occ_mask, occ)
        out_img = paste_occluder(image, p_img, p_mask, occ["paste"]) if image is not None else None
        if mask is None:
            return out_img, None
        return out_img, mask & ~pasted_occluder_mask(mask.shape, p_mask, occ["paste"])
    raise ViewRenderError(f"view {row.get('view_id')}: unknown kind {kind!r}")


__all__ = [
    "SPEC_VERSION", "SourceCache", "ViewRenderError", "jitter_image", "jitter_mask", "occluder_patch", "paste_occluder",
    "pasted_occluder_mask", "render_view",
]
