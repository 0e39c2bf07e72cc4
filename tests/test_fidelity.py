"""Fidelity study helpers: the variant ladder follows the params' budget unit, the table and plot render."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from pipeline.config import Params, replace
from pipeline.evaluation.fidelity import markdown_table, recovery_plot, variants
from pipeline.evaluation.aggregate import add_recovery

def test_budget_variants_use_steps_or_epochs(test_params: Params):
    p = test_params
    by_steps = {v.name: v for v in variants(replace(p, **{"train.max_steps": 300}))}
    assert by_steps["stable_sam 150 steps"].changes == {"train.max_steps": 150}
    assert by_steps["stable_sam 600 steps"].changes == {"train.max_steps": 600}
    by_epochs = {v.name: v for v in variants(replace(p, **{"train.max_steps": 0, "train.epochs": 8.0}))}
    assert by_epochs["stable_sam 4 epochs"].changes == {"train.epochs": 4.0}
    assert by_epochs["stable_sam 16 epochs"].changes == {"train.epochs": 16.0}
    names = [v.name for v in variants(p)]
    assert names[0] == "sam" and len(names) == len(set(names))
    assert {"pt_sam", "dsp", "stable_sam", "dt_sam"} <= set(names)


def _result() -> dict:
    block = {"sam": {"gt_box": {"miou": 70.0}, "noisy_box": {"miou": 60.0}, "point_1": {"miou": 50.0}},
             "stable_sam": {"gt_box": {"miou": 70.0}, "noisy_box": {"miou": 65.0}, "point_1": {"miou": 55.0}}}
    add_recovery(block, "sam")
    return {"rows": [{"name": name, "hq_mean": block[name], "train_seconds": 3.0,
                      "sanity": {"after": {"train": {"noisy_box": 61.0, "point_1": 52.0}}}} for name in block]}


def test_markdown_table_shows_recovery_and_fit():
    lines = markdown_table(_result())
    assert lines[0].startswith("| variant |") and len(lines) == 4
    row = lines[3].split(" | ")
    assert row[0] == "| stable_sam"
    assert "0.50" in row  # R noisy = (65 - 60) / (70 - 60); R 1 pt = (55 - 50) / (70 - 50) = 0.25
    assert "0.25" in row
    assert "61.0 / 52.0" in row and "–" in row  # train fit present, eval split absent


def test_recovery_plot_writes_a_png(tmp_path):
    png = recovery_plot(_result(), tmp_path / "recovery.png")
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_cli_missing_embeddings_is_one_error_line(tmp_path, capsys, test_params_path):
    from stages.fidelity import main

    code = main(["--params", str(test_params_path), "--embeddings", str(tmp_path / "none"),
                 "--prompts", str(tmp_path / "none"), "--base", str(tmp_path / "none"),
                 "--work", str(tmp_path / "work"), "--out", str(tmp_path / "f.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("fidelity: error:") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "f.json").exists()


def test_dsp_offset_stats_see_identity_and_saturated_samplers(tmp_path, test_params: Params):
    """An untrained DSP moves nothing; one whose offset head is large sits at its tanh bound."""
    import torch

    from pipeline.evaluation.fidelity import dsp_offsets_on
    from pipeline.inference.predictor import Predictor
    from pipeline.modeling.dsp import DeformableSampling
    from tests.fakes import write_tiny_base, write_trained_plugin

    p = test_params
    sam, sha = write_tiny_base(tmp_path / "base", img=64, grid=16)
    write_trained_plugin(tmp_path / "untrained.pt", "stable_sam", sam, p.plugin, sha, scale=0.0)
    pred = Predictor.from_pretrained(tmp_path / "base", method="stable_sam", plugin=tmp_path / "untrained.pt",
                                     device="cpu")
    g = torch.Generator().manual_seed(0)
    views = [(torch.randn(256, 16, 16, generator=g), (48, 64), (48, 64), [5.0, 6.0, 40.0, 30.0]) for _ in range(3)]
    still = dsp_offsets_on(pred, views)
    assert still["views"] == 3 and still["mean_cells"] < 1e-3 and still["global_cells"] < 1e-3
    assert still["bound_share"] == 0.0
    dsp = next(m for m in pred.decoder.modules() if isinstance(m, DeformableSampling))
    with torch.no_grad():
        dsp.offset_net[-1].weight.normal_(0.0, 5.0, generator=g)
    moved = dsp_offsets_on(pred, views)
    assert moved["mean_cells"] > 0.5 * p.plugin.dsp_offset_range and moved["bound_share"] > 0.3
    assert dsp_offsets_on(Predictor.from_pretrained(tmp_path / "base", method="sam", device="cpu"), views) == {}


def test_study_resumes_per_variant(monkeypatch, tmp_path, test_params: Params):
    """A second run reuses finished rows (no retraining) and fills in what older rows lack."""
    import pipeline.evaluation.fidelity as fid

    p = test_params
    trained: list[str] = []

    def fake_variant(params, v, **kw):
        trained.append(v.name)
        return {"name": v.name, "method": v.method, "changes": dict(v.changes), "why": v.why, "train_seconds": 1.0,
                "hq_mean": {"gt_box": {"miou": 70.0}, "noisy_box": {"miou": 60.0 + len(trained)}}, "sanity": {}}

    monkeypatch.setattr(fid, "run_variant", fake_variant)
    monkeypatch.setattr(fid, "drp_gradients", lambda *a, **k: {"drp_grad_norm_step0": 0.0})
    monkeypatch.setattr(fid, "dsp_offset_stats", lambda *a, **k: {"mean_cells": 1.0, "global_cells": 0.5})
    kw = dict(embeddings=tmp_path, prompts=tmp_path, base=tmp_path, work=tmp_path / "work", out=tmp_path / "f.json")
    first = fid.run_study(p, only=["stable_sam"], **kw)
    assert trained == ["sam", "stable_sam"]
    assert first["rows"][1]["hq_mean"]["noisy_box"]["recovery"] == pytest.approx(1 / 9, abs=1e-4)  # (62-61)/(70-61)
    again = fid.run_study(p, only=["stable_sam", "dsp"], **kw)
    assert trained == ["sam", "stable_sam", "dsp"]  # only the new variant trained
    names = [r["name"] for r in again["rows"]]
    assert names == ["sam", "dsp", "stable_sam"]
    reused = next(r for r in again["rows"] if r["name"] == "stable_sam")
    assert reused["dsp_offsets"] == {"mean_cells": 1.0, "global_cells": 0.5}  # filled in on reuse
    assert json.loads((tmp_path / "f.json").read_text())["rows"][2]["name"] == "stable_sam"
