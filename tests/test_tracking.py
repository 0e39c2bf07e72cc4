"""MLflow tracking adapter, the track stage's logic, promotion and the comparison report.

All against a temporary sqlite store and fake stage outputs (no real pipeline, no real SAM); one module
(~450 lines) so the store and the tracked fake run are built once and shared:

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_tracking.py -q
"""
from __future__ import annotations

import csv
import json
import math
import uuid
from pathlib import Path

import base64
import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.data import rle
from pipeline.tracking.collect import (
    MAX_PARAM_CHARS, PipelineOutputs, TrackingInputError, dvc_out_hashes, flatten_params, numeric_leaves,
    read_loss_curve, safe_key,
)
from pipeline.tracking.promotion import decide
from tests.fakes import free_port, load_test_params, write_tiny_base, write_trained_plugin

from pipeline.tracking import mlflow_adapter  # noqa: E402
from pipeline.tracking import compare  # noqa: E402
from pipeline.tracking.mlflow_adapter import ParamConflictError, Tracker  # noqa: E402
from pipeline.tracking.promotion import promote  # noqa: E402
from pipeline.tracking.serving import OUTPUT_COLUMNS, example_request  # noqa: E402
from pipeline.tracking.track import track_pipeline  # noqa: E402

METHODS = ["dsp", "stable_sam"]
BENCHES = ["DIS5K-VD", "hq_mean"]
PROMPTS = ["gt_box", "noisy_box", "point_1"]


@pytest.fixture(scope="module")
def serving_files(tmp_path_factory) -> dict[str, Path]:
    """A tiny random base and a stable_sam plugin file: what the track stage logs as the MLflow model."""
    tmp = tmp_path_factory.mktemp("serving")
    sam, sha = write_tiny_base(tmp / "base", img=64, grid=16)
    write_trained_plugin(tmp / "stable_sam.pt", "stable_sam", sam, load_test_params().plugin, sha)
    return {"base": tmp / "base", "plugin": tmp / "stable_sam.pt"}


def serving_builder(files: dict[str, Path], calls: list[str] | None = None, fail: bool = False):
    """The track stage's model builder, over ``serving_files`` instead of the pipeline's outputs."""
    from pipeline.tracking.serving import build_serving_model

    def build(method: str):
        if calls is not None:
            calls.append(method)
        if fail:
            raise RuntimeError("simulated crash while building the model")
        return build_serving_model(method, files["base"], files["plugin"])
    return build


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One sqlite store per module (creating its tables takes seconds); tests use their own experiments."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    Tracker(uri, "warm-up")  # runs the schema migrations once
    return uri


def new_tracker(store: str) -> Tracker:
    return Tracker(store, f"test-{uuid.uuid4().hex[:8]}")


def fake_params(tmp_path: Path, **changes):
    registered = f"reg-{uuid.uuid4().hex[:8]}"
    base = {"train.methods": METHODS, "evaluate.methods": METHODS, "report.baseline": "dsp",
            "tracking.registered_model": registered, "seeds.methods": []}
    base.update(changes)
    return load_test_params(**base)


def make_outputs(root: Path, *, score: float = 80.0) -> PipelineOutputs:
    """Fake stage outputs in ``root`` laid out as dvc.yaml writes them."""
    out = PipelineOutputs.default(root)
    evaluation = {
        b: {m: {p: {"miou": score + i + j, "mbiou": score - 10 + j, "st": 70.0, "alpha1": 0.5}
                for j, p in enumerate(PROMPTS)} for i, m in enumerate(["sam"] + METHODS)}
        for b in BENCHES
    }
    out.eval_json.parent.mkdir(parents=True)
    out.eval_json.write_text(json.dumps(evaluation))
    (root / "metrics/eval/DIS5K-VD").mkdir(parents=True)
    (root / "metrics/eval/DIS5K-VD/dsp.json").write_text("{}")
    out.train_metrics.mkdir(parents=True)
    out.train_plots.mkdir(parents=True)
    out.plugins.mkdir(parents=True)
    for m in METHODS:
        (out.train_metrics / f"{m}.json").write_text(json.dumps({"final_loss": 0.25, "steps": 30, "note": "x",
                                                                   "timing": {"s_per_step": 0.5}}))
        with open(out.train_plots / f"{m}_loss.csv", "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["step", "loss", "lr"])
            for step, loss in [(0, 1.0), (10, 0.5), (20, "nan"), (30, 0.25)]:
                w.writerow([step, loss, 1e-3])
        (out.train_plots / f"{m}_loss.png").write_bytes(b"\x89PNG fake")
        torch.save({"method": m, "state_dict": {"w": torch.zeros(2)}}, out.plugins / f"{m}.pt")
    (root / "plots/eval").mkdir(parents=True)
    (root / "plots/eval/miou.png").write_bytes(b"\x89PNG fake")
    out.report.parent.mkdir(parents=True)
    out.report.write_text("# summary\n")
    out.dvc_lock.write_text(
        "schema: '2.0'\nstages:\n"
        "  download:\n    cmd: x\n    outs:\n    - path: data/hqseg44k\n      hash: md5\n      md5: aaa.dir\n"
        "  index:\n    cmd: y\n    outs:\n    - path: data/index\n      hash: md5\n      md5: bbb.dir\n"
        "  train@stable_sam:\n    cmd: z\n    outs:\n    - path: models/plugins/stable_sam.pt\n      md5: ccc\n")
    return out


# --- pure helpers ----------------------------------------------------------------------------------
def test_flatten_params_dots_and_truncates():
    flat = flatten_params({"train": {"lr": 0.001, "methods": ["a", "b"]}, "x": {"long": "y" * 400},
                           "e": {"coco": []}, "d": {}})
    assert flat["train.lr"] == "0.001"
    assert flat["train.methods"] == '["a","b"]'
    assert len(flat["x.long"]) == MAX_PARAM_CHARS and flat["x.long"].endswith("...")
    assert flat["e.coco"] == "[]" and flat["d"] == "{}"
    assert safe_key("dvc.md5.train@m.a:b") == "dvc.md5.train-m.a-b"


def test_numeric_leaves_skip_non_numbers():
    got = numeric_leaves({"a": {"b": 1, "c": "x", "d": True, "e": float("nan"), "f": [1]}, "g": 2.5}, "p.")
    assert got == {"p.a.b": 1.0, "p.g": 2.5}


def test_read_loss_curve_and_bad_files(tmp_path):
    ok = tmp_path / "m_loss.csv"
    ok.write_text("step,loss,lr\n0,1.0,0.1\n5,0.5,\n10,nan,0.1\n")
    curves = read_loss_curve(ok)
    assert curves["loss"] == ([0, 5], [1.0, 0.5])
    assert curves["lr"] == ([0, 10], [0.1, 0.1])
    bad = tmp_path / "bad.csv"
    bad.write_text("iteration,loss\n0,1\n")
    with pytest.raises(TrackingInputError, match="bad.csv.*step"):
        read_loss_curve(bad)
    with pytest.raises(TrackingInputError, match="missing.csv"):
        read_loss_curve(tmp_path / "missing.csv")


def test_dvc_out_hashes_only_data_stages(tmp_path):
    out = make_outputs(tmp_path)
    tags = dvc_out_hashes(out.dvc_lock)
    assert tags == {"dvc.md5.download.data/hqseg44k": "aaa.dir",
                    "dvc.md5.train.stable_sam.models/plugins/stable_sam.pt": "ccc"}
    assert dvc_out_hashes(tmp_path / "absent.lock") == {}


def test_dvc_out_hashes_skip_items_no_longer_in_the_pipeline(tmp_path):
    """dvc.lock keeps ``train@dsp`` after dsp left train.methods; the run must not carry its hash."""
    out = make_outputs(tmp_path)
    out.dvc_lock.write_text(out.dvc_lock.read_text() + "  train@dsp:\n    cmd: z\n    outs:\n"
                            "    - path: models/plugins/dsp.pt\n      md5: ddd\n")
    assert "dvc.md5.train.dsp.models/plugins/dsp.pt" in dvc_out_hashes(out.dvc_lock)
    tags = dvc_out_hashes(out.dvc_lock, items={"train": ["stable_sam"]})
    assert tags == {"dvc.md5.download.data/hqseg44k": "aaa.dir",
                    "dvc.md5.train.stable_sam.models/plugins/stable_sam.pt": "ccc"}


def test_decide_both_ways():
    assert decide(0.8, None, 0.0, has_champion=False)[0] is True
    assert decide(0.8, 0.7, 0.0, has_champion=True)[0] is True
    assert decide(0.8, 0.8, 0.0, has_champion=True)[0] is True  # ties promote (>=)
    ok, why = decide(0.8, 0.79, 0.02, has_champion=True)
    assert ok is False and "margin" in why
    assert decide(None, 0.7, 0.0, has_champion=True)[0] is False
    assert decide(float("nan"), None, 0.0, has_champion=False)[0] is False
    assert decide(0.5, None, 0.0, has_champion=True)[0] is True  # champion lacks the metric


# --- adapter ---------------------------------------------------------------------------------------
def test_experiment_is_marked_as_model_training(store):
    """The MLflow 3 UI opens an experiment on its training runs only when it carries the kind tag; an
    experiment created before the tag existed gets it on the next use."""
    from mlflow import MlflowClient

    from pipeline.tracking.mlflow_adapter import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG

    tracker = new_tracker(store)
    client = MlflowClient(tracking_uri=store)
    assert client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    old = client.create_experiment(f"old-{uuid.uuid4().hex[:8]}")
    assert EXPERIMENT_KIND_TAG not in client.get_experiment(old).tags
    Tracker(store, client.get_experiment(old).name)
    assert client.get_experiment(old).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND


def test_param_logging_is_retry_safe(store):
    tracker = new_tracker(store)
    run = tracker.start_run("retry")
    assert tracker.log_params(run.run_id, {"a": 1, "b": "x"}) == 2
    assert tracker.log_params(run.run_id, {"a": 1, "b": "x", "c": 0.5}) == 1  # retried call: no failure
    with pytest.raises(ParamConflictError, match="'a'.*'1'.*'2'"):
        tracker.log_params(run.run_id, {"a": 2})
    assert tracker.log_metrics(run.run_id, {"m": 1.0}) == 1
    assert tracker.log_metrics(run.run_id, {"m": 1.0}) == 0
    assert tracker.metric_history(run.run_id, "m") == [(0, 1.0)]
    resumed = tracker.start_run("retry2", resume_key="k1")
    tracker.finish_run(resumed.run_id, "FAILED")
    again = tracker.start_run("retry2", resume_key="k1")
    assert again.resumed and again.run_id == resumed.run_id
    tracker.finish_run(again.run_id)
    assert tracker.start_run("retry2", resume_key="k1").run_id != resumed.run_id  # finished: a new run


def test_default_tracking_uri_is_absolute_sqlite(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    uri = mlflow_adapter.resolve_tracking_uri("", tmp_path)
    assert uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))  # dvc exp run --temp: the real project root
    assert mlflow_adapter.resolve_tracking_uri("", tmp_path / "tmpcopy") == f"sqlite:///{tmp_path.resolve()}/project/mlflow.db"
    assert mlflow_adapter.default_artifact_location(uri) == (tmp_path.resolve() / "mlruns").as_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert mlflow_adapter.resolve_tracking_uri("", tmp_path) == "http://127.0.0.1:5000"
    assert mlflow_adapter.resolve_tracking_uri("sqlite:////x/y.db", tmp_path) == "sqlite:////x/y.db"


# --- the track stage -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tracked(store, tmp_path_factory, serving_files):
    root = tmp_path_factory.mktemp("ws")
    outputs = make_outputs(root)
    params = fake_params(root)
    tracker = new_tracker(store)
    cwd = tmp_path_factory.mktemp("cwd")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(cwd)  # nothing may land in the caller's working directory (MLflow's ./mlruns default)
        result = track_pipeline(params, outputs, tracker=tracker, model_builder=serving_builder(serving_files), exp_name="exp-a",
                                out_json=root / "metrics/track.json")
    assert list(cwd.iterdir()) == []
    return tracker, params, outputs, result


def test_track_parent_run(tracked):
    tracker, params, outputs, result = tracked
    parent = tracker.get_run(result.parent_run_id)
    assert parent.status == "FINISHED" and parent.name == "exp-a"
    assert parent.params["train.lr"] == str(params.train.lr)
    assert parent.params["train.methods"] == '["dsp","stable_sam"]'
    assert parent.params["tracking.registered_model"] == params.tracking.registered_model
    assert all(len(v) <= MAX_PARAM_CHARS for v in parent.params.values())
    assert parent.tags["profile"] == params.data.source
    assert parent.tags["dvc.exp_name"] == "exp-a"
    assert parent.tags["git.commit"]
    assert parent.tags["dvc.md5.download.data/hqseg44k"] == "aaa.dir"
    assert parent.tags["registered.version"] == result.model_version
    assert parent.metrics["hq_mean.stable_sam.noisy_box.miou"] == pytest.approx(83.0)
    assert parent.metrics["train.dsp.timing.s_per_step"] == 0.5
    arts = set(tracker.list_artifacts(result.parent_run_id))
    assert {"reports/summary.md", "plots/eval/miou.png", "plots/train/dsp_loss.png", "metrics/eval.json",
            "metrics/train/stable_sam.json", "metrics/eval/DIS5K-VD/dsp.json", "models/plugins/dsp.pt"} <= arts
    assert "metrics/track.json" not in arts  # the stage's own output is never an input
    written = json.loads((outputs.root / "metrics/track.json").read_text())
    assert written["parent_run_id"] == result.parent_run_id and written["model_version"] == result.model_version


def test_track_child_runs(tracker_children):
    tracker, result, children = tracker_children
    assert set(children) == {"train/dsp", "train/stable_sam", "eval/DIS5K-VD", "eval/hq_mean"}
    assert all(c.status == "FINISHED" for c in children.values())
    sst = children["train/stable_sam"]
    assert sst.params == {"method": "stable_sam"}
    assert sst.metrics["final_loss"] == 0.25 and "note" not in sst.metrics
    assert sst.metrics["hq_mean.stable_sam.noisy_box.miou"] == pytest.approx(83.0)
    assert not any(k.startswith("hq_mean.dsp") for k in sst.metrics)
    assert tracker.metric_history(sst.run_id, "train/loss") == [(0, 1.0), (10, 0.5), (30, 0.25)]
    bench = children["eval/hq_mean"]
    assert bench.params == {"benchmark": "hq_mean"}
    assert bench.metrics["sam.point_1.miou"] == pytest.approx(82.0)
    assert bench.metrics["stable_sam.gt_box.alpha1"] == 0.5


@pytest.fixture(scope="module")
def tracker_children(tracked):
    tracker, _, _, result = tracked
    runs = tracker.find_runs({}, parent_run_id=result.parent_run_id)
    return tracker, result, {r.name: r for r in runs}


def test_track_registers_challenger_model(tracked):
    tracker, params, _, result = tracked
    name = params.tracking.registered_model
    version = tracker.version_by_alias(name, "challenger")
    assert version is not None and version.version == result.model_version == "1"
    assert version.run_id == result.method_runs["stable_sam"]
    assert version.tags["method"] == "stable_sam" and result.model_format == "pyfunc"
    assert tracker.version_by_alias(name, "champion") is None
    logged = tracker.client.get_logged_model(version.source.removeprefix("models:/"))
    assert logged.experiment_id == tracker.experiment_id and logged.source_run_id == version.run_id
    assert str(logged.status).endswith("READY")
    model = tracker.load_model(f"models:/{name}@challenger")
    request = example_request(Path("."))
    out = model.predict(request)
    assert list(out.columns) == list(OUTPUT_COLUMNS) and len(out) == 1
    mask = rle.decode(out["mask_rle"][0], int(out["height"][0]), int(out["width"][0]))
    assert int(out["area"][0]) == int(mask.sum()) and 0.0 < out["alpha1"][0] < 1.0


def test_track_resumes_after_crash(store, tmp_path, serving_files):
    outputs = make_outputs(tmp_path)
    params = fake_params(tmp_path)
    tracker = new_tracker(store)
    with pytest.raises(RuntimeError, match="simulated crash"):
        track_pipeline(params, outputs, tracker=tracker, model_builder=serving_builder(serving_files, fail=True), exp_name="")
    failed = tracker.search_runs("tags.`stable_sam.kind` = 'pipeline'")
    assert len(failed) == 1 and failed[0].status == "FAILED"
    calls: list[str] = []
    result = track_pipeline(params, outputs, tracker=tracker, model_builder=serving_builder(serving_files, calls), exp_name="")
    assert result.resumed and result.parent_run_id == failed[0].run_id
    assert calls == ["stable_sam"]
    runs = tracker.find_runs({}, parent_run_id=result.parent_run_id)
    names = sorted(r.name for r in runs)
    assert names == sorted(["train/dsp", "train/stable_sam", "eval/DIS5K-VD", "eval/hq_mean"])  # no duplicates
    dsp = next(r for r in runs if r.name == "train/dsp")
    assert tracker.metric_history(dsp.run_id, "train/loss") == [(0, 1.0), (10, 0.5), (30, 0.25)]
    assert tracker.get_run(result.parent_run_id).status == "FINISHED"
    assert tracker.version_by_alias(params.tracking.registered_model, "challenger").version == "1"


def test_track_rejects_bad_inputs_before_logging(store, tmp_path, serving_files):
    outputs = make_outputs(tmp_path)
    outputs.eval_json.write_text("{not json")
    tracker = new_tracker(store)
    with pytest.raises(TrackingInputError, match="eval.json"):
        track_pipeline(fake_params(tmp_path), outputs, tracker=tracker, model_builder=serving_builder(serving_files))
    assert tracker.search_runs() == []


# --- promotion -------------------------------------------------------------------------------------
def _challenger(tracker: Tracker, name: str, value: float | None) -> str:
    run = tracker.start_run(f"cand-{value}")
    if value is not None:
        tracker.log_metrics(run.run_id, {"hq_mean.stable_sam.noisy_box.miou": value})
    tracker.finish_run(run.run_id)
    return tracker.register_model(name, f"runs:/{run.run_id}/model", run.run_id, alias="challenger").version


def test_promotion_both_ways(store, tmp_path):
    tracker = new_tracker(store)
    cfg = fake_params(tmp_path, **{"tracking.promote_margin": 1.0}).tracking
    name = cfg.registered_model
    assert promote(tracker, cfg).promote is False  # nothing registered yet

    v1 = _challenger(tracker, name, 80.0)
    d1 = promote(tracker, cfg)
    assert d1.promote and d1.champion_version is None and "no champion" in d1.reason
    assert tracker.aliases(name)["champion"] == v1
    assert promote(tracker, cfg).promote is False  # already champion: nothing to do

    v2 = _challenger(tracker, name, 80.5)  # better, but not by the margin
    d2 = promote(tracker, cfg)
    assert not d2.promote and d2.champion_value == 80.0 and d2.challenger_value == 80.5
    assert tracker.aliases(name) == {"champion": v1, "challenger": v2}
    rec = tracker.get_version(name, v2).tags
    assert rec["promotion.decision"] == "kept" and "margin" in rec["promotion.reason"]
    run_v2 = tracker.get_run(tracker.get_version(name, v2).run_id)
    assert run_v2.metrics["promotion.promoted"] == 0.0 and run_v2.tags["promotion.decision"] == "kept"

    v3 = _challenger(tracker, name, 81.0)  # exactly champion + margin
    d3 = promote(tracker, cfg)
    assert d3.promote and d3.champion_version == v1
    assert tracker.aliases(name)["champion"] == v3
    assert tracker.get_version(name, v1).tags["promotion.replaced_by"] == v3
    assert tracker.get_run(tracker.get_version(name, v3).run_id).metrics["promotion.promoted"] == 1.0

    _challenger(tracker, name, None)  # a challenger without the metric never wins
    d4 = promote(tracker, cfg)
    assert not d4.promote and d4.challenger_value is None and tracker.aliases(name)["champion"] == v3


# --- comparison ------------------------------------------------------------------------------------
def test_compare_runs_and_aliases(tracked, tmp_path):
    tracker, params, outputs, result = tracked
    metrics = ["hq_mean.stable_sam.noisy_box.miou", "hq_mean.sam.gt_box.miou", "hq_mean.nope.x.miou"]
    comp = compare.gather(tracker, metrics, mode="runs", last=3)
    assert [r.run_id for r in comp.rows] == [result.parent_run_id]
    row = comp.rows[0]
    assert row.values["hq_mean.stable_sam.noisy_box.miou"] == pytest.approx(83.0)
    assert row.values["hq_mean.nope.x.miou"] is None
    md = compare.to_markdown(comp)
    assert "| exp-a |" in md and "83" in md and "—" in md
    paths = compare.write(comp, tmp_path / "cmp")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    assert json.loads(paths["json"].read_text())["rows"][0]["run_id"] == result.parent_run_id
    duo = compare.gather(tracker, metrics[:1], mode="aliases", registered_model=params.tracking.registered_model)
    assert [r.label for r in duo.rows] == ["challenger (v1)"]  # no champion yet in this model
    assert math.isclose(duo.rows[0].values[metrics[0]], 83.0)


def test_compare_shows_deltas_promotion_metric_and_differing_params(tmp_path):
    """Pure: rows as gather() makes them. The ~1-point change is stated and drawn on a zoomed axis, the
    promotion metric is marked, and runs are labelled with the params that differ."""
    metric = "hq_mean.stable_sam.noisy_box.miou"
    rows = [compare.Row("champion (v1)", "a" * 32, {metric: 61.6, "hq_mean.sam.gt_box.miou": 72.7},
                        params={"train.lr": "0.001", "seed": "0", "train.max_steps": "200"}),
            compare.Row("challenger (v2)", "b" * 32, {metric: 62.4, "hq_mean.sam.gt_box.miou": 72.7},
                        params={"train.lr": "0.0003", "seed": "0", "train.max_steps": "400"})]
    comp = compare.Comparison([metric, "hq_mean.sam.gt_box.miou"], rows, "t", reference=0,
                              promote_metric=metric, promote_margin=0.5,
                              differing=compare.differing_params(rows))
    assert comp.differing == ["train.lr", "train.max_steps"]
    assert compare.params_label(rows[1], comp.differing) == "lr=0.0003, max_steps=400"
    assert compare.delta(comp, rows[1], metric) == pytest.approx(0.8)
    md = compare.to_markdown(comp)
    assert f"**{metric}** (promotion)" in md and "62.4 (+0.80)" in md and "lr=0.0003, max_steps=400" in md
    lo, hi = compare.zoomed_limits(61.6, 62.4)
    assert 60 < lo < 61.6 and 62.4 < hi < 64  # not an axis from 0, where 0.8 points would be invisible
    paths = compare.write(comp, tmp_path / "cmp")
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


# --- the served model ------------------------------------------------------------------------------
@pytest.mark.slow
def test_registered_model_serves_masks_over_http(store, tmp_path, serving_files):
    """models:/<name>@champion loads with mlflow.pyfunc and, under `mlflow models serve` on 127.0.0.1,
    answers a real request with the same mask as the in-process predictor."""
    import os
    import subprocess
    import sys
    import time
    import urllib.request

    import mlflow.pyfunc

    from pipeline.inference.predictor import Predictor
    from pipeline.tracking.serving import build_serving_model

    tracker = new_tracker(store)
    run = tracker.start_run("serving")
    uri, model_id = tracker.log_pyfunc_model(run.run_id, build_serving_model("stable_sam", serving_files["base"],
                                                                             serving_files["plugin"]))
    name = f"serve-{uuid.uuid4().hex[:6]}"
    tracker.register_model(name, uri, run.run_id, model_id=model_id, alias="champion")
    request = example_request(Path("."))
    request = pd.concat([request, request.assign(box="", points="[[40, 40], [5, 5]]", labels="[1, 0]")],
                        ignore_index=True)
    mlflow.set_registry_uri(store)
    local = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(request)

    predictor = Predictor.from_pretrained(serving_files["base"], "stable_sam", serving_files["plugin"], device="cpu")
    predictor.set_image(np.asarray(Image.open(io.BytesIO(base64.b64decode(request["image"][0]))).convert("RGB")))
    box = json.loads(request["box"][0])
    masks, _, _ = predictor.predict(box=np.asarray(box, np.float32), multimask_output=False)
    assert local["mask_rle"][0] == rle.encode(masks[0])
    assert local["mask_rle"][1] != local["mask_rle"][0]

    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_REGISTRY_URI": store,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # uvicorn
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    proc = subprocess.Popen([mlflow_bin, "models", "serve", "-m", f"models:/{name}@champion", "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "--workers", "1"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        body = json.dumps({"dataframe_records": request.to_dict("records")}).encode()
        deadline = time.time() + 180
        answer = None
        while time.time() < deadline and proc.poll() is None:
            try:
                req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(req, timeout=30) as resp:
                    answer = json.loads(resp.read())
                break
            except OSError:
                time.sleep(1.0)
        if answer is None:
            proc.terminate()
            log = proc.communicate(timeout=20)[0].decode(errors="replace")[-3000:]
            pytest.fail(f"the model server did not answer within 180 s (exit {proc.returncode}):\n{log}")
        served = answer["predictions"]
        assert [r["mask_rle"] for r in served] == list(local["mask_rle"])
        assert [r["area"] for r in served] == list(local["area"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_pyfunc_model_pickles_without_its_loaded_predictor() -> None:
    """MLflow pickles the python model after running the input example through it: the loaded predictor (the
    whole base SAM, already logged as an artifact) must stay out of python_model.pkl (it doubled a vit_b model)."""
    import cloudpickle

    from pipeline.tracking.serving import PromptToMask

    model = PromptToMask()
    model.predictor = np.zeros(2_000_000, np.uint8)  # stands in for the loaded base SAM
    data = cloudpickle.dumps(model)
    assert len(data) < 100_000
    assert not hasattr(cloudpickle.loads(data), "predictor")
