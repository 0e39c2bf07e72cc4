"""Evaluation metrics against hand-computed values and independent slow reference implementations.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_metrics.py -q
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.data import rle
from pipeline.evaluation.coco import coco_from_dict, segm_map, xywh_to_xyxy
from pipeline.evaluation.metrics import (
    boundary_iou,
    boundary_iou_many,
    dilation_pixels,
    erode,
    mask_iou,
    mask_iou_many,
    mask_to_boundary,
    pairwise_iou,
    stability,
)
from pipeline.evaluation.predict import stability_from_rles


def square(h: int, w: int, y0: int, x0: int, side: int) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0 : y0 + side, x0 : x0 + side] = True
    return m


# ----------------------------------------------------------------------- independent references
def reference_boundary_loops(mask: np.ndarray, ratio: float) -> np.ndarray:
    """Cheng et al.'s mask_to_boundary, literally: pad 1 zero px, d x (3x3 erosion), crop; pure-python loops.

    cv2.erode's default border (+inf) means pixels beyond the padded image never erode anything.
    """
    h, w = mask.shape
    d = max(1, int(round(ratio * math.sqrt(h * h + w * w))))
    cur = [[0] * (w + 2)] + [[0] + [int(v) for v in row] + [0] for row in mask] + [[0] * (w + 2)]
    for _ in range(d):
        nxt = [[0] * (w + 2) for _ in range(h + 2)]
        for y in range(h + 2):
            for x in range(w + 2):
                v = 1
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h + 2 and 0 <= xx < w + 2 and cur[yy][xx] == 0:
                            v = 0
                nxt[y][x] = v
        cur = nxt
    eroded = np.array([row[1 : w + 1] for row in cur[1 : h + 1]], dtype=bool)
    return mask & ~eroded


def reference_boundary_iterated(mask: np.ndarray, ratio: float) -> np.ndarray:
    """The same algorithm for big images: a Python loop over the d iterations and the 9 kernel offsets,
    each step a numpy min over a shifted view of the padded image (cv2.erode semantics, +inf border)."""
    h, w = mask.shape
    d = max(1, int(round(ratio * math.sqrt(h * h + w * w))))
    cur = np.pad(mask.astype(np.uint8), 1)  # the reference's 1-px zero border
    for _ in range(d):
        big = np.pad(cur, 1, constant_values=255)  # cv2's default border: never erodes
        nxt = np.full_like(cur, 255)
        for dy in range(3):
            for dx in range(3):
                nxt = np.minimum(nxt, big[dy : dy + h + 2, dx : dx + w + 2])
        cur = nxt
    return mask & ~cur[1:-1, 1:-1].astype(bool)


def iou_of(a: np.ndarray, b: np.ndarray) -> float:
    u = np.count_nonzero(a | b)
    return 1.0 if u == 0 else np.count_nonzero(a & b) / u


# -------------------------------------------------------------------------------------- mask IoU
def test_mask_iou_shifted_square_by_hand() -> None:
    a = square(20, 20, 2, 2, 10)  # 100 px
    b = square(20, 20, 2, 5, 10)  # shifted right by 3: overlap 10 x 7 = 70
    assert mask_iou(a, b) == pytest.approx(70 / 130)
    assert mask_iou(a, a) == 1.0


def test_mask_iou_one_pixel_line_and_empties() -> None:
    line = np.zeros((5, 9), bool)
    line[2, :] = True  # 9 px
    half = np.zeros((5, 9), bool)
    half[2, :4] = True  # 4 px inside the line
    assert mask_iou(half, line) == pytest.approx(4 / 9)
    empty = np.zeros((5, 9), bool)
    assert mask_iou(empty, line) == 0.0  # empty prediction
    assert mask_iou(line, empty) == 0.0  # empty GT
    assert mask_iou(empty, empty) == 1.0  # both empty: empty union counts as 1
    np.testing.assert_allclose(mask_iou_many(np.stack([half, empty, line]), line), [4 / 9, 0.0, 1.0])


def test_mask_iou_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="shapes differ"):
        mask_iou(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


# ---------------------------------------------------------------------------------- Boundary IoU
def test_dilation_pixels_matches_reference_formula() -> None:
    assert dilation_pixels(600, 800, 0.02) == 20  # diagonal 1000
    assert dilation_pixels(10, 10, 0.02) == 1  # round(0.28) = 0 -> at least 1
    assert dilation_pixels(30, 40, 0.1) == 5


def test_boundary_of_square_by_hand() -> None:
    # 10x10 image -> d = 1: the boundary of a square is its outer ring.
    m = square(10, 10, 2, 2, 5)
    b = mask_to_boundary(m, 0.02)
    ring = m & ~square(10, 10, 3, 3, 3)
    np.testing.assert_array_equal(b, ring)
    assert b.sum() == 25 - 9
    # A mask touching the image border erodes from the border too (1-px zero padding).
    full = np.ones((10, 10), bool)
    assert mask_to_boundary(full, 0.02).sum() == 100 - 64


def test_boundary_matches_pure_python_loops_on_small_images() -> None:
    rng = np.random.default_rng(0)
    for h, w, ratio in ((23, 31, 0.05), (40, 17, 0.09), (12, 12, 0.02), (12, 9, 0.5), (1, 30, 0.1)):
        m = rng.random((h, w)) < 0.75
        m[h // 3 : 2 * h // 3, w // 4 : 3 * w // 4] = True
        np.testing.assert_array_equal(mask_to_boundary(m, ratio), reference_boundary_loops(m, ratio))


def blob(h: int, w: int, cy: float, cx: float, r: float, seed: int) -> np.ndarray:
    """A wobbly disc with thin spikes (boundary detail matters) at ``h x w``."""
    yy, xx = np.mgrid[0:h, 0:w]
    ang = np.arctan2(yy - cy, xx - cx)
    rng = np.random.default_rng(seed)
    radius = r * (1 + 0.15 * np.sin(5 * ang + rng.uniform(0, 6)) + 0.05 * np.sin(17 * ang))
    m = np.hypot(yy - cy, xx - cx) < radius
    m[int(cy) - 1 : int(cy) + 2, int(cx) : w - 5] = True  # a one-to-three-pixel-thin structure
    return m


def test_boundary_iou_matches_slow_reference_on_a_large_image() -> None:
    h, w = 600, 800  # diagonal 1000 -> d = 20
    gt = blob(h, w, 300, 380, 180, seed=1)
    pred = blob(h, w, 310, 372, 170, seed=2)
    ref_g = reference_boundary_iterated(gt, 0.02)
    ref_p = reference_boundary_iterated(pred, 0.02)
    np.testing.assert_array_equal(mask_to_boundary(gt, 0.02), ref_g)
    np.testing.assert_array_equal(mask_to_boundary(pred, 0.02), ref_p)
    biou = boundary_iou(pred, gt, 0.02)
    assert biou == pytest.approx(iou_of(ref_p, ref_g), abs=1e-12)
    # The users' complaint: on large images BIoU must not silently equal mask IoU.
    miou = mask_iou(pred, gt)
    assert biou < miou - 0.05, (biou, miou)
    # Batched path equals the single-mask path.
    many = boundary_iou_many(np.stack([pred, gt, np.zeros_like(gt)]), gt, 0.02)
    np.testing.assert_allclose(many, [biou, 1.0, 0.0])


def test_iterated_reference_agrees_with_loops() -> None:
    """The fast reference used above is itself checked against the literal loops."""
    m = blob(30, 41, 14, 18, 9, seed=3)
    np.testing.assert_array_equal(reference_boundary_iterated(m, 0.07), reference_boundary_loops(m, 0.07))


def test_boundary_iou_empty_cases() -> None:
    e = np.zeros((50, 60), bool)
    m = square(50, 60, 10, 10, 20)
    assert boundary_iou(e, e) == 1.0
    assert boundary_iou(e, m) == 0.0
    assert boundary_iou(m, e) == 0.0


def test_erode_zero_iterations_and_bad_shape() -> None:
    m = square(8, 8, 1, 1, 4)[None]
    assert bool((erode(m, 0).numpy() == m).all())
    with pytest.raises(ValueError):
        erode(m[0], 1)


# -------------------------------------------------------------------------------------- stability
def test_stability_identical_disjoint_and_known() -> None:
    a = square(20, 20, 0, 0, 5)
    b = square(20, 20, 10, 10, 5)
    assert stability([a, a, a]) == 100.0
    assert stability([a, b]) == 0.0
    assert stability([a]) == 100.0
    c = square(20, 20, 0, 1, 5)  # IoU(a, c) = 20 / 30
    # pairs (a, a') = 1, (a, c) = 2/3, (a', c) = 2/3 -> mean 7/9
    assert stability([a, a.copy(), c]) == pytest.approx(100 * 7 / 9)
    e = np.zeros((20, 20), bool)
    assert stability([e, e]) == 100.0  # empty union counts as 1
    np.testing.assert_allclose(pairwise_iou(np.stack([a, c])), [[1, 2 / 3], [2 / 3, 1]])


def test_stability_from_rles_equals_dense() -> None:
    rng = np.random.default_rng(5)
    masks = [rng.random((33, 47)) < p for p in (0.2, 0.5, 0.55, 0.9)] + [np.zeros((33, 47), bool)] * 2
    rles = [{"size": [33, 47], "counts": rle.encode(m)} for m in masks]
    assert stability_from_rles(rles) == pytest.approx(stability(masks), abs=1e-9)


# ------------------------------------------------------------------------------------------- COCO
def toy_coco(masks: list[np.ndarray]) -> dict:
    h, w = masks[0].shape
    anns = []
    for i, m in enumerate(masks):
        ys, xs = np.nonzero(m)
        anns.append({
            "id": i + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": int(m.sum()),
            "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            "segmentation": {"size": [h, w], "counts": rle.encode(m)},
        })
    return {"images": [{"id": 1, "height": h, "width": w, "file_name": "a.jpg"}], "annotations": anns,
            "categories": [{"id": 1, "name": "thing"}]}


def result(m: np.ndarray, score: float) -> dict:
    return {"image_id": 1, "category_id": 1, "score": score,
            "segmentation": {"size": list(m.shape), "counts": rle.encode(m)}}


def test_map_perfect_and_one_miss() -> None:
    g1 = square(64, 64, 4, 4, 20)
    g2 = square(64, 64, 36, 36, 20)
    coco = coco_from_dict(toy_coco([g1, g2]))
    perfect = segm_map(coco, [result(g1, 0.9), result(g2, 0.8)])
    assert perfect["map"] == pytest.approx(100.0)
    assert perfect["map50"] == pytest.approx(100.0)
    # One GT missed by a confident-enough wrong mask: precision 1 up to recall 0.5, then nothing.
    # COCO's 101-point interpolated AP = 51/101 at every IoU threshold.
    wrong = square(64, 64, 4, 40, 20)  # disjoint from both GTs
    miss = segm_map(coco, [result(g1, 0.9), result(wrong, 0.8)])
    assert miss["map"] == pytest.approx(100 * 51 / 101)
    assert miss["map50"] == pytest.approx(100 * 51 / 101)
    # A mask with IoU 0.6 with g2 counts at thresholds 0.5..0.6 only (3 of 10) -> known mAP.
    part = square(64, 64, 36, 36, 20)
    part[36:44, 36:56] = False  # 12 x 20 = 240 of 400 px -> IoU 0.6
    half = segm_map(coco, [result(g1, 0.9), result(part, 0.8)])
    assert half["map50"] == pytest.approx(100.0)
    assert half["map"] == pytest.approx(100 * (3 * 1.0 + 7 * 51 / 101) / 10)
    assert segm_map(coco, []) == {"map": 0.0, "map50": 0.0}


def test_xywh_to_xyxy_inclusive() -> None:
    np.testing.assert_allclose(xywh_to_xyxy([4, 5, 20, 10]), [4, 5, 23, 14])
