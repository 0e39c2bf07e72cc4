"""The stage contract (docs/ARCHITECTURE.md "Stage contract"), checked for every stage CLI.

Each ``stages/<name>.py`` main() hands its work to ``run_stage`` and the work is one ``run_<name>`` call;
a known bad input (a bad param, a missing or corrupt input file, a failed download) is exactly one
``<name>: error: ...`` line on stderr, exit code 2, and no output written. Every test here is fast: the
bad input is found before any model or dataset work starts.

    .venv/bin/pytest tests/test_stage_cli.py -q
"""
from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import pytest
import yaml

from pipeline import PROJECT_ROOT
from pipeline.config import load_params
from tests.fakes import TEST_PARAMS_PATH

STAGES_DIR = PROJECT_ROOT / "stages"
PARAMS = str(TEST_PARAMS_PATH)  # a valid params file (the test profile, not the user's params.yaml)
CLI_STAGES = sorted(p.stem for p in STAGES_DIR.glob("*.py") if p.stem != "__init__")


def _params_file(tmp_path: Path, **changes: object) -> Path:
    """The test profile with dotted ``changes`` applied (a new dotted key adds an unknown key)."""
    raw = load_params(TEST_PARAMS_PATH).to_dict()
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node[key]
        node[leaf] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _unknown_key(tmp_path: Path, section: str) -> Path:
    """A params file whose ``section`` has a key the config does not know (a typo a user could make)."""
    return _params_file(tmp_path, **{f"{section}.no_such_key": 1})


def _one_error_line(capsys: pytest.CaptureFixture[str], stage: str, needle: str) -> None:
    """stderr holds exactly one non-empty line: ``<stage>: error: ...`` containing ``needle``."""
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    assert err[0].startswith(f"{stage}: error:") and needle in err[0], err


def _nothing_written(*paths: Path) -> None:
    written = [str(p) for p in paths if p.exists()]
    assert not written, f"partial output after a known error: {written}"


# ---------------------------------------------------------------- the contract, read from the source
def _main_calls(tree: ast.Module) -> tuple[bool, set[str]]:
    """(main() calls run_stage, names of the ``run_*`` functions called anywhere in the module)."""
    main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
    calls_run_stage = main is not None and any(
        isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "run_stage" for n in ast.walk(main))
    runs = {n.func.id for n in ast.walk(tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id.startswith("run_")}
    return calls_run_stage, runs


def test_every_stage_main_uses_run_stage_and_its_run_function():
    assert CLI_STAGES, f"no stage CLIs found under {STAGES_DIR}"
    broken = []
    for name in CLI_STAGES:
        tree = ast.parse((STAGES_DIR / f"{name}.py").read_text(), filename=f"stages/{name}.py")
        calls_run_stage, runs = _main_calls(tree)
        if not calls_run_stage:
            broken.append(f"stages/{name}.py: main() does not call run_stage({name!r}, ...)")
        if f"run_{name}" not in runs:
            broken.append(f"stages/{name}.py: does not call run_{name}() (calls {sorted(runs - {'run_stage'})})")
    assert not broken, "\n".join(broken)


def test_the_contract_check_catches_a_hand_rolled_stage():
    """The source check above must fail on a stage that prints its own error and calls a library helper."""
    src = ("def main(argv=None):\n    try:\n        build_index(x)\n    except ValueError as exc:\n"
           "        print(exc)\n        return 2\n    return 0\n")
    calls_run_stage, runs = _main_calls(ast.parse(src))
    assert not calls_run_stage and "run_index" not in runs


# --------------------------------------------------------------------------------- one test a stage
def test_download_failed_download(tmp_path, capsys):
    from stages.download import main

    mirror = tmp_path / "mirror"  # an empty mirror: the first archive cannot be fetched
    mirror.mkdir()
    params = _params_file(tmp_path, **{"data.source": "hqseg44k", "download.endpoint": mirror.as_uri(),
                                       "download.cache_dir": str(tmp_path / "cache")})
    out = tmp_path / "hq"
    assert main(["--params", str(params), "--out", str(out)]) == 2
    _one_error_line(capsys, "download", ".zip")
    _nothing_written(out)


def test_index_missing_dataset_root(tmp_path, capsys):
    from stages.index import main

    out, metrics = tmp_path / "index", tmp_path / "index.json"
    assert main(["--params", PARAMS, "--root", str(tmp_path / "missing"), "--out", str(out),
                 "--metrics", str(metrics), "--quiet"]) == 2
    _one_error_line(capsys, "index", "stages.download")
    _nothing_written(out, metrics)


def test_base_random_bytes_checkpoint(tmp_path, capsys):
    from stages.base import main

    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x80\x04 these are not the weights you are looking for" * 10)
    params = _params_file(tmp_path, **{"sam.checkpoint_url": junk.as_uri(),
                                       "sam.checkpoint_sha256": hashlib.sha256(junk.read_bytes()).hexdigest(),
                                       "sam.cache_dir": str(tmp_path / "cache")})
    assert main(["--params", str(params), "--out", str(tmp_path / "base")]) == 2
    _one_error_line(capsys, "base", "not a readable PyTorch checkpoint")
    _nothing_written(tmp_path / "base")


def test_base_wrong_checksum(tmp_path, capsys):
    from stages.base import main

    params = _params_file(tmp_path, **{"sam.checkpoint_sha256": "0" * 64})
    assert main(["--params", str(params), "--out", str(tmp_path / "base")]) == 2
    _one_error_line(capsys, "base", "sha256")
    _nothing_written(tmp_path / "base")


def test_views_missing_index(tmp_path, capsys):
    from stages.views import main

    out, metrics = tmp_path / "views", tmp_path / "views.json"
    assert main(["--params", PARAMS, "--index", str(tmp_path / "index.parquet"), "--root", str(tmp_path),
                 "--out", str(out), "--metrics", str(metrics), "--workers", "1", "--quiet"]) == 2
    _one_error_line(capsys, "views", "index.parquet")
    _nothing_written(out, metrics)


def test_embed_missing_base(tmp_path, capsys):
    from stages.embed import main

    out = tmp_path / "emb"
    assert main(["--params", PARAMS, "--views", str(tmp_path / "views.parquet"), "--root", str(tmp_path),
                 "--base", str(tmp_path / "nobase"), "--out", str(out), "--quiet"]) == 2
    _one_error_line(capsys, "embed", "base.json")
    _nothing_written(out)


def test_prompts_without_a_cache(tmp_path, capsys):
    from stages.prompts import main

    out = tmp_path / "p"
    assert main(["--params", PARAMS, "--embeddings", str(tmp_path / "none"), "--out", str(out)]) == 2
    _one_error_line(capsys, "prompts", "CACHE.json")
    _nothing_written(out)


def test_train_bad_param_and_missing_inputs(tmp_path, capsys):
    from stages.train import main

    outs = [tmp_path / "o", tmp_path / "m", tmp_path / "pl"]
    args = ["--method", "stable_sam", "--embeddings", str(tmp_path / "none"), "--prompts", str(tmp_path / "p.parquet"),
            "--base", str(tmp_path / "base"), "--out", str(outs[0]), "--metrics", str(outs[1]), "--plots", str(outs[2])]
    bad = _params_file(tmp_path, **{"train.lr": -1.0})
    assert main(["--params", str(bad), *args]) == 2
    _one_error_line(capsys, "train", "train.lr must be > 0")
    assert main(["--params", PARAMS, *args]) == 2
    _one_error_line(capsys, "train", "base.json")
    _nothing_written(*outs)


def test_evaluate_missing_inputs(tmp_path, capsys):
    """Against the evaluate CLI's arguments as they are (``--out``/``--predictions`` folders)."""
    from stages.evaluate import main

    out, predictions = tmp_path / "eval", tmp_path / "pred"
    code = main(["--params", PARAMS, "--benchmark", "COIFT", "--method", "stable_sam",
                 "--embeddings", str(tmp_path / "none"), "--prompts", str(tmp_path / "eval.parquet"),
                 "--base", str(tmp_path / "nobase"), "--plugins", str(tmp_path / "plugins"),
                 "--out", str(out), "--predictions", str(predictions), "--quiet"])
    assert code == 2
    _one_error_line(capsys, "evaluate", str(tmp_path))
    _nothing_written(out / "COIFT" / "stable_sam.json", predictions / "COIFT" / "stable_sam.parquet")


def test_seeds_without_evaluate_results(tmp_path, capsys):
    from stages.seeds import main

    out, work = tmp_path / "seeds.json", tmp_path / "work"
    assert main(["--params", PARAMS, "--embeddings", str(tmp_path), "--prompts", str(tmp_path),
                 "--base", str(tmp_path), "--eval-dir", str(tmp_path / "eval"), "--work", str(work),
                 "--out", str(out)]) == 2
    _one_error_line(capsys, "seeds", str(tmp_path / "eval"))
    _nothing_written(out, work)


def test_report_without_evaluate_results(tmp_path, capsys):
    from stages.report import main

    outs = [tmp_path / "m" / "eval.json", tmp_path / "m" / "headline.json", tmp_path / "pl", tmp_path / "s.md"]
    assert main(["--params", PARAMS, "--eval-dir", str(tmp_path / "none"), "--metrics", str(outs[0]),
                 "--plots", str(outs[2]), "--report", str(outs[3])]) == 2
    _one_error_line(capsys, "report", str(tmp_path / "none"))
    _nothing_written(*outs)


def test_track_unknown_param(tmp_path, capsys):
    from stages.track import main

    out = tmp_path / "track.json"
    assert main(["--params", str(_unknown_key(tmp_path, "tracking")), "--out", str(out)]) == 2
    _one_error_line(capsys, "track", "tracking.no_such_key")
    _nothing_written(out)


def test_compare_unknown_param(tmp_path, capsys):
    from stages.compare import main

    out = tmp_path / "compare"
    assert main(["--params", str(_unknown_key(tmp_path, "tracking")), "--out", str(out)]) == 2
    _one_error_line(capsys, "compare", "tracking.no_such_key")
    _nothing_written(out)


def test_predict_corrupt_prompts_file(tmp_path, capsys):
    from stages.predict import main

    prompts = tmp_path / "prompts.json"
    prompts.write_text('[{"image": "a.png", "box": [1, 2, 3')  # cut off mid-file
    out = tmp_path / "masks"
    assert main(["--images", str(tmp_path), "--prompts", str(prompts), "--out-dir", str(out), "--method", "sam",
                 "--base", str(tmp_path / "nobase"), "--device", "cpu"]) == 2
    _one_error_line(capsys, "predict", "prompts.json: not valid JSON")
    _nothing_written(out)


def test_export_onnx_missing_base(tmp_path, capsys):
    from stages.export_onnx import main

    out = tmp_path / "onnx" / "sam.onnx"
    assert main(["--method", "sam", "--base", str(tmp_path / "nobase"), "--out", str(out)]) == 2
    _one_error_line(capsys, "export_onnx", "base.json")
    _nothing_written(out.parent)


def test_fidelity_unknown_param(tmp_path, capsys):
    from stages.fidelity import main

    outs = [tmp_path / "f.json", tmp_path / "work", tmp_path / "recovery.png"]
    assert main(["--params", str(_unknown_key(tmp_path, "train")), "--embeddings", str(tmp_path),
                 "--prompts", str(tmp_path), "--base", str(tmp_path), "--work", str(outs[1]),
                 "--out", str(outs[0]), "--plot", str(outs[2])]) == 2
    _one_error_line(capsys, "fidelity", "train.no_such_key")
    _nothing_written(*outs)


def test_pretrain_base_unknown_param(tmp_path, capsys):
    from stages.pretrain_base import main

    out = tmp_path / "tiny_sam.pt"
    assert main(["--params", str(_unknown_key(tmp_path, "base_pretrain")), "--out", str(out), "--steps", "1"]) == 2
    _one_error_line(capsys, "pretrain_base", "base_pretrain.no_such_key")
    _nothing_written(out)


def test_every_stage_has_a_bad_input_test():
    """A new stage CLI needs its test here (named ``test_<stage>_...``)."""
    tested = {name for name in CLI_STAGES if any(n.startswith(f"test_{name}_") for n in globals())}
    assert tested == set(CLI_STAGES), f"stages without a bad-input test: {sorted(set(CLI_STAGES) - tested)}"
