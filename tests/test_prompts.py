"""Prompt synthesis: boxes, points, oracle point, coarse mask, seeding, and the prompts stage."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import Params, replace
from pipeline.prompts.boxes import box_iou, jitter_box, mask_to_box, noisy_box
from pipeline.prompts.coarse import coarse_mask, coarse_mask_logits, incoherent_band
from pipeline.prompts.distance import squared_edt
from pipeline.prompts.points import foreground_index, oracle_point, sample_positive_points
from pipeline.prompts.seeding import rng_for
from pipeline.prompts.synthesis import ModelFrame, SynthesisStats, eval_prompts, train_prompts
from tests.fakes import write_fake_cache


@pytest.fixture(scope="module")
def params(test_params: Params) -> Params:
    """The test profile."""
    return test_params


def _blob(h: int = 40, w: int = 60) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    m = ((xx - 25) / 14.0) ** 2 + ((yy - 18) / 9.0) ** 2 <= 1.0
    m[30:36, 40:55] = True  # a second part, so the mask is not convex
    return m


def _brute_sq_edt(mask: np.ndarray) -> np.ndarray:
    bg = np.argwhere(~mask)
    out = np.empty(mask.shape)
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            out[i, j] = ((bg - (i, j)) ** 2).sum(1).min()
    return out


def test_mask_to_box_inclusive_maxima():
    m = np.zeros((10, 12), bool)
    m[2:5, 3:9] = True
    assert mask_to_box(m).tolist() == [3, 2, 8, 4]
    assert box_iou(mask_to_box(m), mask_to_box(m)) == 1.0
    with pytest.raises(ValueError, match="empty mask"):
        mask_to_box(np.zeros((3, 3), bool))


def test_box_iou_known_values():
    assert box_iou([0, 0, 9, 9], [0, 0, 4, 9]) == pytest.approx(0.5)
    assert box_iou([0, 0, 9, 9], [20, 20, 29, 29]) == 0.0
    assert box_iou([0, 0, 0, 0], [0, 0, 0, 0]) == 1.0  # one pixel box has area 1


def test_jitter_box_is_the_dn_detr_formula():
    rng_a, rng_b = rng_for(1, "j"), rng_for(1, "j")
    box = np.array([10.0, 20.0, 50.0, 40.0])
    u = rng_b.uniform(-1, 1, 4)
    cx, cy, w, h = 30 + u[0] * 20 * 0.4, 30 + u[1] * 10 * 0.4, 40 + u[2] * 40 * 0.4, 20 + u[3] * 20 * 0.4
    np.testing.assert_allclose(jitter_box(box, 0.4, rng_a), [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])


def test_noisy_boxes_respect_min_iou_and_image():
    gt = np.array([5.0, 8.0, 70.0, 40.0], np.float32)
    ious, changed = [], 0
    for i in range(300):
        nb = noisy_box(gt, (50, 80), 0.4, 0.5, rng_for(0, "nb", i))
        assert box_iou(nb.box, gt) >= 0.5
        assert nb.box.dtype == np.float32 and nb.box[0] <= nb.box[2] and nb.box[1] <= nb.box[3]
        assert nb.box.min() >= 0 and nb.box[2] <= 79 and nb.box[3] <= 49
        assert not nb.fallback
        ious.append(nb.iou)
        changed += int(not np.allclose(nb.box, gt))
    assert changed > 290 and min(ious) < 0.7  # really noisy, not the GT box


def test_noisy_box_fallback_is_the_gt_box():
    gt = np.array([10.0, 10.0, 30.0, 30.0])
    nb = noisy_box(gt, (64, 64), 2.0, 0.999, rng_for(0, "fb"), max_tries=5)
    assert nb.fallback and nb.tries == 5 and box_iou(nb.box, gt) == 1.0


def test_positive_points_inside_mask():
    m = _blob()
    fg = foreground_index(m)
    for k in (1, 3, 10, 20):
        pts = sample_positive_points(fg, m.shape[1], k, rng_for(0, "p", k))
        assert pts.shape == (k, 2) and pts.dtype == np.float32
        assert m[pts[:, 1].astype(int), pts[:, 0].astype(int)].all()
        assert len({tuple(p) for p in pts.tolist()}) == k  # distinct when the mask is large enough
    tiny = np.zeros((5, 5), bool)
    tiny[2, 3] = True
    pts = sample_positive_points(foreground_index(tiny), 5, 4, rng_for(0, "t"))
    assert (pts == [3, 2]).all()  # with replacement when the mask has fewer pixels than k


def test_edt_is_exact():
    rng = np.random.default_rng(0)
    for _ in range(30):
        h, w = rng.integers(1, 13, 2)
        m = rng.random((h, w)) < rng.uniform(0.3, 0.95)
        if m.all():
            continue
        np.testing.assert_array_equal(squared_edt(m), _brute_sq_edt(m))
    assert np.isinf(squared_edt(np.ones((3, 4), bool))).all()


def test_oracle_point_on_known_shapes():
    m = np.zeros((30, 40), bool)
    m[5:16, 10:21] = True  # 11 x 11 square (rows 5..15, columns 10..20): unique deepest pixel at its centre
    assert oracle_point(m).tolist() == [[15.0, 10.0]]
    m[5:16, 10:31] = True  # 11 x 21: a row of equally deep pixels; ties go to the first in raster order
    assert oracle_point(m).tolist() == [[15.0, 10.0]]
    # A big square and a thin bar: the point must be in the square's centre, not the bar.
    m = np.zeros((40, 60), bool)
    m[10:31, 5:26] = True
    m[2:4, 30:59] = True
    assert oracle_point(m).tolist() == [[15.0, 20.0]]
    # The image border counts as boundary: a mask filling the image has its point in the middle.
    assert oracle_point(np.ones((9, 9), bool)).tolist() == [[4.0, 4.0]]
    # Matches brute force argmax (first in raster order) on an irregular shape.
    blob = _blob()
    d = _brute_sq_edt(np.pad(blob, 1))[1:-1, 1:-1]
    iy, ix = np.unravel_index(np.argmax(d), d.shape)
    assert oracle_point(blob).tolist() == [[ix, iy]]


def test_coarse_mask_noise_only_on_the_band():
    soft = np.zeros((64, 64), np.float32)
    soft[16:48, 20:44] = 1.0
    band = incoherent_band(soft, 0.01)
    assert band.any() and not band[0:4, 0:4].any() and not band[30, 32]  # far background / deep inside
    out = coarse_mask(soft, 0.01, rng_for(0, "c"))
    assert out.dtype == bool and out.shape == soft.shape
    np.testing.assert_array_equal(out[~band], soft[~band] > 0.5)
    assert (out[band] != (soft[band] > 0.5)).any()  # the band really is noisy
    assert np.array_equal(out, coarse_mask(soft, 0.01, rng_for(0, "c")))
    logits = coarse_mask_logits(out, -4.0, 255.0)
    assert logits.dtype == np.float32 and set(np.unique(logits).tolist()) == {-4.0, 255.0}
    np.testing.assert_array_equal(logits == 255.0, out)


def test_train_prompts_seeded_and_valid(params):
    cfg = replace(params, **{"prompts.train_prompts_per_view": 40}).prompts
    frame = ModelFrame(img_size=64, grid=8)
    m = _blob()
    stats = SynthesisStats()
    rows = train_prompts("set/a#0", m, cfg, frame, stats)
    assert rows == train_prompts("set/a#0", m, cfg, frame)  # same seed -> same prompts
    assert rows != train_prompts("set/b#0", m, cfg, frame)
    assert [r["draw"] for r in rows] == list(range(40))
    assert set(stats.types) == {"gt_box", "noisy_box", "points", "coarse_mask"}
    gt = mask_to_box(m)
    for r in rows:
        if r["prompt_type"] == "noisy_box":
            assert box_iou(np.array(r["box"], np.float32), gt) >= cfg.noisy_box_min_iou
        if r["prompt_type"] == "points":
            pts = np.array(r["points"]).reshape(-1, 2).astype(int)
            assert len(pts) in cfg.train_point_counts and r["point_labels"] == [1] * len(pts)
            assert m[pts[:, 1], pts[:, 0]].all()
        if r["prompt_type"] == "coarse_mask":
            from pipeline.data import rle

            cm = rle.decode(r["mask_input_rle"], 32, 32)
            assert cm.any() and r["box"] is None and r["points"] is None


def test_eval_prompts_cover_every_type(params):
    cfg = params.prompts
    m = _blob()
    rows = eval_prompts("set/a#0", m, cfg)
    assert rows == eval_prompts("set/a#0", m, cfg)
    by_type: dict[str, list] = {}
    for r in rows:
        by_type.setdefault(r["prompt_type"], []).append(r)
    assert set(by_type) == set(cfg.eval_types)
    assert len(by_type["gt_box"]) == 1 and len(by_type["oracle_point"]) == 1
    assert len(by_type["noisy_box"]) == cfg.eval_draws
    for kind in (t for t in cfg.eval_types if t.startswith("point_")):
        k = int(kind.split("_")[1])
        assert sorted(r["draw"] for r in by_type[kind]) == list(range(cfg.eval_draws))
        assert all(len(r["points"]) == 2 * k for r in by_type[kind])


# ------------------------------------------------------------------------------------- the stage
def test_prompts_stage_tables_quarantine_and_resume(params, tmp_path, monkeypatch, capsys, test_params_path):
    import pyarrow.parquet as pq

    from pipeline.data import rle
    from pipeline.prompts import stage as stage_mod
    from pipeline.prompts.tables import load_train_prompts, read_meta
    from stages.prompts import main

    ids = write_fake_cache(tmp_path / "emb", "ab" * 32, empty_views=("DUTS-TR/im3#0",))
    p = replace(params, **{"prompts.eval_draws": 2, "prompts.train_prompts_per_view": 2})
    summary = stage_mod.make_prompts(p, tmp_path / "emb", tmp_path / "a")
    train = pq.read_table(tmp_path / "a" / "train.parquet")
    ev = pq.read_table(tmp_path / "a" / "eval.parquet")
    quarantine = pq.read_table(tmp_path / "a" / "quarantine.parquet").to_pylist()
    assert quarantine == [{"view_id": "DUTS-TR/im3#0", "dataset": "DUTS-TR", "split": "train", "reason": "empty GT mask"}]
    assert train.num_rows == 2 * (len(ids["train"]) - 1) and summary["prompts"]["train"] == train.num_rows
    assert set(train.column("view_id").to_pylist()) == set(ids["train"]) - {"DUTS-TR/im3#0"}
    assert "mask_input_rle" in train.column_names and "mask_input_rle" not in ev.column_names
    n_eval_rows = sum(1 if t in ("gt_box", "oracle_point") else 2 for t in p.prompts.eval_types)
    assert ev.num_rows == n_eval_rows * len(ids["eval"])
    assert read_meta(tmp_path / "a" / "train.parquet")["grid"] == 8
    assert not (tmp_path / "a" / ".work").exists()
    for r in train.to_pylist():
        if r["prompt_type"] == "coarse_mask":
            assert rle.decode(r["mask_input_rle"], 32, 32).shape == (32, 32)
    loaded = load_train_prompts(tmp_path / "a" / "train.parquet")
    assert all(len(v) == 2 for v in loaded.values())

    # Interrupted after the first shard, then resumed: the same tables, and the finished shard is not redone.
    calls = []
    real = stage_mod._process_shard

    def dying(shard, *a, **k):
        calls.append(shard.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(shard, *a, **k)

    monkeypatch.setattr(stage_mod, "_process_shard", dying)
    with pytest.raises(KeyboardInterrupt):
        stage_mod.make_prompts(p, tmp_path / "emb", tmp_path / "b")
    monkeypatch.setattr(stage_mod, "_process_shard", real)
    done = []
    monkeypatch.setattr(stage_mod, "_process_shard", lambda shard, *a, **k: done.append(shard) or real(shard, *a, **k))
    stage_mod.make_prompts(p, tmp_path / "emb", tmp_path / "b")
    assert len(done) == 2  # 3 shards, 1 already finished
    for name in ("train.parquet", "eval.parquet", "quarantine.parquet"):
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))

    monkeypatch.setattr(stage_mod, "_process_shard", real)
    # A missing cache is a user error: one line naming the file, exit code 2, no traceback.
    assert main(["--params", str(test_params_path), "--embeddings", str(tmp_path / "nothing"), "--out", str(tmp_path / "c")]) == 2
    assert "CACHE.json" in capsys.readouterr().err
