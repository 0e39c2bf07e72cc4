"""The embed stage's input pipeline equals its straightforward reference bit for bit.

Rendering (pipeline/data/view_render.py) calls OpenCV/numpy directly and preprocessing
(pipeline/modeling/transforms.py) normalises by table lookup into one batch buffer; the references here
are the plain formulations the embedding cache was made with: albumentations pipelines with fixed
parameters, then torchvision's PIL resize, torch normalisation and ``F.pad``. Any difference in what the
encoder sees (interpolation, rounding, order, dtype, padding) fails these tests.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.transforms.functional import resize, to_pil_image

from pipeline.data import view_render
from pipeline.data.embed import _all_finite, render_batch, sort_views
from pipeline.data.images import load_image, load_mask
from pipeline.data.view_render import jitter_image, jitter_mask, occluder_patch, render_view
from pipeline.data.views import build_views
from pipeline.modeling.transforms import PIXEL_MEAN, PIXEL_STD, preprocess, preprocess_into
from tests.fakes import small_index, views_cfg

IMG = 64


# --------------------------------------------------------------------------------------------------
# References: the straightforward formulations
def ref_preprocess(image: np.ndarray, img_size: int, mode: str = "sam") -> tuple[torch.Tensor, tuple[int, int]]:
    """SamPredictor.set_image: PIL resize, then Sam.preprocess (torch normalise, zero-pad bottom/right)."""
    h, w = image.shape[:2]
    in_h, in_w = (img_size, img_size) if mode == "squash" else ResizeLongestSide.get_preprocess_shape(h, w, img_size)
    resized = np.array(resize(to_pil_image(np.ascontiguousarray(image)), [in_h, in_w]))
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous().float()
    x = (x - torch.tensor(PIXEL_MEAN).view(3, 1, 1)) / torch.tensor(PIXEL_STD).view(3, 1, 1)
    return F.pad(x, (0, img_size - in_w, 0, img_size - in_h)), (in_h, in_w)


def _compose(transforms: list[A.BasicTransform], array: np.ndarray) -> np.ndarray:
    return A.Compose(transforms)(image=array)["image"]


def _ref_jitter(array: np.ndarray, spec: Mapping[str, Any], fill: int) -> np.ndarray:
    rh, rw = spec["resize"]
    x0, y0, x1, y1 = spec["crop"]
    ts: list[A.BasicTransform] = [A.HorizontalFlip(p=1.0)] if spec["flip"] else []
    ts += [A.Resize(rh, rw, interpolation=cv2.INTER_LINEAR), A.Crop(x_min=x0, y_min=y0, x_max=x1, y_max=y1),
           A.PadIfNeeded(min_height=spec["canvas"], min_width=spec["canvas"], position="top_left",
                         border_mode=cv2.BORDER_CONSTANT, fill=fill, fill_mask=0)]
    return _compose(ts, array)


def _ref_occluder(array: np.ndarray, occ: Mapping[str, Any]) -> np.ndarray:
    x0, y0, x1, y1 = occ["crop"]
    ts: list[A.BasicTransform] = [A.Crop(x_min=x0, y_min=y0, x_max=x1, y_max=y1)]
    if occ["flip"]:
        ts.append(A.HorizontalFlip(p=1.0))
    ts.append(A.Resize(occ["resize"][0], occ["resize"][1], interpolation=cv2.INTER_LINEAR))
    return _compose(ts, array)


def _u8(mask: np.ndarray) -> np.ndarray:
    return mask.astype(np.uint8) * np.uint8(255)


def ref_render(row: Mapping[str, Any], root: Path) -> tuple[np.ndarray, np.ndarray]:
    """A view's (image, GT mask), every source decoded afresh and the geometry run through albumentations."""
    spec = json.loads(row["spec"])
    thr = int(spec["mask_threshold"])
    image = load_image(root / spec["image_path"])
    mask = load_mask(root / spec["mask_path"], thr)
    if spec["kind"] == "jitter":
        return _ref_jitter(image, spec, int(spec["pad_fill"])), _ref_jitter(_u8(mask), spec, 0) > 127
    if spec["kind"] == "occluded":
        occ = spec["occluder"]
        p_img = _ref_occluder(load_image(root / occ["image_path"]), occ)
        p_mask = _ref_occluder(_u8(load_mask(root / occ["mask_path"], thr)), occ) > 127
        out, cover = image.copy(), np.zeros(mask.shape, bool)
        x, y = occ["paste"]
        for yy in range(p_mask.shape[0]):  # pixel by pixel: no window arithmetic to share with the code under test
            for xx in range(p_mask.shape[1]):
                if p_mask[yy, xx] and 0 <= y + yy < out.shape[0] and 0 <= x + xx < out.shape[1]:
                    out[y + yy, x + xx] = p_img[yy, xx]
                    cover[y + yy, x + xx] = True
        return out, mask & ~cover
    assert spec["kind"] == "original"
    return image, mask


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal shapes, dtypes and bit patterns (so -0.0 != 0.0 and NaN == NaN)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# --------------------------------------------------------------------------------------------------
# Preprocessing
def all_levels_image(h: int, w: int) -> np.ndarray:
    """uint8 ``h x w x 3`` whose channels each cycle through all 256 levels (shifted per channel)."""
    base = np.arange(h * w, dtype=np.int64).reshape(h, w)
    return np.stack([(base * 7 + 85 * c) % 256 for c in range(3)], axis=2).astype(np.uint8)


@pytest.mark.parametrize("hw", [(64, 64), (48, 80), (80, 48), (37, 100), (5, 300), (300, 5), (130, 129)])
@pytest.mark.parametrize("img_size", [64, 1024])
@pytest.mark.parametrize("mode", ["sam", "squash"])
def test_preprocess_matches_sam_arithmetic_bit_for_bit(hw: tuple[int, int], img_size: int, mode: str) -> None:
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    for image in (all_levels_image(*hw), rng.integers(0, 256, (*hw, 3), dtype=np.uint8)):
        expected, ehw = ref_preprocess(image, img_size, mode)
        got, ghw = preprocess(image, img_size, mode)
        assert ghw == ehw
        assert same_bits(got, expected)


def test_every_level_normalises_like_torch() -> None:
    """All 3 x 256 (channel, level) pairs: the lookup table is the torch arithmetic, bit for bit."""
    image = all_levels_image(IMG, IMG)  # 64² >= 256 pixels per channel: every level occurs, no resize
    assert all(len(np.unique(image[..., c])) == 256 for c in range(3))
    expected, _ = ref_preprocess(image, IMG)
    got, _ = preprocess(image, IMG)
    assert same_bits(got, expected)


def test_preprocess_into_writes_every_element_of_its_buffer() -> None:
    image = all_levels_image(30, 50)
    out = np.full((3, IMG, IMG), np.nan, dtype=np.float32)
    hw = preprocess_into(image, out, IMG)
    expected, ehw = ref_preprocess(image, IMG)
    assert hw == ehw
    assert same_bits(torch.from_numpy(out), expected)
    with pytest.raises(ValueError, match="output buffer"):
        preprocess_into(image, np.empty((3, IMG, IMG + 1), np.float32), IMG)
    with pytest.raises(ValueError, match="uint8 HxWx3"):
        preprocess_into(image[..., :2], out, IMG)


# --------------------------------------------------------------------------------------------------
# Geometry against albumentations
def random_jitter_spec(rng: np.random.Generator, h: int, w: int) -> dict[str, Any]:
    rh = int(rng.integers(1, 3 * h)) if rng.random() < 0.8 else h  # sometimes no resize at all
    rw = int(rng.integers(1, 3 * w)) if rng.random() < 0.8 else w
    canvas = int(rng.integers(8, 96))
    ch, cw = int(rng.integers(1, min(rh, canvas) + 1)), int(rng.integers(1, min(rw, canvas) + 1))
    y0, x0 = int(rng.integers(0, rh - ch + 1)), int(rng.integers(0, rw - cw + 1))
    return {"flip": bool(rng.random() < 0.5), "resize": [rh, rw], "crop": [x0, y0, x0 + cw, y0 + ch],
            "canvas": canvas, "pad_fill": int(rng.integers(0, 256))}


def random_occluder_spec(rng: np.random.Generator, h: int, w: int) -> dict[str, Any]:
    y0, x0 = int(rng.integers(0, h)), int(rng.integers(0, w))
    y1, x1 = int(rng.integers(y0 + 1, h + 1)), int(rng.integers(x0 + 1, w + 1))
    rh = int(rng.integers(1, 2 * h)) if rng.random() < 0.8 else y1 - y0
    rw = int(rng.integers(1, 2 * w)) if rng.random() < 0.8 else x1 - x0
    return {"crop": [x0, y0, x1, y1], "flip": bool(rng.random() < 0.5), "resize": [rh, rw]}


def noise_scene(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    h, w = int(rng.integers(2, 90)), int(rng.integers(2, 90))
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = rng.random((h, w)) < rng.uniform(0.1, 0.9)
    return image, mask


def test_jitter_geometry_equals_albumentations() -> None:
    rng = np.random.default_rng(0)
    flips = set()
    for _ in range(150):
        image, mask = noise_scene(rng)
        spec = random_jitter_spec(rng, *mask.shape)
        flips.add(spec["flip"])
        np.testing.assert_array_equal(jitter_image(image, spec), _ref_jitter(image, spec, spec["pad_fill"]))
        np.testing.assert_array_equal(jitter_mask(mask, spec), _ref_jitter(_u8(mask), spec, 0) > 127)
    assert flips == {False, True}


def test_occluder_geometry_equals_albumentations() -> None:
    rng = np.random.default_rng(1)
    for _ in range(150):
        image, mask = noise_scene(rng)
        occ = random_occluder_spec(rng, *mask.shape)
        p_img, p_mask = occluder_patch(image, mask, occ)
        np.testing.assert_array_equal(p_img, _ref_occluder(image, occ))
        np.testing.assert_array_equal(p_mask, _ref_occluder(_u8(mask), occ) > 127)
        assert occluder_patch(None, mask, occ)[0] is None


def test_a_crop_outside_the_image_is_refused() -> None:
    image = np.zeros((10, 20, 3), np.uint8)
    with pytest.raises(view_render.ViewRenderError, match="outside its 20x10 image"):
        occluder_patch(image, np.zeros((10, 20), bool), {"crop": [5, 0, 21, 10], "flip": False, "resize": [4, 4]})


# --------------------------------------------------------------------------------------------------
# Whole views: render_batch = reference render + reference preprocess
@pytest.fixture(scope="module")
def views(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    root = tmp_path_factory.mktemp("render")
    index = small_index(root, n_train=5, n_eval=2)
    cfg = views_cfg(occlusion_p=1.0, jitter_views=2, hflip_p=0.5)
    table, _ = build_views(index, root, cfg, output_size=IMG, mask_threshold=128, progress=False)
    return root, sort_views(table).to_pylist()


def test_views_cover_every_kind_and_flip(views: tuple[Path, list[dict[str, Any]]]) -> None:
    _, rows = views
    specs = [json.loads(r["spec"]) for r in rows]
    assert {s["kind"] for s in specs} == {"original", "jitter", "occluded"}
    assert {s["flip"] for s in specs if s["kind"] == "jitter"} == {False, True}


def test_render_batch_equals_the_reference_pipeline(views: tuple[Path, list[dict[str, Any]]]) -> None:
    root, rows = views
    for s in range(0, len(rows), 5):
        batch = rows[s:s + 5]
        x, hws = render_batch(batch, root, IMG)
        refs = [ref_preprocess(ref_render(r, root)[0], IMG) for r in batch]
        assert hws == [hw for _, hw in refs]
        assert same_bits(x, torch.stack([t for t, _ in refs]))


def test_render_view_with_shared_sources_equals_the_reference(views: tuple[Path, list[dict[str, Any]]]) -> None:
    root, rows = views
    sources: view_render.SourceCache = {}
    for row in rows:
        for shared in (None, sources):
            image, mask = render_view(row, None, root, sources=shared)
            ref_image, ref_mask = ref_render(row, root)
            np.testing.assert_array_equal(image, ref_image)
            np.testing.assert_array_equal(mask, ref_mask)
    assert all(not a.flags.writeable for a in sources.values())  # shared arrays cannot be changed by a caller


def test_render_batch_decodes_each_source_file_once(
    views: tuple[Path, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, rows = views
    decoded: list[str] = []

    def counting_load_image(path: Path) -> np.ndarray:
        decoded.append(str(path))
        return load_image(path)

    monkeypatch.setattr(view_render, "load_image", counting_load_image)
    render_batch(rows, root, IMG)
    specs = [json.loads(r["spec"]) for r in rows]
    needed = {s["image_path"] for s in specs} | {s["occluder"]["image_path"] for s in specs if "occluder" in s}
    assert len(decoded) == len(set(decoded)) == len(needed) < len(rows)


def test_all_finite_reads_float16_exponent_bits() -> None:
    emb = np.random.default_rng(0).standard_normal((3, 4, 5)).astype(np.float16)
    emb[0, 0, 0], emb[1, 1, 1] = np.float16(65504), np.float16(-6e-8)  # largest / a subnormal: finite
    assert _all_finite(emb)
    for bad in (np.inf, -np.inf, np.nan):
        broken = emb.copy()
        broken[2, 3, 4] = bad
        assert not _all_finite(broken)
        assert not _all_finite(broken.astype(np.float32))
