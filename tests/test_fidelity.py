"""Fidelity study helpers: the variant ladder follows the params' budget unit, the table and plot render."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from pipeline.config import load_params, replace
from pipeline.evaluation.fidelity import markdown_table, recovery_plot, variants
from pipeline.evaluation.report import add_recovery

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def test_budget_variants_use_steps_or_epochs():
    p = load_params(PROJECT_ROOT / "params.yaml")
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


def test_cli_missing_embeddings_is_one_error_line(tmp_path, capsys):
    from stages.fidelity import main

    code = main(["--params", str(PROJECT_ROOT / "params.yaml"), "--embeddings", str(tmp_path / "none"),
                 "--prompts", str(tmp_path / "none"), "--base", str(tmp_path / "none"),
                 "--work", str(tmp_path / "work"), "--out", str(tmp_path / "f.json")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("fidelity: error:") and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "f.json").exists()
