"""Tests of the report stage on synthetic evaluation outputs: eval.json shape and means, plots, gallery, summary."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import Params, replace
from pipeline.data import rle
from pipeline.evaluation import paper_numbers as paper
from pipeline.evaluation.aggregate import HQ_MEAN, ReportError, coco_key, hq_benchmarks, lead_metrics, read_method_json
from pipeline.evaluation.gallery import GalleryInputs, gallery_rows, select_gallery_views
from pipeline.evaluation.report import build_report
from tests.fakes import load_test_params

HQ_PROMPTS = ("gt_box", "noisy_box", "point_1", "point_3", "point_5", "point_10", "point_20")
IMAGE_SETS = {"DIS5K-VD": "DIS5K/DIS-VD", "COIFT": "thin_object_detection/COIFT"}
H, W = 40, 56


def _params(**overrides):
    base = {"evaluate.methods": ["sam", "stable_sam"], "evaluate.gallery_images": 2, "evaluate.coco": [],
            "evaluate.folders": [], "evaluate.benchmarks": ["DIS5K-VD", "COIFT", "HRSOD", "ThinObject5K-TE"]}
    base.update(overrides)
    return load_test_params(**base)


def _method_json(rng: np.random.Generator, with_alpha: bool) -> dict:
    out = {}
    for i, p in enumerate(HQ_PROMPTS):
        m = {"miou": float(rng.uniform(30, 90)), "mbiou": float(rng.uniform(20, 80)), "st": float(rng.uniform(40, 100)), "n": 2}
        if with_alpha:
            m["alpha1"] = 0.7 - 0.05 * i  # falls with the number of points
        out[p] = m
    return out


def _gt(k: int) -> np.ndarray:
    m = np.zeros((H, W), bool)
    m[8 + k : 30, 10 : 40 + k] = True
    return m


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    """Eval JSONs for 3 HQ sets x {sam, stable_sam}; images, index, prompts, predictions for 2 sets."""
    rng = np.random.default_rng(0)
    eval_dir = tmp_path / "metrics" / "eval"
    for bench in ("DIS5K-VD", "COIFT", "HRSOD"):
        for method, alpha in (("sam", False), ("stable_sam", True)):
            path = eval_dir / bench / f"{method}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(_method_json(rng, alpha)))
    root = tmp_path / "hqseg44k"
    index_rows, prompt_rows = [], []
    preds: dict[tuple[str, str], list[dict]] = {}
    for bench, folder in IMAGE_SETS.items():
        for k in range(2):
            stem = f"img{k}"
            img_rel, mask_rel = f"{folder}/im/{stem}.png", f"{folder}/gt/{stem}.png"
            gt = _gt(k)
            image = np.broadcast_to(np.linspace(40, 200, W, dtype=np.uint8)[None, :, None], (H, W, 3)).copy()
            image[gt] = (200, 120, 40)  # an orange object on a grey ramp
            for rel, arr in ((img_rel, image), (mask_rel, gt.astype(np.uint8) * 255)):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(arr).save(root / rel)
            sid = f"{bench}/{stem}"
            index_rows.append({"sample_id": sid, "dataset": bench, "split": "eval", "image_path": img_rel,
                               "mask_path": mask_rel, "height": H, "width": W})
            view = f"{sid}#0"
            for prompt in ("noisy_box", "point_1"):
                for draw in (0, 1):
                    prompt_rows.append({"view_id": view, "prompt_type": prompt, "draw": draw,
                                        "box": [5.0, 5.0, 45.0, 33.0] if prompt == "noisy_box" else None,
                                        "points": [20.0, 15.0] if prompt == "point_1" else None,
                                        "point_labels": [1] if prompt == "point_1" else None})
                    sam_mask = np.zeros_like(gt)
                    sam_mask[8 + k : 30, 10 : 25] = True  # the left half of the GT
                    for method, mask in (("sam", sam_mask), ("stable_sam", gt)):
                        preds.setdefault((bench, method), []).append(
                            {"view_id": view, "prompt_type": prompt, "draw": draw, "iou": 0.5, "biou": 0.5,
                             "alpha1": None, "pred_rle": rle.encode(mask), "score": 0.9})
    index_rows.append({"sample_id": "DIS5K-TR/t0", "dataset": "DIS5K-TR", "split": "train", "image_path": "x.jpg",
                       "mask_path": "x.png", "height": H, "width": W})
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(index_rows), tmp_path / "data" / "index.parquet")
    pq.write_table(pa.Table.from_pylist(prompt_rows), tmp_path / "data" / "eval.parquet")
    for (bench, method), rows in preds.items():
        path = tmp_path / "data" / "predictions" / bench / f"{method}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), path)
    return {"tmp": tmp_path, "eval_dir": eval_dir, "root": root, "index": tmp_path / "data" / "index.parquet",
            "prompts": tmp_path / "data" / "eval.parquet", "predictions": tmp_path / "data" / "predictions"}


def _run(ws: dict[str, Path], params, **kw):
    t = ws["tmp"]
    args = dict(predictions_dir=ws["predictions"], prompts=ws["prompts"], index=ws["index"], root=ws["root"])
    args.update(kw)
    return build_report(params, ws["eval_dir"], args["predictions_dir"], args["prompts"], args["index"], args["root"],
                        t / "metrics" / "eval.json", t / "plots" / "eval", t / "reports" / "summary.md")


def test_eval_json_hq_mean_and_headline(workspace):
    params = _params()
    res = _run(workspace, params, predictions_dir=None)
    ev = json.loads(res.metrics_path.read_text())
    assert set(ev) == {"DIS5K-VD", "COIFT", "HRSOD", HQ_MEAN}
    for method in ("sam", "stable_sam"):
        for prompt in HQ_PROMPTS:
            for metric in ("miou", "mbiou", "st"):
                vals = [ev[b][method][prompt][metric] for b in ("DIS5K-VD", "COIFT", "HRSOD")]
                assert ev[HQ_MEAN][method][prompt][metric] == pytest.approx(np.mean(vals), abs=1e-3)
            assert ev[HQ_MEAN][method][prompt]["n"] == 6 and ev[HQ_MEAN][method][prompt]["n_sets"] == 3
    assert "alpha1" in ev[HQ_MEAN]["stable_sam"]["point_1"] and "alpha1" not in ev[HQ_MEAN]["sam"]["point_1"]
    head = json.loads(res.headline_path.read_text())
    assert res.headline_path == res.metrics_path.with_name("headline.json")
    assert set(head[HQ_MEAN]["stable_sam"]) == set(params.report.headline_prompts)
    d = head["delta"]["stable_sam_minus_sam"]["noisy_box"]["miou"]
    assert d == pytest.approx(ev[HQ_MEAN]["stable_sam"]["noisy_box"]["miou"] - ev[HQ_MEAN]["sam"]["noisy_box"]["miou"], abs=2e-3)
    # the promote metric of tracking resolves to the same number in both files
    assert head[HQ_MEAN]["stable_sam"]["noisy_box"]["miou"] == pytest.approx(ev[HQ_MEAN]["stable_sam"]["noisy_box"]["miou"], abs=1e-3)
    assert any("gallery skipped" in n for n in res.notes)


def test_plots_gallery_and_summary(workspace):
    res = _run(workspace, _params())
    names = {p.name for p in res.plots}
    assert {"miou_vs_points.png", "miou_vs_points.csv", "alpha1_vs_points.png", "miou_per_dataset.png",
            "gallery_noisy_box.png", "gallery_point_1.png"} <= names
    for p in res.plots:
        assert p.stat().st_size > 0
        if p.suffix == ".png":
            with Image.open(p) as im:
                arr = np.asarray(im.convert("RGB"))
            assert arr.shape[0] > 100 and arr.shape[1] > 100 and arr.std() > 5, p
    csv_lines = (workspace["tmp"] / "plots" / "eval" / "miou_vs_points.csv").read_text().splitlines()
    assert csv_lines[0] == "points,sam,stable_sam" and [int(r.split(",")[0]) for r in csv_lines[1:]] == [1, 3, 5, 10, 20]
    md = res.report_md.read_text()
    assert "NOT comparable" in md and "ST is our definition" in md
    assert "| method | gt_box | noisy_box | point_1 |" in md
    assert "SAM paper" in md and "Stable-SAM paper" in md and f"{paper.HQ_MIOU['stable_sam']['noisy_box']:.1f}" in md
    assert "**Deltas** (stable_sam − sam" in md and "falls** monotonically" in md
    assert "### COIFT" in md and "COCO" not in md
    for link in [l.split("](")[1].rstrip(")") for l in md.splitlines() if l.startswith("![")]:
        assert (res.report_md.parent / link).is_file(), link
    assert "gallery_point_1.png" in md


def test_gallery_rows_titles_carry_iou(workspace):
    params = _params()
    inputs = GalleryInputs(workspace["predictions"], workspace["prompts"], workspace["index"], workspace["root"])
    notes: list[str] = []
    rows = gallery_rows(params, inputs, ["DIS5K-VD", "COIFT", "HRSOD"], notes)
    assert set(rows) == {"noisy_box", "point_1"} and len(rows["noisy_box"]) == 2
    first = rows["noisy_box"][0]  # round robin: DIS5K-VD img0 then COIFT img0
    assert first.caption.startswith("DIS5K-VD") and rows["noisy_box"][1].caption.startswith("COIFT")
    gt = _gt(0)
    sam_iou = 100 * gt[:, :25].sum() / gt.sum()
    titles = [p.title for p in first.panels]
    assert titles[1] == f"frozen SAM: IoU {sam_iou:.1f}" and titles[2] == "Stable-SAM: IoU 100.0"
    assert first.panels[0].box == [5.0, 5.0, 45.0, 33.0] and rows["point_1"][0].panels[0].points.shape == (1, 2)
    assert np.array_equal(first.panels[3].mask, gt)
    assert any("HRSOD" in n for n in notes)  # no predictions there


def test_select_gallery_views_round_robin():
    picked = select_gallery_views({"A": ["a2", "a1"], "B": ["b1"], "C": []}, 3)
    assert picked == [("A", "a1"), ("B", "b1"), ("A", "a2")]


def test_no_alpha_with_coco(workspace):
    t = workspace["tmp"]
    for p in workspace["eval_dir"].glob("*/stable_sam.json"):  # a DRP-less run
        p.write_text(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "alpha1"}
                                 for k, v in json.loads(p.read_text()).items()}))
    (workspace["eval_dir"] / "val_tiny").mkdir()
    for method, m in (("sam", 0.30), ("stable_sam", 0.45)):
        (workspace["eval_dir"] / "val_tiny" / f"{method}.json").write_text(
            json.dumps({"gt_box": {"map": 100 * m, "map50": 60.0, "miou": 70.0}, "noisy_box": {"map": 10.0, "map50": 20.0, "miou": 30.0}}))
    coco = [{"name": "val_tiny", "images": "x", "annotations": "y.json", "box_source": "gt", "detections": ""}]
    (t / "plots" / "eval").mkdir(parents=True)
    (t / "plots" / "eval" / "alpha1_vs_points.png").write_bytes(b"stale")
    benchmarks = ["DIS5K-VD", "COIFT", "HRSOD", "ThinObject5K-TE"]
    res = _run(workspace, _params(**{"evaluate.coco": coco, "evaluate.benchmarks": benchmarks}), predictions_dir=t / "nowhere")
    ev = json.loads(res.metrics_path.read_text())
    assert ev["coco_val_tiny"]["stable_sam"]["gt_box"]["map"] == 45.0 and "coco_val_tiny" not in ev[HQ_MEAN]
    head = json.loads(res.headline_path.read_text())
    assert head["coco_val_tiny"]["sam"]["gt_box"]["map"] == 30.0
    assert not (t / "plots" / "eval" / "alpha1_vs_points.png").exists()  # stale figure removed
    assert not any(p.name.startswith("gallery_") for p in res.plots)
    md = res.report_md.read_text()
    assert "No method with DRP" in md and "### coco_val_tiny" in md and "45.0 / 60.0 / 70.0" in md
    assert coco_key("coco_synth") == "coco_synth"


def test_bad_and_missing_inputs(workspace, tmp_path):
    bad = workspace["eval_dir"] / "COIFT" / "sam.json"
    bad.write_text('{"noisy_box": {"miou": "high"}}')
    with pytest.raises(ReportError, match="COIFT/sam.json"):
        _run(workspace, _params())
    with pytest.raises(ReportError, match="run the evaluate stage"):
        build_report(_params(), tmp_path / "none", None, None, None, None, tmp_path / "e.json", tmp_path / "p", tmp_path / "s.md")


def test_alpha_in_percent_is_rescaled(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"point_1": {"miou": 50.0, "alpha1": 61.4}, "point_3": {"miou": 60.0, "alpha1": 46.9, "st": float("nan")}}))
    data = read_method_json(p)
    assert data["point_1"]["alpha1"] == pytest.approx(0.614) and "st" not in data["point_3"]


def test_cli(workspace, test_params_path):
    from stages.report import main

    t = workspace["tmp"]
    rc = main(["--params", str(test_params_path), "--eval-dir", str(workspace["eval_dir"]),
               "--metrics", str(t / "m" / "eval.json"), "--plots", str(t / "pl"), "--report", str(t / "r" / "s.md")])
    assert rc == 0 and (t / "m" / "headline.json").is_file() and (t / "r" / "s.md").is_file()
    assert main(["--params", str(test_params_path), "--eval-dir", str(t / "none"), "--metrics",
                 str(t / "x.json"), "--plots", str(t / "p2"), "--report", str(t / "s2.md")]) == 2


def test_gallery_survives_a_corrupt_predictions_file(workspace):
    (workspace["predictions"] / "COIFT" / "stable_sam.parquet").write_bytes(b"not parquet")
    inputs = GalleryInputs(workspace["predictions"], workspace["prompts"], workspace["index"], workspace["root"])
    notes: list[str] = []
    rows = gallery_rows(_params(), inputs, ["DIS5K-VD", "COIFT"], notes)
    assert [r.caption.split("\n")[0] for r in rows["noisy_box"]] == ["DIS5K-VD", "DIS5K-VD"]
    assert any("COIFT" in n and "stable_sam.parquet" in n for n in notes)


def test_recovery_ratio_in_eval_json_headline_and_summary(workspace):
    params = _params()
    res = _run(workspace, params, predictions_dir=None)
    mean = json.loads(res.metrics_path.read_text())[HQ_MEAN]
    sam, ours = mean["sam"], mean["stable_sam"]
    for prompt in paper.RECOVERY_PROMPTS:
        gap = sam["gt_box"]["miou"] - sam[prompt]["miou"]
        if gap >= 0.5:
            want = (ours[prompt]["miou"] - sam[prompt]["miou"]) / gap
            assert ours[prompt]["recovery"] == pytest.approx(want, abs=1e-3)
        else:
            assert "recovery" not in ours[prompt]  # SAM loses nothing to this prompt: no ratio
        assert "recovery" not in sam[prompt] or sam[prompt]["recovery"] == 0.0
    head = json.loads(res.headline_path.read_text())[HQ_MEAN]["stable_sam"]
    assert all(head[p].get("recovery") == pytest.approx(ours[p]["recovery"], abs=1e-3)
               for p in ("noisy_box", "point_1") if "recovery" in ours[p])
    md = res.report_md.read_text()
    assert "**Recovery ratio**" in md and "Stable-SAM (paper, ViT-L) | 1.09 | 0.93" in md
    # dvc exp show lists the keys in file order: without a seeds file, the claim of this run leads
    lead = list(json.loads(res.headline_path.read_text()))
    want = [f"R_{p}" for p in ("noisy_box", "point_1") if "recovery" in ours[p]] + ["d_gt_box"]
    assert lead[:len(want)] == want
    head_all = json.loads(res.headline_path.read_text())
    assert head_all["d_gt_box"] == pytest.approx(ours["gt_box"]["miou"] - sam["gt_box"]["miou"], abs=1e-3)


def test_paper_recovery_ratios():
    assert paper.PAPER_RECOVERY["noisy_box"] == pytest.approx(1.091, abs=1e-3)
    assert paper.PAPER_RECOVERY["point_1"] == pytest.approx(0.928, abs=1e-3)
    assert paper.recovery(50.0, 40.0, 40.2) is None  # no gap to recover
    assert paper.recovery(45.0, 40.0, 50.0) == pytest.approx(0.5)


def test_seeds_aggregate_and_report(workspace, tmp_path):
    from pipeline.evaluation.seeds import aggregate, seed_sample

    hq = ["DIS5K-VD", "COIFT"]
    base = {"gt_box": {"miou": 60.0}, "noisy_box": {"miou": 40.0}, "point_1": {"miou": 30.0}}
    samples = {}
    for seed, gain in ((0, 10.0), (1, 14.0), (2, 12.0)):
        per_bench = {b: {"gt_box": {"miou": 60.0}, "noisy_box": {"miou": 40.0 + gain},
                         "point_1": {"miou": 30.0 + gain, "alpha1": 0.6}} for b in hq}
        samples[seed] = seed_sample(per_bench, base, "sam", hq)
    agg = aggregate(samples)
    r = agg["noisy_box"]["recovery"]
    assert r["mean"] == pytest.approx(0.6) and r["std"] == pytest.approx(0.1) and r["n"] == 3
    assert r["values"] == {"0": 0.5, "1": 0.7, "2": 0.6}
    assert agg["point_1"]["delta"]["mean"] == pytest.approx(12.0) and agg["point_1"]["alpha1"]["mean"] == pytest.approx(0.6)
    seeds_json = tmp_path / "seeds.json"
    seeds_json.write_text(json.dumps({"seeds": [0, 1, 2], "baseline": "sam", "methods": {"stable_sam": agg}}))
    t = workspace["tmp"]
    res = build_report(_params(), workspace["eval_dir"], None, None, None, None, t / "m" / "eval.json", t / "p",
                       t / "r" / "summary.md", seeds_json=seeds_json)
    head = json.loads(res.headline_path.read_text())
    assert head["seeds"]["stable_sam"]["noisy_box"]["recovery"] == {"mean": 0.6, "std": 0.1}
    # the leading columns of `dvc exp show`: the seed means and spreads, before any nested detail
    assert list(head)[:5] == ["R_noisy_box", "R_noisy_box_sd", "R_point_1", "R_point_1_sd", "d_gt_box"]
    assert (head["R_noisy_box"], head["R_noisy_box_sd"], head["d_gt_box"]) == (0.6, 0.1, 0.0)
    assert "0.60 ± 0.10" in res.report_md.read_text()


def test_run_seeds_trains_each_extra_seed_under_its_own_seed(monkeypatch, tmp_path, test_params: Params):
    """The seeds stage retrains with seed s; params with ``seed = s`` must not reject s as a duplicate of
    ``seeds.extra`` (the bug a full `dvc repro` hit), and each run is scored and aggregated."""
    import pipeline.evaluation.evaluate as evaluate_mod
    import pipeline.training.train as train_mod
    from pipeline.evaluation.seeds import run_seeds

    p = replace(test_params, **{"seed": 0, "seeds.extra": [1, 2], "seeds.methods": ["stable_sam"]})
    hq = hq_benchmarks(p)
    seen: list[int] = []

    def fake_train(params, method, **kw):
        seen.append(params.seed)
        return {}

    def fake_eval(params, bench, method, **kw):
        return {"gt_box": {"miou": 60.0}, "noisy_box": {"miou": 40.0 + 2 * params.seed}}

    monkeypatch.setattr(train_mod, "train", fake_train)
    monkeypatch.setattr(evaluate_mod, "evaluate_benchmark", fake_eval)
    eval_dir = tmp_path / "eval"
    for bench in hq:
        for method, noisy in (("sam", 40.0), ("stable_sam", 40.0)):
            (eval_dir / bench).mkdir(parents=True, exist_ok=True)
            (eval_dir / bench / f"{method}.json").write_text(json.dumps(
                {"gt_box": {"miou": 60.0}, "noisy_box": {"miou": noisy}}))
    out = run_seeds(p, embeddings=tmp_path, prompts=tmp_path, base=tmp_path, eval_dir=eval_dir,
                    work=tmp_path / "work", out=tmp_path / "seeds.json")
    assert seen == [1, 2]
    r = out["methods"]["stable_sam"]["noisy_box"]["recovery"]
    assert r["values"] == {"0": 0.0, "1": 0.1, "2": 0.2} and r["n"] == 3
    assert json.loads((tmp_path / "seeds.json").read_text())["seeds"] == [0, 1, 2]

    # one seed only (seeds.extra: []): nothing trained, the work folder (a DVC output) still made, no spread shown
    seen.clear()
    one = replace(p, **{"seeds.extra": []})
    out1 = run_seeds(one, embeddings=tmp_path, prompts=tmp_path, base=tmp_path, eval_dir=eval_dir,
                     work=tmp_path / "work1", out=tmp_path / "seeds1.json")
    assert seen == [] and (tmp_path / "work1").is_dir()
    assert out1["methods"]["stable_sam"]["noisy_box"]["recovery"]["n"] == 1
    lead = lead_metrics({}, one, out1)
    assert "R_noisy_box" in lead and "R_noisy_box_sd" not in lead
