"""The evaluate stage end to end on a tiny fake cache, fake prompts and a tiny random SAM.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_evaluate.py -q
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline.config import Params, replace
from pipeline.data import rle
from pipeline.data.embedding_format import CacheMeta
from pipeline.evaluation import evaluate as ev_mod
from pipeline.evaluation.coco import load_coco, segm_map
from pipeline.evaluation import reuse
from pipeline.evaluation.evaluate import evaluate_all_methods, evaluate_benchmark, evaluate_with_predictor, run_evaluate
from pipeline.inference.predictor import Predictor
from pipeline.evaluation.metrics import boundary_iou, mask_iou
from pipeline.modeling.methods import build_method
from pipeline.prompts.synthesis import eval_prompts
from tests.fakes import FakeShard, view_columns, write_cache, write_tiny_base

IMG, GRID, C = 64, 16, 256
DRAWS = 3
SIZES = [(40, 56), (48, 48), (33, 64), (64, 30)]
DATASET = "COIFT"


def blob_mask(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    ry, rx = rng.uniform(0.2, 0.3) * h, rng.uniform(0.2, 0.3) * w
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1


def write_eval_cache(root: Path, checkpoint_sha256: str) -> list[str]:
    """A one-shard eval cache of :data:`SIZES` views with blob GT masks; returns the view ids."""
    rng = np.random.default_rng(0)
    views = [(f"{DATASET}/img{k}#0", h, w, blob_mask(h, w, k)) for k, (h, w) in enumerate(SIZES)]
    emb = (rng.standard_normal((len(SIZES), C, GRID, GRID)) * 0.5).astype(np.float16)
    meta = CacheMeta(variant="tiny", checkpoint_sha256=checkpoint_sha256, img_size=IMG, grid=GRID, channels=C)
    write_cache(root, meta, [FakeShard(DATASET, "eval", view_columns(views, "eval", IMG), emb)], row_group_size=2)
    return [v[0] for v in views]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, test_params: Params) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("evaluate")
    base = tmp / "base"
    sam, sha = write_tiny_base(base, img=IMG, grid=GRID)
    views = write_eval_cache(tmp / "emb", sha)

    # A folder benchmark (images + masks) and a COCO benchmark, both tiny.
    folder = tmp / "mine"
    (folder / "im").mkdir(parents=True)
    (folder / "gt").mkdir()
    rng = np.random.default_rng(1)
    coco_dir = tmp / "coco" / "images"
    coco_dir.mkdir(parents=True)
    images, anns = [], []
    for k, (h, w) in enumerate(SIZES[:2]):
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        Image.fromarray(img).save(folder / "im" / f"a{k}.png")
        Image.fromarray(blob_mask(h, w, 10 + k).astype(np.uint8) * 255).save(folder / "gt" / f"a{k}_mask.png")
        Image.fromarray(img).save(coco_dir / f"{k}.png")
        images.append({"id": k + 1, "file_name": f"{k}.png", "height": h, "width": w})
        for j in range(2):
            m = blob_mask(h, w, 20 + 2 * k + j)
            ys, xs = np.nonzero(m)
            anns.append({"id": len(anns) + 1, "image_id": k + 1, "category_id": 1 + j, "iscrowd": 0,
                         "area": int(m.sum()), "segmentation": {"size": [h, w], "counts": rle.encode(m)},
                         "bbox": [int(xs.min()), int(ys.min()), int(np.ptp(xs) + 1), int(np.ptp(ys) + 1)]})
    crowd = dict(anns[0], id=99, iscrowd=1)  # crowd regions are never prompted
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9 - 0.1 * i}
            for i, a in enumerate(anns)]  # a "detector" that finds exactly the GT boxes
    (tmp / "coco" / "dets.json").write_text(json.dumps(dets))
    (tmp / "coco" / "instances.json").write_text(json.dumps({
        "images": images, "annotations": anns + [crowd],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(folder / "im" / "orphan.png")  # no mask: skipped

    params = replace(test_params, **{
        "evaluate.device": "cpu",
        "evaluate.flush_every": 2,
        "evaluate.batch_size": 4,  # forces several decoder chunks per prompt group
        "prompts.eval_draws": DRAWS,
        "data.max_images_per_set": 0,
        "evaluate.benchmarks": ["DIS5K-VD", "COIFT", "HRSOD", "ThinObject5K-TE"],
        "evaluate.folders": [{"name": "mine", "images": str(folder / "im"), "masks": str(folder / "gt"),
                              "mask_suffix": "_mask.png"}],
        "evaluate.coco": [
            {"name": "toy", "images": str(coco_dir), "annotations": str(tmp / "coco" / "instances.json"),
             "box_source": "gt", "detections": ""},
            {"name": "toy_noisy", "images": str(coco_dir), "annotations": str(tmp / "coco" / "instances.json"),
             "box_source": "noisy", "detections": ""},
            {"name": "toy_det", "images": str(coco_dir), "annotations": str(tmp / "coco" / "instances.json"),
             "box_source": "detections", "detections": str(tmp / "coco" / "dets.json")},
        ],
    })
    rows = []
    for k, (h, w) in enumerate(SIZES):
        rows += eval_prompts(views[k], blob_mask(h, w, k), params.prompts)
    prompts = tmp / "prompts" / "eval.parquet"
    prompts.parent.mkdir()
    pq.write_table(pa.Table.from_pylist([{k: r[k] for k in ("view_id", "prompt_type", "draw", "box", "points",
                                                            "point_labels")} for r in rows]), prompts)
    plugins = tmp / "plugins"
    plugins.mkdir()
    stable = build_method("stable_sam", sam, params.plugin)
    torch.save({"method": "stable_sam", "state_dict": stable.plugin_state_dict()}, plugins / "stable_sam.pt")
    return {"tmp": tmp, "sam": sam, "params": params, "base": base, "emb": tmp / "emb", "prompts": prompts,
            "plugins": plugins, "views": views, "n_prompts": len(rows) // len(SIZES)}


def run(ws: dict[str, Any], method: str, bench: str = DATASET, tag: str = "", params: Params | None = None) -> dict:
    return evaluate_benchmark(
        params or ws["params"], bench, method, embeddings=ws["emb"], prompts=ws["prompts"], base=ws["base"],
        plugins=ws["plugins"], out=ws["tmp"] / f"metrics{tag}", predictions=ws["tmp"] / f"pred{tag}", progress=False,
    )


def assert_nested_close(a: dict, b: dict, tol: float = 1e-9) -> None:
    assert set(a) == set(b)
    for k in a:
        assert set(a[k]) == set(b[k]), k
        for m in a[k]:
            assert a[k][m] == pytest.approx(b[k][m], abs=tol), (k, m)


def check_hq_json(metrics: dict, *, alpha: bool, n_images: int, types: tuple[str, ...]) -> None:
    assert set(metrics) == set(types)
    for ptype, vals in metrics.items():
        draws = 1 if ptype in ("gt_box", "oracle_point") else DRAWS
        assert vals["n"] == n_images * draws
        for key in ("miou", "mbiou", "st"):
            assert 0.0 <= vals[key] <= 100.0, (ptype, key, vals[key])
        assert set(vals) == {"miou", "mbiou", "st", "n"} | ({"alpha1"} if alpha else set())
        if alpha:
            assert 0.0 <= vals["alpha1"] <= 1.0
        if draws == 1:
            assert vals["st"] == 100.0


def test_hq_end_to_end_json_parquet_and_identical_plugin(ws: dict[str, Any]) -> None:
    params = ws["params"]
    m_sam = run(ws, "sam")
    check_hq_json(m_sam, alpha=False, n_images=len(SIZES), types=params.prompts.eval_types)
    on_disk = json.loads((ws["tmp"] / "metrics" / DATASET / "sam.json").read_text())
    assert_nested_close(on_disk, m_sam)
    table = pq.read_table(ws["tmp"] / "pred" / DATASET / "sam.parquet")
    for col in ("view_id", "prompt_type", "draw", "iou", "biou", "alpha1", "pred_rle", "score"):
        assert col in table.column_names
    assert table.num_rows == len(SIZES) * ws["n_prompts"]
    assert not (ws["tmp"] / "pred" / DATASET / ".sam.partial").exists()
    # Stored IoU / BIoU agree with the metrics recomputed from the stored masks.
    gts = {v: blob_mask(h, w, k) for k, (v, (h, w)) in enumerate(zip(ws["views"], SIZES))}
    for row in table.slice(0, 12).to_pylist():
        pred = rle.decode(row["pred_rle"], row["height"], row["width"])
        assert row["iou"] == pytest.approx(mask_iou(pred, gts[row["view_id"]]))
        assert row["biou"] == pytest.approx(boundary_iou(pred, gts[row["view_id"]], 0.02))
    # An untrained Stable-SAM (identity DSP) reproduces SAM; it has alpha1.
    m_st = run(ws, "stable_sam")
    check_hq_json(m_st, alpha=True, n_images=len(SIZES), types=params.prompts.eval_types)
    for ptype in m_sam:
        assert m_st[ptype]["miou"] == pytest.approx(m_sam[ptype]["miou"], abs=0.05)


def _perturbed_stable_sam(ws: dict[str, Any], force_alpha: tuple[float, float] | None):
    dec = build_method("stable_sam", ws["sam"], ws["params"].plugin, force_alpha=force_alpha)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in dec.trainable_parameters():  # a plugin that really changes the features
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return dec.eval()


def test_forced_identical_plugin_gives_equal_scores(ws: dict[str, Any]) -> None:
    sam = ws["sam"]
    kw = dict(embeddings=ws["emb"], prompts=ws["prompts"], out=ws["tmp"] / "m2", predictions=ws["tmp"] / "p2", progress=False)
    base = evaluate_with_predictor(ws["params"], DATASET, "sam", Predictor(sam, build_method("sam", sam, ws["params"].plugin)), **kw)
    forced = evaluate_with_predictor(ws["params"], DATASET, "forced", Predictor(sam, _perturbed_stable_sam(ws, (0.0, 1.0))), **kw)
    free = evaluate_with_predictor(ws["params"], DATASET, "free", Predictor(sam, _perturbed_stable_sam(ws, None)), **kw)
    t_base = pq.read_table(ws["tmp"] / "p2" / DATASET / "sam.parquet")
    t_forced = pq.read_table(ws["tmp"] / "p2" / DATASET / "forced.parquet")
    t_free = pq.read_table(ws["tmp"] / "p2" / DATASET / "free.parquet")
    assert t_base.column("pred_rle").to_pylist() == t_forced.column("pred_rle").to_pylist()
    np.testing.assert_allclose(t_base.column("score").to_numpy(), t_forced.column("score").to_numpy(), atol=1e-5)
    for ptype in base:
        for key in ("miou", "mbiou", "st"):
            assert forced[ptype][key] == pytest.approx(base[ptype][key], abs=1e-9)
    assert all(a == 0.0 for a in t_forced.column("alpha1").to_pylist())
    # The test can fail: the same perturbed plugin with its own alpha changes the masks.
    assert t_base.column("pred_rle").to_pylist() != t_free.column("pred_rle").to_pylist()
    assert "alpha1" in free["gt_box"]


def test_resume_after_interruption_matches_a_full_run(ws: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    full = run(ws, "sam", tag="_full")
    real = ev_mod.predict_and_score
    calls: list[int] = []

    def dying(*a: Any, **k: Any) -> Any:
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed after 3 images (2 flushed: flush_every = 2)
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(ev_mod, "predict_and_score", dying)
    with pytest.raises(KeyboardInterrupt):
        run(ws, "sam", tag="_resume")
    partial = ws["tmp"] / "pred_resume" / DATASET / ".sam.partial"
    assert len(list(partial.glob("part-*.parquet"))) == 1
    calls.clear()
    monkeypatch.setattr(ev_mod, "predict_and_score", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    resumed = run(ws, "sam", tag="_resume")
    assert len(calls) == len(SIZES) - 2  # the two flushed images were not scored again
    assert_nested_close(resumed, full)
    assert not partial.exists()


def test_folder_benchmark(ws: dict[str, Any]) -> None:
    m = run(ws, "stable_sam", bench="mine")
    check_hq_json(m, alpha=True, n_images=2, types=ws["params"].prompts.eval_types)
    table = pq.read_table(ws["tmp"] / "pred" / "mine" / "stable_sam.parquet")
    assert set(table.column("view_id").to_pylist()) == {"mine/a0#0", "mine/a1#0"}


def test_coco_benchmark_gt_and_noisy_boxes(ws: dict[str, Any]) -> None:
    m = run(ws, "sam", bench="toy")
    assert set(m) == {"gt_box"}
    assert set(m["gt_box"]) == {"map", "map50", "miou", "n"}
    assert m["gt_box"]["n"] == 4  # 2 images x 2 instances; the crowd region is not prompted
    table = pq.read_table(ws["tmp"] / "pred" / "toy" / "sam.parquet")
    coco = load_coco(ws["tmp"] / "coco" / "instances.json")
    res = [{"image_id": int(r["view_id"]), "category_id": r["category_id"], "score": r["score"],
            "segmentation": {"size": [r["height"], r["width"]], "counts": r["pred_rle"]}} for r in table.to_pylist()]
    again = segm_map(coco, res)
    assert m["gt_box"]["map"] == pytest.approx(again["map"]) and m["gt_box"]["map50"] == pytest.approx(again["map50"])
    ious = [mask_iou(rle.decode(r["pred_rle"], r["height"], r["width"]),
                     coco.annToMask(coco.anns[r["ann_id"]]).astype(bool)) for r in table.to_pylist()]
    assert m["gt_box"]["miou"] == pytest.approx(100 * np.mean(ious))
    noisy = run(ws, "sam", bench="toy_noisy")
    assert set(noisy) == {"noisy_box"} and noisy["noisy_box"]["n"] == 4
    t_noisy = pq.read_table(ws["tmp"] / "pred" / "toy_noisy" / "sam.parquet")
    assert t_noisy.column("pred_rle").to_pylist() != table.column("pred_rle").to_pylist()
    # Detections equal to the GT boxes give the same masks; their scores are the detector's.
    det = run(ws, "sam", bench="toy_det")
    assert set(det) == {"detections"} and "miou" not in det["detections"]
    t_det = pq.read_table(ws["tmp"] / "pred" / "toy_det" / "sam.parquet")
    key = lambda t: sorted(zip(t.column("view_id").to_pylist(), t.column("category_id").to_pylist(),
                               t.column("pred_rle").to_pylist()))
    assert key(t_det) == key(table)
    assert sorted(t_det.column("score").to_pylist()) == pytest.approx([0.6, 0.7, 0.8, 0.9])


def test_cli_and_clear_errors(ws: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    from stages.evaluate import main

    params_file = ws["tmp"] / "params.yaml"
    import yaml

    params_file.write_text(yaml.safe_dump(ws["params"].to_dict()))
    args = ["--params", str(params_file), "--embeddings", str(ws["emb"]), "--prompts", str(ws["prompts"]),
            "--base", str(ws["base"]), "--plugins", str(ws["plugins"]), "--out", str(ws["tmp"] / "cli_m"),
            "--predictions", str(ws["tmp"] / "cli_p"), "--quiet"]
    assert main(["--benchmark", DATASET, "--method", "sam", *args]) == 0
    assert (ws["tmp"] / "cli_m" / DATASET / "sam.json").is_file()
    assert main(["--benchmark", DATASET, "--method", "dsp", *args]) == 2  # never trained
    err = capsys.readouterr().err
    assert "dsp.pt" in err and "train" in err
    assert main(["--benchmark", "nope", "--method", "sam", *args]) == 2
    assert "unknown benchmark" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# One evaluate process per HQ set (evaluate@<set>): every method scored, unchanged methods reused
# (pipeline/evaluation/reuse.py), removed methods cleaned up.
@pytest.fixture
def scored(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The methods actually scored (evaluate_benchmark calls), in order."""
    calls: list[str] = []
    real = ev_mod.evaluate_benchmark

    def counting(params: Params, benchmark: str, method: str, **kw: Any) -> dict[str, Any]:
        calls.append(method)
        return real(params, benchmark, method, **kw)

    monkeypatch.setattr(ev_mod, "evaluate_benchmark", counting)
    return calls


def _params(ws: dict[str, Any], methods: list[str], **over: Any) -> Params:
    return replace(ws["params"], **{"evaluate.methods": methods, "seeds.methods": [], **over})


def _run_all(ws: dict[str, Any], params: Params, root: Path, plugins: Path | None = None) -> dict[str, Any]:
    return evaluate_all_methods(params, DATASET, embeddings=ws["emb"], prompts=ws["prompts"], base=ws["base"],
                                plugins=plugins or ws["plugins"], out=root / "metrics", predictions=root / "pred",
                                progress=False)


def test_scores_every_method_once_then_reuses_them(ws, scored, tmp_path):
    params = _params(ws, ["sam", "stable_sam"])
    first = _run_all(ws, params, tmp_path)
    assert scored == ["sam", "stable_sam"] and set(first) == {"sam", "stable_sam"}
    for method in ("sam", "stable_sam"):
        stored = reuse.stored_fingerprint(tmp_path / "pred" / DATASET / f"{method}.parquet")
        assert stored is not None and stored["method"] == method and stored["code"] == reuse.code_sha256()
    assert reuse.stored_fingerprint(tmp_path / "pred" / DATASET / "stable_sam.parquet")["plugin"] is not None
    again = _run_all(ws, params, tmp_path)
    assert scored == ["sam", "stable_sam"], "nothing changed, yet a method was scored again"
    assert again == first


def _scored_once_with_own_plugins(ws: dict[str, Any], tmp_path: Path) -> tuple[Path, Params, dict[str, Any]]:
    """sam + stable_sam scored once with a copy of the plugins folder: (that folder, params, stable_sam's file)."""
    plugins = tmp_path / "plugins"
    shutil.copytree(ws["plugins"], plugins)
    params = _params(ws, ["sam", "stable_sam"])
    _run_all(ws, params, tmp_path, plugins)
    return plugins, params, torch.load(plugins / "stable_sam.pt", weights_only=True)


def test_a_retrained_plugin_rescores_only_its_method(ws, scored, tmp_path):
    plugins, params, ckpt = _scored_once_with_own_plugins(ws, tmp_path)
    for tensor in ckpt["state_dict"].values():
        if tensor.is_floating_point():
            tensor.add_(0.01)
    torch.save(ckpt, plugins / "stable_sam.pt")
    _run_all(ws, params, tmp_path, plugins)
    assert scored == ["sam", "stable_sam", "stable_sam"]


def test_a_rewritten_plugin_file_with_the_same_weights_is_reused(ws, scored, tmp_path):
    """``sam``'s empty plugin file is rewritten (with the new config) whenever a training param changes."""
    plugins, params, ckpt = _scored_once_with_own_plugins(ws, tmp_path)
    torch.save({**ckpt, "config": {"train": {"lr": 0.123}}, "steps": 7}, plugins / "stable_sam.pt")
    _run_all(ws, params, tmp_path, plugins)
    assert scored == ["sam", "stable_sam"]
    (plugins / "stable_sam.pt").write_bytes(b"truncated")  # unreadable: hashed by bytes, scored, and reported
    with pytest.raises(Exception, match="stable_sam.pt"):
        _run_all(ws, params, tmp_path, plugins)


def test_an_added_method_is_the_only_one_scored_and_a_removed_one_leaves_nothing(ws, scored, tmp_path):
    plugins = tmp_path / "plugins"
    shutil.copytree(ws["plugins"], plugins)
    pt = build_method("pt_sam", ws["sam"], ws["params"].plugin)
    torch.save({"method": "pt_sam", "state_dict": pt.plugin_state_dict()}, plugins / "pt_sam.pt")
    two, three = ["sam", "stable_sam"], ["sam", "stable_sam", "pt_sam"]
    _run_all(ws, _params(ws, two), tmp_path, plugins)
    _run_all(ws, _params(ws, three, **{"train.methods": three}), tmp_path, plugins)
    assert scored == ["sam", "stable_sam", "pt_sam"]
    (tmp_path / "pred" / DATASET / ".pt_sam.partial").mkdir()  # a leftover of an interrupted run
    _run_all(ws, _params(ws, two), tmp_path, plugins)
    assert scored == ["sam", "stable_sam", "pt_sam"]
    assert sorted(p.name for p in (tmp_path / "metrics" / DATASET).iterdir()) == ["sam.json", "stable_sam.json"]
    assert sorted(p.name for p in (tmp_path / "pred" / DATASET).iterdir()) == ["sam.parquet", "stable_sam.parquet"]


def test_code_params_and_inputs_changes_rescore_everything(ws, scored, tmp_path, monkeypatch):
    params = _params(ws, ["sam", "stable_sam"])
    _run_all(ws, params, tmp_path)
    _run_all(ws, _params(ws, ["sam", "stable_sam"], **{"evaluate.boundary_dilation_ratio": 0.05}), tmp_path)
    assert scored == ["sam", "stable_sam"] * 2
    _run_all(ws, _params(ws, ["sam", "stable_sam"], **{"evaluate.bf16": True}), tmp_path)
    assert scored == ["sam", "stable_sam"] * 3
    monkeypatch.setattr(reuse, "code_sha256", lambda: "another code version")
    _run_all(ws, params, tmp_path)
    assert scored == ["sam", "stable_sam"] * 4
    prompts = tmp_path / "prompts.parquet"
    table = pq.read_table(ws["prompts"])
    pq.write_table(table.slice(0, table.num_rows - 1), prompts)  # one prompt fewer
    evaluate_all_methods(params, DATASET, embeddings=ws["emb"], prompts=prompts, base=ws["base"],
                         plugins=ws["plugins"], out=tmp_path / "metrics", predictions=tmp_path / "pred",
                         progress=False)
    assert scored == ["sam", "stable_sam"] * 5


def test_missing_metrics_or_unmarked_predictions_are_scored_again(ws, scored, tmp_path):
    params = _params(ws, ["sam", "stable_sam"])
    _run_all(ws, params, tmp_path)
    (tmp_path / "metrics" / DATASET / "sam.json").unlink()  # e.g. killed between the two writes
    pred = tmp_path / "pred" / DATASET / "stable_sam.parquet"
    table = pq.read_table(pred)
    pq.write_table(table.replace_schema_metadata({}), pred)  # written by an older version: no fingerprint
    _run_all(ws, params, tmp_path)
    assert scored == ["sam", "stable_sam", "sam", "stable_sam"]
    assert reuse.stored_fingerprint(pred) is not None


def test_one_fingerprint_for_a_single_method_run_and_the_all_methods_stage(ws, scored, tmp_path):
    """A single ``evaluate_benchmark`` call on an HQ set (the fidelity and seeds harnesses) stores the fingerprint
    the evaluate@<set> stage compares, so the stage keeps its outputs; a COCO/folder entry stores its own."""
    params = _params(ws, ["sam", "stable_sam"])
    for method in ("sam", "stable_sam"):
        ev_mod.evaluate_benchmark(params, DATASET, method, embeddings=ws["emb"], prompts=ws["prompts"],
                                  base=ws["base"], plugins=ws["plugins"], out=tmp_path / "metrics",
                                  predictions=tmp_path / "pred", progress=False)
    assert scored == ["sam", "stable_sam"]
    _run_all(ws, params, tmp_path)
    assert scored == ["sam", "stable_sam"], "the stage scored again what a single-method run had just made"
    run(ws, "stable_sam", bench="toy", tag="_folder")
    stored = reuse.stored_fingerprint(ws["tmp"] / "pred_folder" / "toy" / "stable_sam.parquet")
    assert stored is not None and stored["method"] == "stable_sam" and len(stored["plugin"]) == 64
    assert "code" not in stored


def test_only_hq_sets_and_no_method_with_all_methods(ws, tmp_path):
    with pytest.raises(ValueError, match="one stage per method"):
        evaluate_all_methods(ws["params"], "toy", embeddings=ws["emb"], prompts=ws["prompts"], base=ws["base"],
                             plugins=ws["plugins"], out=tmp_path / "m", predictions=tmp_path / "p", progress=False)
    with pytest.raises(ValueError, match="give no method"):
        run_evaluate(ws["params"], DATASET, "sam", all_methods=True, predictions=tmp_path / "p")


def test_the_stored_fingerprint_reader_tolerates_foreign_files(tmp_path):
    assert reuse.stored_fingerprint(tmp_path / "missing.parquet") is None
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    assert reuse.stored_fingerprint(tmp_path / "junk.parquet") is None
    pq.write_table(pa.table({"a": [1]}), tmp_path / "plain.parquet")
    assert reuse.stored_fingerprint(tmp_path / "plain.parquet") is None
