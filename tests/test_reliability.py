"""Reliability under bad input, faults and concurrency: byte-deterministic checkpoints, stable quarantine
reasons, all-or-nothing outputs on a full disk or a read-only folder, clear errors for corrupt checkpoints,
strict numbers in params, and flows that wait for DVC's own repo lock. One file (~600 lines) because the
probes share one small dataset tree and its fault helpers; each test reads on its own.

    .venv/bin/pytest -q tests/test_reliability.py
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml

from pipeline.common.atomic import OutputWriteError, atomic_path, atomic_write_torch
from pipeline.common.cli import StageError, run_stage
from pipeline.config import ConfigError, Params, load_params
from pipeline.data import index as index_mod
from pipeline.data.index import build_index, read_index, write_index
from pipeline.flows.commands import stream_command
from pipeline.flows.locking import (
    DVC_LOCK_MESSAGE, LockTimeout, dvc_lock_holder, dvc_lock_path, run_waiting_for_dvc,
)
from pipeline.modeling.backbones import load_base
from pipeline.modeling.plugin_file import read_plugin_file, save_plugin_file
from pipeline.training.checkpointing import CheckpointError, capture_rng, load_checkpoint, save_checkpoint
from pipeline.data.layout import get_set
from tests.fakes import TEST_PARAMS_PATH, image_bytes, load_test_params, png_bytes, put_file, rect_mask, write_tiny_base



def _read_only_folders_are_enforced() -> bool:
    """False for root (or a process with CAP_DAC_OVERRIDE), which writes into read-only folders anyway."""
    if os.geteuid() != 0:
        return True
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ro"
        folder.mkdir(mode=0o555)
        try:
            (folder / "probe").write_bytes(b"")
        except PermissionError:
            return True
        finally:
            folder.chmod(0o755)
    return False


PERMISSIONS_ENFORCED = _read_only_folders_are_enforced()
DIS, COIFT = get_set("DIS5K-TR"), get_set("COIFT")


def _params() -> Params:
    return load_test_params(**{"data.train_sets": ["DIS5K-TR"], "data.eval_sets": ["COIFT"],
                               "data.max_images_per_set": 0, "index.mask_threshold": 128,
                               "index.min_mask_pixels": 16})


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """Two sets (train DIS5K-TR with three good pairs, eval COIFT with one) under ``<tmp>/hqseg44k``."""
    root = tmp_path / "hqseg44k"
    for i in range(3):
        put_file(root, DIS.image_dir, f"good{i}.jpg", image_bytes(seed=i))
        put_file(root, DIS.mask_dir, f"good{i}.png", png_bytes(rect_mask()))
    put_file(root, COIFT.image_dir, "x.jpg", image_bytes(seed=9))
    put_file(root, COIFT.mask_dir, "x.png", png_bytes(rect_mask()))
    return root


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_hashes(folder: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file under ``folder``."""
    return {str(p.relative_to(folder)): sha(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporaries and old copies the atomic writers could leave next to their outputs."""
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith((".tmp", ".old")))


# --- A: byte-deterministic .pt files ---------------------------------------------------------------
def _ckpt_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {"plugin": {"w": torch.randn(3, 4, generator=g)}, "step": 7, "history": [[1, 0.5, 1e-3]],
            "rng": [capture_rng()]}


def test_checkpoint_bytes_do_not_depend_on_the_file_name(tmp_path: Path) -> None:
    """torch.save records the name of the file it writes: saving through a random temporary name made every
    save of the same state a different file (and re-ran every DVC stage downstream)."""
    state = _ckpt_state()
    save_checkpoint(tmp_path / "a.ckpt", state)
    first = sha(tmp_path / "a.ckpt")
    save_checkpoint(tmp_path / "a.ckpt", state)
    save_checkpoint(tmp_path / "other" / "b.ckpt", state)
    assert sha(tmp_path / "a.ckpt") == first == sha(tmp_path / "other" / "b.ckpt")
    assert load_checkpoint(tmp_path / "other" / "b.ckpt")["step"] == 7
    assert leftovers(tmp_path) == []


def test_every_atomic_torch_save_is_deterministic(tmp_path: Path) -> None:
    weights = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(2, dtype=torch.int64)}
    atomic_write_torch(tmp_path / "x.pt", weights)
    atomic_write_torch(tmp_path / "y.pt", weights)
    assert sha(tmp_path / "x.pt") == sha(tmp_path / "y.pt")
    for name in ("p.pt", "q.pt"):
        save_plugin_file(tmp_path / name, method="stable_sam", state_dict=weights, config={"k": 1}, base_sha256="0" * 64)
    assert sha(tmp_path / "p.pt") == sha(tmp_path / "q.pt")


def test_pretrain_base_saves_deterministic_files(tmp_path: Path) -> None:
    from pipeline.training import pretrain_base

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters())
    gen = torch.Generator().manual_seed(0)
    hashes = []
    for name in ("one", "two"):
        out = tmp_path / name / "sam.pt"
        out.parent.mkdir()
        pretrain_base._save(model, opt, gen, 3, [[1, 0.5]], out, out.with_suffix(".train-state.pt"), {"steps": 3})
        hashes.append(sha(out))
    assert hashes[0] == hashes[1]


# --- B: quarantine reasons ---------------------------------------------------------------------------
def test_quarantine_reasons_of_corrupt_files_are_stable(tree: Path) -> None:
    put_file(tree, DIS.image_dir, "junk.jpg", np.random.default_rng(5).bytes(300))
    put_file(tree, DIS.mask_dir, "junk.png", png_bytes(rect_mask()))
    put_file(tree, DIS.image_dir, "badmask.jpg", (tree / DIS.image_dir / "good0.jpg").read_bytes())
    put_file(tree, DIS.mask_dir, "badmask.png", b"\x89PNG\r\n\x1a\n" + np.random.default_rng(6).bytes(200))
    runs = [{q.path: q.reason for q in build_index(tree, _params(), progress=False).quarantine} for _ in range(2)]
    assert runs[0] == runs[1]
    for rel in (f"{DIS.image_dir}/junk.jpg", f"{DIS.mask_dir}/badmask.png"):
        assert "not decodable" in runs[0][rel] and "0x" not in runs[0][rel], runs[0][rel]


# --- C: all-or-nothing outputs ------------------------------------------------------------------------
@pytest.fixture()
def indexed(tree: Path, tmp_path: Path) -> dict[str, Any]:
    """A first successful index run: its outputs and their hashes."""
    result = build_index(tree, _params(), progress=False)
    out, metrics = tmp_path / "out" / "index", tmp_path / "metrics" / "index.json"
    write_index(result, out, metrics)
    return {"result": result, "out": out, "metrics": metrics, "before": folder_hashes(out), "m": sha(metrics)}


def _assert_unchanged(ix: dict[str, Any]) -> None:
    assert folder_hashes(ix["out"]) == ix["before"] and sha(ix["metrics"]) == ix["m"]
    assert leftovers(ix["out"].parent) == [] and leftovers(ix["metrics"].parent) == []


def _changed_result(ix: dict[str, Any]) -> index_mod.IndexResult:
    """The first run's result minus one row: its outputs differ from the first run's."""
    r = ix["result"]
    return index_mod.IndexResult(r.rows[1:], r.quarantine, r.sets, r.index_cfg)


def _second_run_succeeds(ix: dict[str, Any]) -> None:
    new = _changed_result(ix)
    write_index(new, ix["out"], ix["metrics"])
    assert len(read_index(ix["out"])) == len(new.rows) and folder_hashes(ix["out"]) != ix["before"]
    assert leftovers(ix["out"].parent) == [] and leftovers(ix["metrics"].parent) == []


@pytest.mark.skipif(not PERMISSIONS_ENFORCED, reason="root writes into read-only folders; see the simulated variants")
def test_read_only_output_folder_keeps_the_previous_index(indexed: dict[str, Any]) -> None:
    out = indexed["out"]
    out.chmod(0o555)
    try:
        with pytest.raises(OutputWriteError, match="writable") as err:
            write_index(_changed_result(indexed), out, indexed["metrics"])
        assert str(out) in str(err.value)
        _assert_unchanged(indexed)
    finally:
        out.chmod(0o755)
    _second_run_succeeds(indexed)


@pytest.mark.skipif(not PERMISSIONS_ENFORCED, reason="root writes into read-only folders; see the simulated variants")
def test_read_only_parent_folder_is_a_clear_error(indexed: dict[str, Any]) -> None:
    parent = indexed["out"].parent
    parent.chmod(0o555)
    try:
        with pytest.raises(OutputWriteError, match="writable") as err:
            write_index(_changed_result(indexed), indexed["out"], indexed["metrics"])
        assert str(indexed["out"]) in str(err.value)
        _assert_unchanged(indexed)
    finally:
        parent.chmod(0o755)
    _second_run_succeeds(indexed)


def test_undeletable_previous_index_is_refused_before_the_swap(indexed: dict[str, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only output folder could be renamed away but its files not deleted: the swap used to happen and
    then fail, leaving `.index.old`, no metrics, and every later run failing on the left-over copy."""
    out = indexed["out"]
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == out else real_access(p, mode, **kw))
    with pytest.raises(OutputWriteError, match="writable") as err:
        write_index(_changed_result(indexed), out, indexed["metrics"])
    assert str(out) in str(err.value)
    _assert_unchanged(indexed)
    monkeypatch.undo()
    _second_run_succeeds(indexed)


@pytest.mark.parametrize("fail_on", ["folder", "metrics"])
def test_refused_rename_keeps_every_previous_output(indexed: dict[str, Any], monkeypatch: pytest.MonkeyPatch,
                                                    fail_on: str) -> None:
    """A rename refused with EACCES (read-only folder, simulated so that it also works as root)."""
    target = indexed["out"] if fail_on == "folder" else indexed["metrics"]
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst) == target and str(src).endswith(".tmp"):  # the new output may not come in
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OutputWriteError, match="make .* writable") as err:
        write_index(_changed_result(indexed), indexed["out"], indexed["metrics"])
    assert str(target) in str(err.value) and err.value.errno == errno.EACCES
    if fail_on == "folder":  # the metrics are renamed after the folder: all unchanged
        _assert_unchanged(indexed)
    else:  # the folder was already swapped; the metrics' temporary is gone and nothing is left behind
        assert sha(indexed["metrics"]) == indexed["m"]
        assert leftovers(indexed["out"].parent) == [] and leftovers(indexed["metrics"].parent) == []
    monkeypatch.undo()
    _second_run_succeeds(indexed)


def test_disk_full_names_the_output_and_keeps_the_previous_one(indexed: dict[str, Any],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = index_mod.pq.write_table

    def full_disk(table: Any, where: Any, **kw: Any) -> None:
        Path(where).write_bytes(b"PAR1 half")  # a partial file, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_mod.pq, "write_table", full_disk)
    with pytest.raises(OutputWriteError, match="free disk space") as err:
        write_index(_changed_result(indexed), indexed["out"], indexed["metrics"])
    assert str(indexed["out"]) in str(err.value) and err.value.errno == errno.ENOSPC
    assert "the previous output, if any, is unchanged" in str(err.value)
    _assert_unchanged(indexed)
    monkeypatch.setattr(index_mod.pq, "write_table", real_write)
    _second_run_succeeds(indexed)


def test_stage_contract_treats_write_faults_as_known_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """An OutputWriteError is an OSError: a stage prints one line (exit 2) instead of a traceback."""
    def fill(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    def work() -> None:
        with atomic_path(tmp_path / "x.json") as tmp:
            fill(tmp)

    assert run_stage("demo", work) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path / "x.json") in err and "free disk space" in err
    assert leftovers(tmp_path) == []


def test_input_errors_inside_an_atomic_block_are_not_reworded(tmp_path: Path) -> None:
    """A missing input read while writing an output stays a FileNotFoundError about that input."""
    with pytest.raises(FileNotFoundError) as err:
        with atomic_path(tmp_path / "out.bin") as tmp:
            tmp.write_bytes((tmp_path / "missing-input").read_bytes())
    assert not isinstance(err.value, OutputWriteError)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out.bin").exists()


def test_a_stale_old_copy_does_not_block_the_next_write(indexed: dict[str, Any]) -> None:
    stale = indexed["out"].with_name(f".{indexed['out'].name}.old")
    stale.mkdir()
    (stale / "index.parquet").write_bytes(b"stale")
    _second_run_succeeds(indexed)
    assert not stale.exists()


def test_index_journal_that_cannot_be_written_does_not_stop_the_stage(tree: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    journal = tmp_path / "journal.jsonl"
    real_open = open

    def no_journal(file: Any, *args: Any, **kw: Any) -> Any:
        if Path(str(file)) == journal and args and "a" in args[0]:
            raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, *args, **kw)

    monkeypatch.setattr("builtins.open", no_journal)
    result = build_index(tree, _params(), journal=journal, progress=False)
    assert len(result.rows) == len(build_index(tree, _params(), progress=False).rows) > 0


# --- D: corrupt checkpoints -------------------------------------------------------------------------
def _random_file(path: Path, n: int = 4096) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(7).bytes(n))
    return path


def test_random_bytes_resume_checkpoint_is_a_known_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = _random_file(tmp_path / "stable_sam.ckpt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(bad)
    assert isinstance(err.value, StageError)
    assert run_stage("train", lambda: load_checkpoint(bad)) == 2  # one line, no traceback
    line = capsys.readouterr().err.strip()
    assert str(bad) in line and "delete it" in line and "weights_only" not in line and "\n" not in line


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04" + b"\0" * 64, None])
def test_corrupt_plugin_and_base_files_name_the_file_and_the_fix(tmp_path: Path, content: bytes | None) -> None:
    plugin = tmp_path / "plugins" / "stable_sam.pt"
    if content is None:
        _random_file(plugin)
    else:
        plugin.parent.mkdir(parents=True)
        plugin.write_bytes(content)
    with pytest.raises(ValueError) as err:
        read_plugin_file(plugin, "stable_sam")
    assert str(plugin) in str(err.value) and "re-run training" in str(err.value)
    assert "weights_only" not in str(err.value)

    base = tmp_path / "base"
    write_tiny_base(base)
    (base / "sam.pt").write_bytes(plugin.read_bytes())
    info = json.loads((base / "base.json").read_text())
    info["checkpoint_sha256"] = sha(base / "sam.pt")  # the sha matches: only loading can tell
    (base / "base.json").write_text(json.dumps(info))
    with pytest.raises(ValueError) as err:
        load_base(base)
    assert str(base / "sam.pt") in str(err.value) and "dvc repro base" in str(err.value)
    assert "weights_only" not in str(err.value)


def test_corrupt_base_description_names_the_file(tmp_path: Path) -> None:
    write_tiny_base(tmp_path)
    _random_file(tmp_path / "base.json", 64)
    with pytest.raises(ValueError, match="base.json: not a base description.*dvc repro base"):
        load_base(tmp_path)


# --- E: numbers and names in params ------------------------------------------------------------------
def _write_params(tmp_path: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    raw = yaml.safe_load(TEST_PARAMS_PATH.read_text())
    edit(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize("section,key,value", [
    ("train", "lr", float("nan")), ("train", "epochs", float("inf")), ("train", "beta1", float("-inf")),
    ("views", "scale_max", float("nan")), ("download", "timeout_s", float("inf")),
    ("evaluate", "boundary_dilation_ratio", float("nan")),
])
def test_non_finite_numbers_are_rejected_naming_the_key(tmp_path: Path, section: str, key: str, value: float) -> None:
    path = _write_params(tmp_path, lambda raw: raw[section].__setitem__(key, value))
    assert (".nan" if value != value else ".inf") in path.read_text()  # written as YAML's own spelling
    with pytest.raises(ConfigError, match=rf"{section}\.{key}: expected a finite number"):
        load_params(path)


def test_non_finite_number_inside_a_mapping_is_rejected(tmp_path: Path) -> None:
    path = _write_params(tmp_path, lambda raw: raw["prompts"]["train_type_probs"].__setitem__("gt_box", float("nan")))
    with pytest.raises(ConfigError, match=r"prompts\.train_type_probs\.gt_box: expected a finite number"):
        load_params(path)


@pytest.mark.parametrize("key", ["ours", "baseline"])
def test_report_methods_must_be_evaluated_methods(tmp_path: Path, key: str) -> None:
    path = _write_params(tmp_path, lambda raw: raw["report"].__setitem__(key, "stabel_sam"))
    with pytest.raises(ConfigError) as err:
        load_params(path)
    methods = load_test_params().evaluate.methods
    assert f"report.{key}" in str(err.value) and "'stabel_sam'" in str(err.value)
    assert all(m in str(err.value) for m in methods)


# --- F: waiting for DVC's own lock -------------------------------------------------------------------
FAKE_DVC = textwrap.dedent("""
    import pathlib, sys
    counter = pathlib.Path(sys.argv[1])
    n = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(n + 1))
    if n < int(sys.argv[2]):
        print("ERROR: Unable to acquire lock. Most likely another DVC process is running or was "
              "terminated abruptly.", flush=True)
        sys.exit(1)
    print("stage done", flush=True)
""")


def _fake_dvc(tmp_path: Path, lock_failures: int) -> Callable[[Callable[[str], None]], int]:
    counter = tmp_path / "attempts"
    cmd = [sys.executable, "-c", FAKE_DVC, str(counter), str(lock_failures)]
    return lambda on_line: stream_command(cmd, tmp_path, on_line)


def test_dvc_lock_failure_is_retried_until_dvc_runs(tmp_path: Path) -> None:
    lines: list[str] = []
    rc = run_waiting_for_dvc(_fake_dvc(tmp_path, 3), tmp_path, lines.append, timeout_s=30, poll_s=0.05)
    assert rc == 0 and (tmp_path / "attempts").read_text() == "4"
    assert lines[-1] == "stage done" and sum(DVC_LOCK_MESSAGE in line for line in lines) == 3
    assert sum("retrying" in line for line in lines) == 1  # one clear log line, not one per attempt


def test_dvc_lock_wait_is_bounded(tmp_path: Path) -> None:
    t0 = time.monotonic()
    with pytest.raises(LockTimeout, match=r"\.dvc/tmp/lock: DVC's repo lock still held after 0\.3 s"):
        run_waiting_for_dvc(_fake_dvc(tmp_path, 10**6), tmp_path, lambda _: None, timeout_s=0.3, poll_s=0.05)
    assert time.monotonic() - t0 < 10


def test_other_failures_are_not_retried(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "import sys; print('stage broke'); sys.exit(3)"]
    calls: list[int] = []

    def run(on_line: Callable[[str], None]) -> int:
        calls.append(1)
        return stream_command(cmd, tmp_path, on_line)

    assert run_waiting_for_dvc(run, tmp_path, lambda _: None, timeout_s=30, poll_s=0.05) == 3 and len(calls) == 1


def test_a_held_dvc_lock_is_waited_for_before_running(tmp_path: Path) -> None:
    """DVC 3 locks `.dvc/tmp/lock` with zc.lockfile (an flock): hold it as a running `dvc repro` does."""
    zc_lockfile = pytest.importorskip("zc.lockfile")
    dvc_lock_path(tmp_path).parent.mkdir(parents=True)
    held = zc_lockfile.LockFile(str(dvc_lock_path(tmp_path)))
    assert dvc_lock_holder(tmp_path) == f"pid {os.getpid()}"
    threading.Timer(0.6, held.close).start()
    # The command takes DVC's lock itself, as dvc does: it would fail if it ran while the lock is held.
    take = ("import sys, zc.lockfile\ntry:\n    zc.lockfile.LockFile('.dvc/tmp/lock').close()\n"
            f"except zc.lockfile.LockError:\n    print({DVC_LOCK_MESSAGE!r}); sys.exit(1)\nprint('ran')")
    lines: list[str] = []
    t0 = time.monotonic()
    rc = run_waiting_for_dvc(lambda on: stream_command([sys.executable, "-c", take], tmp_path, on), tmp_path,
                             lines.append, timeout_s=30, poll_s=0.05)
    assert rc == 0 and lines[-1] == "ran" and time.monotonic() - t0 >= 0.5
    assert any("held by another dvc process" in line and f"pid {os.getpid()}" in line for line in lines)
    assert dvc_lock_holder(tmp_path) is None



def test_flow_stage_task_waits_for_dvc_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flows' stage task goes through the wait: a dvc that meets DVC's lock twice still completes."""
    from types import SimpleNamespace

    from pipeline.flows import dvc_flows

    lines: list[str] = []
    logger = SimpleNamespace(info=lambda msg, *args: lines.append(msg % args if args else msg))
    monkeypatch.setattr(dvc_flows, "get_run_logger", lambda: logger)
    cmd = [sys.executable, "-c", FAKE_DVC, str(tmp_path / "attempts"), "2"]
    assert dvc_flows.run_stage.fn("train", cmd, str(tmp_path), 30.0) == "train"
    assert (tmp_path / "attempts").read_text() == "3" and lines[-1] == "stage done"
    assert sum("retrying" in line for line in lines) == 1
    never = [sys.executable, "-c", FAKE_DVC, str(tmp_path / "attempts2"), "1000000"]
    with pytest.raises(LockTimeout, match="DVC's repo lock"):
        dvc_flows.run_stage.fn("train", never, str(tmp_path), 0.2)

# --- G: the same inputs give the same outputs, stage by stage ---------------------------------------
TIMING_KEYS = {"seconds", "samples_per_s", "elapsed_s", "wall_s", "started", "finished", "duration_s"}


def _canonical_json(path: Path) -> bytes:
    """A JSON output without its wall-clock fields (which legitimately differ between runs)."""
    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k not in TIMING_KEYS}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj
    return json.dumps(strip(json.loads(path.read_text())), sort_keys=True).encode()


def output_digest(*paths: Path) -> dict[str, str]:
    """sha256 of every file under ``paths`` (JSON files without timing fields), keyed by name."""
    out = {}
    for root in paths:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            data = _canonical_json(p) if p.suffix == ".json" else p.read_bytes()
            out[f"{root.name}/{p.relative_to(root) if p != root else ''}"] = hashlib.sha256(data).hexdigest()
    return out


def test_index_views_and_prompts_are_deterministic(tree: Path, tmp_path: Path) -> None:
    from pipeline.data.views import run_views
    from pipeline.prompts.stage import make_prompts
    from tests.fakes import small_index, write_fake_cache

    digests = []
    for run in ("a", "b"):
        d = tmp_path / run
        write_index(build_index(tree, _params(), progress=False), d / "index", d / "index.json")
        digests.append(output_digest(d / "index", d / "index.json"))
    assert digests[0] == digests[1] and len(digests[0]) == 3

    root = tmp_path / "data"
    index_mod.pq.write_table(small_index(root, n_train=3, n_eval=1), tmp_path / "index.parquet")
    params = load_test_params(**{"views.jitter_views": 1, "views.occlusion_p": 1.0})
    digests = []
    for run in ("a", "b"):
        run_views(params, tmp_path / "index.parquet", root, tmp_path / run / "views", workers=1, progress=False)
        digests.append(output_digest(tmp_path / run / "views"))
    assert digests[0] == digests[1] and any(k.endswith("views.parquet") for k in digests[0])

    write_fake_cache(tmp_path / "emb", "0" * 64, img=64, grid=8, n_train=6, n_eval=2)
    digests = []
    for run in ("a", "b"):
        make_prompts(load_test_params(), tmp_path / "emb", tmp_path / run / "prompts")
        digests.append(output_digest(tmp_path / run / "prompts"))
    assert digests[0] == digests[1] and any(k.endswith("train.parquet") for k in digests[0])


@pytest.mark.slow
def test_train_and_evaluate_are_deterministic(tmp_path: Path) -> None:
    """Two trainings (a few steps on a tiny fake cache) give byte-identical plugin files, loss curves and
    metrics; two evaluations of that plugin give identical scores and prediction tables."""
    from pipeline.evaluation.evaluate import evaluate_benchmark
    from pipeline.prompts.stage import make_prompts
    from pipeline.training.train import train
    from tests.fakes import write_fake_cache

    _, base_sha = write_tiny_base(tmp_path / "base", img=64, grid=8)
    write_fake_cache(tmp_path / "emb", base_sha, img=64, grid=8, n_train=8, n_eval=2)
    params = load_test_params(**{
        "train.batch_size": 4, "train.max_steps": 3, "train.loss_points": 64, "train.checkpoint_every": 2,
        "train.device": "cpu", "train.shuffle_buffer": 4, "train.sanity_views": 1,
        "evaluate.device": "cpu", "prompts.eval_draws": 1,
    })
    make_prompts(params, tmp_path / "emb", tmp_path / "prompts")
    digests = []
    for run in ("a", "b"):
        d = tmp_path / run
        train(params, "stable_sam", embeddings=tmp_path / "emb", prompts=tmp_path / "prompts" / "train.parquet",
              base=tmp_path / "base", out=d / "plugins", metrics=d / "metrics", plots=d / "plots",
              checkpoints=d / "resume")  # resume state (wall-clock seconds, RNG) is not an output
        digests.append(output_digest(d / "plugins", d / "metrics", d / "plots"))
    a, b = digests
    assert a == b and any(k.endswith("stable_sam.pt") for k in a)

    digests = []
    for run in ("a", "b"):
        d = tmp_path / run
        evaluate_benchmark(params, "COIFT", "stable_sam", embeddings=tmp_path / "emb",
                           prompts=tmp_path / "prompts" / "eval.parquet", base=tmp_path / "base",
                           plugins=tmp_path / "a" / "plugins", out=d / "eval", predictions=d / "pred", progress=False)
        digests.append(output_digest(d / "eval", d / "pred"))
    assert digests[0] == digests[1] and len(digests[0]) >= 2


def test_temporaries_of_a_killed_writer_are_swept_by_the_next_write(tmp_path: Path) -> None:
    (tmp_path / ".w.pt.k1ll3d_0.tmp").write_bytes(b"half")  # a writer killed before its rename
    (tmp_path / ".w.pt.ab12cd34.tmp").mkdir()
    (tmp_path / ".w.pt.json.ab12cd34.tmp").write_bytes(b"another output's temporary")
    (tmp_path / ".other.pt.ab12cd34.tmp").write_bytes(b"not ours")
    atomic_write_torch(tmp_path / "w.pt", {"a": torch.zeros(1)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.pt.ab12cd34.tmp", ".w.pt.json.ab12cd34.tmp", "w.pt"]


def test_index_stage_full_disk_is_one_line_and_the_rerun_succeeds(tree: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The stage CLI: a full disk while writing is one error line (exit 2) naming the output and the fix, the
    previous index stays, nothing is left behind but the resume journal, which the next (successful) run
    uses and removes."""
    from stages.index import main
    from tests.fakes import write_test_params

    params = write_test_params(tmp_path / "params.yaml", _params())
    out, metrics = tmp_path / "data" / "index", tmp_path / "metrics" / "index.json"
    argv = ["--params", str(params), "--root", str(tree), "--out", str(out), "--metrics", str(metrics), "--quiet"]
    assert main(argv) == 0
    before = folder_hashes(out), sha(metrics)
    put_file(tree, DIS.image_dir, "new.jpg", image_bytes(seed=4))
    put_file(tree, DIS.mask_dir, "new.png", png_bytes(rect_mask()))
    capsys.readouterr()

    def full_disk(table: Any, where: Any, **kw: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(index_mod.pq, "write_table", full_disk)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "free disk space" in err[0], err
    assert (folder_hashes(out), sha(metrics)) == before
    assert leftovers(out.parent) == [] and leftovers(metrics.parent) == []
    monkeypatch.undo()
    assert main(argv) == 0
    assert len(read_index(out)) == 5 and not index_mod.default_journal(out).exists()
    assert leftovers(out.parent) == [] and leftovers(metrics.parent) == []
