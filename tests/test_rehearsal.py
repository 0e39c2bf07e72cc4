"""The full-geometry rehearsal (pipeline/rehearsal.py): every stage of dvc.yaml at the full profile's real shapes.

The slow test runs the whole pipeline (download -> ... -> track) with an official-architecture ViT-B at
1024x1024 on a small HQSeg-44K fixture served over loopback HTTP, and checks the outputs itself (not only
the rehearsal's own checks). The quick tests guard the derivation from params-full.yaml and the
"every stage ran" rule.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from pipeline.config import load_params
from pipeline.rehearsal import (FULL_PARAMS, OVERRIDES, RehearsalError, make_archives, rehearsal_params,
                                run_rehearsal, stage_problems)

SOURCES = {"download.endpoint": "http://127.0.0.1:9/data", "download.expected_sha256": {},
           "sam.checkpoint_url": "http://127.0.0.1:9/sam.pth", "sam.checkpoint_sha256": "0" * 64}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, Any] = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def test_rehearsal_params_are_the_full_profile_but_the_overrides(tmp_path: Path) -> None:
    full = _flat(yaml.safe_load(FULL_PARAMS.read_text(encoding="utf-8")))
    derived = rehearsal_params(SOURCES)
    flat = _flat(derived)
    changed = {k for k in full if flat[k] != full[k]}
    allowed = set(OVERRIDES) | set(SOURCES)
    assert changed <= allowed, f"keys changed beyond the overrides: {sorted(changed - allowed)}"
    assert flat["sam.variant"] == "vit_b" and flat["views.output_size"] == 0  # 0 = the ViT's own 1024 px
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(derived, sort_keys=False), encoding="utf-8")
    params = load_params(path)  # a valid profile
    assert params.data.source == "hqseg44k" and set(params.evaluate.benchmarks) <= set(params.data.eval_sets)


def test_rehearsal_params_refuse_an_override_the_full_profile_lacks(tmp_path: Path) -> None:
    full = yaml.safe_load(FULL_PARAMS.read_text(encoding="utf-8"))
    del full["train"]["max_steps"]
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(full), encoding="utf-8")
    with pytest.raises(RehearsalError, match="train.max_steps"):
        rehearsal_params(SOURCES, path)


def test_stage_problems_catch_a_skipped_repeated_or_failed_stage(tmp_path: Path) -> None:
    def rec(name: str, rc: int = 0) -> dict[str, Any]:
        return {"stage": name, "wall_s": 1.0, "cpu_s": 1.0, "peak_rss_mib": 10.0, "rc": rc}

    log = tmp_path / "log"
    assert stage_problems(["a", "b"], [rec("a"), rec("b")], 0, log) == []
    assert stage_problems(["a", "b"], [rec("a")], 0, log) == ["stages that did not run: b"]
    assert "ran more than once: a" in stage_problems(["a"], [rec("a"), rec("a")], 0, log)[0]
    assert stage_problems(["a"], [rec("a", 1)], 1, log) == [f"`dvc repro` exited 1 (log: {log})",
                                                            "stages that failed: a"]
    assert stage_problems([], [], 0, log) != []  # nothing listed proves nothing


def test_rehearsal_refuses_a_non_empty_scratch_folder(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("a user's file")
    with pytest.raises(RehearsalError, match="must be new or empty"):
        run_rehearsal(tmp_path, tmp_path / "out.json")
    assert (tmp_path / "keep.txt").is_file()  # refused before anything was created or removed


def test_fixture_archives_hold_every_set_in_the_real_layout(tmp_path: Path) -> None:
    import zipfile

    from pipeline.data.layout import HQSEG_SETS

    sums = make_archives(tmp_path, pairs_per_set=1)
    for s in HQSEG_SETS:
        with zipfile.ZipFile(tmp_path / s.archive) as zf:
            names = zf.namelist()
        assert any(n.startswith(s.image_dir + "/") and n.endswith(".jpg") for n in names), s.name
        assert any(n.startswith(s.mask_dir + "/") and n.endswith(".png") for n in names), s.name
    assert set(sums) == {s.archive for s in HQSEG_SETS} and all(len(v) == 64 for v in sums.values())


def _numbers(obj: Any) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _numbers(v)]
    return [float(obj)] if isinstance(obj, (int, float)) and not isinstance(obj, bool) else []


@pytest.mark.slow  # the whole pipeline with a ViT-B at 1024 px: ~6 min on 2 idle cores
def test_rehearsal_runs_every_stage_at_full_shapes(tmp_path: Path) -> None:
    from pipeline.data.embedding_reader import iter_views
    from pipeline.inference.predictor import Predictor

    work, out = tmp_path / "work", tmp_path / "rehearsal.json"
    project = work / "project"
    try:
        report = run_rehearsal(work, out, keep=True)
        assert json.loads(out.read_text(encoding="utf-8")) == json.loads(json.dumps(report))
        params = load_params(project / "params.yaml")
        assert params.sam.variant == "vit_b" and params.data.source == "hqseg44k"

        # every stage of the pipeline ran exactly once, measured (time and peak RSS)
        expected = {"download", "index", "base", "views", "embed", "prompts", "seeds", "report", "track"}
        expected |= {f"train@{m}" for m in params.train.methods}
        expected |= {f"evaluate@{b}" for b in params.evaluate.benchmarks}
        ran = [s["stage"] for s in report["stages"]]
        assert sorted(ran) == sorted(set(ran)) and set(ran) == set(report["expected_stages"]) == expected
        for s in report["stages"]:
            assert s["rc"] == 0 and s["wall_s"] > 0 and s["cpu_s"] > 0 and s["peak_rss_mib"] > 0, s
        embed = next(s for s in report["stages"] if s["stage"] == "embed")
        assert embed["peak_rss_mib"] > 1000  # a ViT-B at 1024 px really ran (the tiny base needs ~400 MiB)

        # the full profile's shapes: 1024 px input, 256x64x64 embeddings for every view of both splits
        base = json.loads((project / "models/base/base.json").read_text(encoding="utf-8"))
        assert (base["variant"], base["img_size"], base["grid"], base["channels"]) == ("vit_b", 1024, 64, 256)
        cache = json.loads((project / "data/embeddings/CACHE.json").read_text(encoding="utf-8"))
        assert (cache["variant"], cache["channels"], cache["grid"], cache["dtype"]) == ("vit_b", 256, 64, "float16")
        for split in ("train", "eval"):
            rows = list(iter_views(project / "data/embeddings", split))
            assert rows, split
            for row in rows:
                emb = np.asarray(row["embedding"])
                assert emb.shape == (256, 64, 64) and np.isfinite(emb).all() and emb.std() > 0

        # the trained plugin loads on the vit_b base
        pred = Predictor.from_pretrained(project / "models/base", "stable_sam",
                                         plugin=project / "models/plugins/stable_sam.pt", device="cpu")
        assert pred.info["variant"] == "vit_b" and pred.img_size == 1024 and pred.grid == (64, 64)
        assert pred.decoder.num_trainable > 0

        # metrics/eval.json: every benchmark and method, finite numbers
        eval_json = json.loads((project / "metrics/eval.json").read_text(encoding="utf-8"))
        for b in params.evaluate.benchmarks:
            for m in params.evaluate.methods:
                assert _numbers(eval_json[b][m]), (b, m)
        numbers = _numbers(eval_json)
        assert numbers and all(math.isfinite(x) for x in numbers)
        assert (project / "metrics/track.json").is_file() and (project / "metrics/seeds.json").is_file()
        # the logged MLflow model holds the base once, as an artifact, not again inside its pickle
        pickles = list((project / "mlruns").rglob("python_model.pkl"))
        assert pickles and all(p.stat().st_size < 1_000_000 for p in pickles), [p.stat().st_size for p in pickles]
    finally:
        shutil.rmtree(work, ignore_errors=True)  # ~1.5 GB (checkpoint, its DVC cache copy, embeddings)
