"""Every stage CLI turns a known bad input into one line on stderr and exit code 2 (no traceback).

    .venv/bin/pytest tests/test_stage_cli.py -q
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from pipeline import PROJECT_ROOT
from pipeline.config import load_params


def _params_file(tmp_path: Path, **changes: object) -> Path:
    raw = load_params(PROJECT_ROOT / "params.yaml").to_dict()
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _one_error_line(capsys: pytest.CaptureFixture[str], stage: str, needle: str) -> None:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err and err[-1].startswith(f"{stage}: error:") and needle in err[-1], err
    assert not any(line.startswith("Traceback") for line in err)


def test_base_random_bytes_checkpoint(tmp_path, capsys):
    from stages.base import main

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04 these are not the weights you are looking for" * 10)
    params = _params_file(tmp_path, **{"sam.checkpoint_url": junk.as_uri(),
                                       "sam.checkpoint_sha256": hashlib.sha256(junk.read_bytes()).hexdigest(),
                                       "sam.cache_dir": str(tmp_path / "cache")})
    assert main(["--params", str(params), "--out", str(tmp_path / "base")]) == 2
    _one_error_line(capsys, "base", "not a readable PyTorch checkpoint")


def test_base_wrong_checksum(tmp_path, capsys):
    from stages.base import main

    params = _params_file(tmp_path, **{"sam.checkpoint_sha256": "0" * 64})
    assert main(["--params", str(params), "--out", str(tmp_path / "base")]) == 2
    _one_error_line(capsys, "base", "sha256")


def test_prompts_without_a_cache(tmp_path, capsys):
    from stages.prompts import main

    assert main(["--params", "params.yaml", "--embeddings", str(tmp_path / "none"), "--out", str(tmp_path / "p")]) == 2
    _one_error_line(capsys, "prompts", "CACHE.json")


def test_train_bad_param_and_missing_inputs(tmp_path, capsys):
    from stages.train import main

    args = ["--method", "stable_sam", "--embeddings", str(tmp_path / "none"), "--prompts", str(tmp_path / "p.parquet"),
            "--base", str(tmp_path / "base"), "--out", str(tmp_path / "o"), "--metrics", str(tmp_path / "m"),
            "--plots", str(tmp_path / "pl")]
    bad = _params_file(tmp_path, **{"train.lr": -1.0})
    assert main(["--params", str(bad), *args]) == 2
    _one_error_line(capsys, "train", "train.lr must be > 0")
    assert main(["--params", "params.yaml", *args]) == 2
    _one_error_line(capsys, "train", "base.json")
