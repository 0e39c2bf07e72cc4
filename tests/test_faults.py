"""Fault injection: kill -9 mid-embed and mid-train then resume, hostile archives and HTTP servers, corrupt
checkpoints, special files in a dataset, full disks, read-only outputs, DVC's lock held by a plain `dvc`.

Every probe runs under a hard timeout (a hang is a failure) and records its outcome; the last test prints
a table (probes tried, survived, crashes, hangs, valid samples lost, stale outputs) and requires every
count but the first two to be 0. One file (~500 lines): the table needs every probe in one module.

    .venv/bin/pytest -q -m slow tests/test_faults.py
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from pipeline.common.archive import UnsafeArchiveError, safe_extract_zip
from pipeline.common.atomic import OutputWriteError
from pipeline.common.cli import KNOWN_ERRORS, StageError
from pipeline.common.http import DownloadError, download_file
from pipeline.config import ConfigError, load_params
from pipeline.data import index as index_mod
from pipeline.data.embed import EXIT_AFTER_SHARDS_ENV, embed_views
from pipeline.data.embedding_format import read_cache_meta
from pipeline.data.index import build_index, write_index
from pipeline.data.layout import get_set
from pipeline.data.views import build_views
from pipeline.flows.commands import stream_command
from pipeline.flows.locking import dvc_lock_path, run_waiting_for_dvc
from pipeline.modeling.backbones import load_base
from pipeline.modeling.plugin_file import read_plugin_file
from pipeline.training.checkpointing import load_checkpoint
from tests.fakes import (
    TEST_PARAMS_PATH, load_test_params, small_index, views_cfg, write_fake_cache, write_tiny_base,
)

pytestmark = pytest.mark.slow

PROJECT = Path(__file__).resolve().parent.parent
IMG, GRID = 64, 8


# --- the probe harness -------------------------------------------------------------------------------
class ProbeHang(Exception):
    """A probe ran past its timeout."""


@dataclass
class Outcome:
    name: str
    status: str = "survived"  # survived | crash | hang
    lost: int = 0  # valid samples that a fault made disappear
    stale: int = 0  # outputs left behind stale or half-written (temporaries, old copies, wrong content)
    detail: str = ""


RESULTS: list[Outcome] = []


@dataclass
class Tally:
    """What a probe reports besides surviving: lost valid samples and stale outputs it found."""

    lost: int = 0
    stale: int = 0


def probe(timeout_s: int) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Run the test as a probe: SIGALRM after ``timeout_s`` (a hang), any exception a crash; record the outcome.

    The probe gets a :class:`Tally` as its ``tally`` argument to report lost samples / stale outputs.
    """
    def wrap(fn: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> None:
            outcome = Outcome(fn.__name__.removeprefix("test_"))
            tally = Tally()

            def alarm(signum: int, frame: Any) -> None:
                raise ProbeHang(f"no answer after {timeout_s} s")

            previous = signal.signal(signal.SIGALRM, alarm)
            signal.alarm(timeout_s)
            try:
                fn(*args, tally=tally, **kwargs)
            except ProbeHang as exc:
                outcome.status, outcome.detail = "hang", str(exc)
                raise
            except BaseException as exc:
                outcome.status, outcome.detail = "crash", f"{type(exc).__name__}: {str(exc)[:200]}"
                raise
            finally:
                signal.alarm(0)
                signal.signal(signal.SIGALRM, previous)
                outcome.lost, outcome.stale = tally.lost, tally.stale
                RESULTS.append(outcome)
            assert tally.lost == 0 and tally.stale == 0, outcome
        run.__signature__ = _without_tally(fn)  # type: ignore[attr-defined]
        return run
    return wrap


def _without_tally(fn: Callable[..., None]) -> Any:
    import inspect

    sig = inspect.signature(fn)
    return sig.replace(parameters=[p for n, p in sig.parameters.items() if n != "tally"])


def leftovers(*folders: Path) -> list[Path]:
    """Temporaries / old copies of atomic writers under ``folders`` (recursively)."""
    found: list[Path] = []
    for folder in folders:
        if folder.exists():
            found += [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".old")) or ".tmp" in p.name]
    return found


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def is_known(exc: BaseException, *paths: Path) -> bool:
    """A stage would print this error as one line (not a traceback), and it names one of ``paths``."""
    return isinstance(exc, (StageError, *KNOWN_ERRORS)) and any(str(p) in str(exc) for p in paths)


# --- kill -9 mid-embed, then resume ------------------------------------------------------------------
KILL_EMBED = textwrap.dedent("""
    import json, os, signal, sys
    import pyarrow.parquet as pq, torch
    os._exit = lambda code: os.kill(os.getpid(), signal.SIGKILL)  # the stage's exit hook becomes a real kill -9
    from pipeline.config import EmbedConfig
    from pipeline.data.embed import embed_views
    from tests.fakes import tiny_sam
    root, out, info, cfg = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    embed_views(pq.read_table(os.path.join(root, "views.parquet")), root, tiny_sam(64, 8), info, out,
                EmbedConfig(**cfg), progress=False)
""")


def _embed_setup(tmp_path: Path) -> tuple[Any, dict[str, Any], Any]:
    index = small_index(tmp_path, n_train=4, n_eval=2)
    views, _ = build_views(index, tmp_path, views_cfg(occlusion_p=1.0), output_size=IMG, mask_threshold=128,
                           progress=False)
    pq.write_table(views, tmp_path / "views.parquet")
    info = {"variant": "tiny", "checkpoint_sha256": "ab" * 32, "img_size": IMG, "grid": GRID, "channels": 256}
    cfg = dataclasses.replace(load_test_params().embed, shard_rows=4, row_group_size=2, batch_size=3, device="cpu")
    return views, info, cfg


@probe(timeout_s=150)
def test_kill9_mid_embed_then_resume(tmp_path: Path, tally: Tally) -> None:
    from tests.fakes import tiny_sam

    views, info, cfg = _embed_setup(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    embed_views(views, tmp_path, tiny_sam(IMG, GRID), info, whole, cfg, progress=False)
    env = {**os.environ, EXIT_AFTER_SHARDS_ENV: "2", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", KILL_EMBED, str(tmp_path), str(killed), json.dumps(info),
                           json.dumps(dataclasses.asdict(cfg))], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    embed_views(views, tmp_path, tiny_sam(IMG, GRID), info, killed, cfg, progress=False)
    shards = lambda d: {p.relative_to(d).as_posix(): sha(p) for p in sorted(d.glob("*/*/part-*.parquet"))}  # noqa: E731
    a, b = shards(whole), shards(killed)
    tally.stale = len(leftovers(killed)) + sum(a[k] != b.get(k) for k in a)
    rows = lambda d: sum(pq.ParquetFile(p).metadata.num_rows for p in d.glob("*/*/part-*.parquet"))  # noqa: E731
    tally.lost = rows(whole) - rows(killed)
    assert read_cache_meta(killed) == read_cache_meta(whole)


# --- kill -9 mid-train (during a checkpoint write), then resume ---------------------------------------
KILL_TRAIN = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import pipeline.common.atomic as atomic
    from pipeline.config import params_from_dict
    import json
    real = atomic.atomic_write_bytes
    count = [0]
    def dying_write(dest, data):
        if str(dest).endswith(".ckpt"):
            count[0] += 1
            if count[0] == 2:  # the second checkpoint: die half-way through writing its temporary
                tmp = Path(dest).parent / f".{Path(dest).name}.k1lled00.tmp"
                tmp.write_bytes(data[: len(data) // 2])
                os.kill(os.getpid(), signal.SIGKILL)
        real(dest, data)
    atomic.atomic_write_bytes = dying_write
    from pipeline.training.train import train
    a = json.loads(sys.argv[1])
    train(params_from_dict(a["params"]), "stable_sam", embeddings=Path(a["emb"]), prompts=Path(a["prompts"]),
          base=Path(a["base"]), out=Path(a["out"]), metrics=Path(a["metrics"]), plots=Path(a["plots"]),
          checkpoints=Path(a["ckpt"]))
""")


def _train_setup(tmp_path: Path) -> tuple[Any, dict[str, Path]]:
    from pipeline.prompts.stage import make_prompts

    _, base_sha = write_tiny_base(tmp_path / "base", img=IMG, grid=GRID)
    write_fake_cache(tmp_path / "emb", base_sha, img=IMG, grid=GRID, n_train=8, n_eval=2)
    params = load_test_params(**{
        "train.batch_size": 4, "train.max_steps": 4, "train.loss_points": 64, "train.checkpoint_every": 1,
        "train.device": "cpu", "train.shuffle_buffer": 4, "train.sanity_views": 1,
    })
    make_prompts(params, tmp_path / "emb", tmp_path / "prompts")
    return params, {"emb": tmp_path / "emb", "prompts": tmp_path / "prompts" / "train.parquet", "base": tmp_path / "base"}


@probe(timeout_s=170)
def test_kill9_mid_train_then_resume(tmp_path: Path, tally: Tally) -> None:
    from pipeline.training.train import train

    params, ins = _train_setup(tmp_path)
    run = lambda d, **kw: train(params, "stable_sam", embeddings=ins["emb"], prompts=ins["prompts"],  # noqa: E731
                                base=ins["base"], out=d / "plugins", metrics=d / "metrics", plots=d / "plots",
                                checkpoints=d / "ckpt", **kw)
    run(tmp_path / "whole")
    killed = tmp_path / "killed"
    args = {"params": params.to_dict(), **{k: str(v) for k, v in ins.items()}, "out": str(killed / "plugins"),
            "metrics": str(killed / "metrics"), "plots": str(killed / "plots"), "ckpt": str(killed / "ckpt")}
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", KILL_TRAIN, json.dumps(args)], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=150)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert load_checkpoint(killed / "ckpt" / "stable_sam.ckpt")["step"] == 1  # the first checkpoint survived
    result = run(killed, resume=True)
    assert result["steps"] == 4
    same = sha(killed / "plugins" / "stable_sam.pt") == sha(tmp_path / "whole" / "plugins" / "stable_sam.pt")
    tally.stale = len(leftovers(killed)) + (not same)


# --- hostile archives and HTTP servers ---------------------------------------------------------------
@probe(timeout_s=30)
def test_zip_slip_archive(tmp_path: Path, tally: Tally) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("good/a.txt", b"fine")
        zf.writestr("../../evil.txt", b"pwned")
    (tmp_path / "slip.zip").write_bytes(buf.getvalue())
    target = tmp_path / "work" / "target"
    with pytest.raises(UnsafeArchiveError):
        safe_extract_zip(tmp_path / "slip.zip", target)
    tally.stale = int(target.exists()) + len(list(tmp_path.rglob("evil.txt"))) + len(leftovers(tmp_path))


def _lying_download(http_server: Any, tmp_path: Path, tally: Tally, **faults: Any) -> None:
    data = np.random.default_rng(0).bytes(50_000)
    url = http_server.add("blob.bin", data)
    for key, value in faults.items():
        setattr(http_server, key, value)
    dest = tmp_path / "blob.bin"
    (tmp_path / "blob.bin.part").write_bytes(data[:1000])  # an earlier, interrupted download
    try:
        digest = download_file(url, dest, expected_sha256=hashlib.sha256(data).hexdigest(), retries=2,
                               timeout_s=5, backoff_s=0.01)
        tally.stale = int(digest != hashlib.sha256(data).hexdigest() or dest.read_bytes() != data)
    except DownloadError as exc:
        assert url in str(exc) or str(dest) in str(exc)
        tally.stale = int(dest.exists())  # a refused download never leaves a wrong file under the name


@probe(timeout_s=60)
def test_http_connection_cut_mid_body(http_server: Any, tmp_path: Path, tally: Tally) -> None:
    _lying_download(http_server, tmp_path, tally, cut_after=5000, cut_times=2)


@probe(timeout_s=60)
def test_http_server_ignores_range(http_server: Any, tmp_path: Path, tally: Tally) -> None:
    _lying_download(http_server, tmp_path, tally, ignore_range=True)


@probe(timeout_s=60)
def test_http_206_with_the_wrong_range(http_server: Any, tmp_path: Path, tally: Tally) -> None:
    _lying_download(http_server, tmp_path, tally, wrong_range_start=7)


@probe(timeout_s=60)
def test_http_server_errors_then_recovers(http_server: Any, tmp_path: Path, tally: Tally) -> None:
    _lying_download(http_server, tmp_path, tally, fail_status=503, fail_times=2)


@probe(timeout_s=60)
def test_http_server_serves_other_bytes(http_server: Any, tmp_path: Path, tally: Tally) -> None:
    data = b"x" * 4000
    url = http_server.add("other.bin", b"y" * 4000)
    dest = tmp_path / "other.bin"
    with pytest.raises(DownloadError):
        download_file(url, dest, expected_sha256=hashlib.sha256(data).hexdigest(), retries=1, backoff_s=0.01)
    tally.stale = int(dest.exists()) + len(leftovers(tmp_path))


# --- wrong checkpoints ----------------------------------------------------------------------------------
BAD_FILES = {"random": np.random.default_rng(3).bytes(4096), "empty": b"", "zip_header": b"PK\x03\x04" + b"\0" * 60,
             "json": b'{"not": "torch"}'}


@probe(timeout_s=60)
def test_wrong_checkpoints(tmp_path: Path, tally: Tally) -> None:
    for kind, data in BAD_FILES.items():
        folder = tmp_path / kind
        write_tiny_base(folder / "base")
        (folder / "base" / "sam.pt").write_bytes(data)
        info = json.loads((folder / "base" / "base.json").read_text())
        info["checkpoint_sha256"] = hashlib.sha256(data).hexdigest()
        (folder / "base" / "base.json").write_text(json.dumps(info))
        (folder / "p.pt").write_bytes(data)
        (folder / "r.ckpt").write_bytes(data)
        for path, load in ((folder / "base" / "sam.pt", lambda: load_base(folder / "base")),
                           (folder / "p.pt", lambda: read_plugin_file(folder / "p.pt", "stable_sam")),
                           (folder / "r.ckpt", lambda: load_checkpoint(folder / "r.ckpt"))):
            with pytest.raises(Exception) as err:
                load()
            assert is_known(err.value, path), f"{kind} {path.name}: {type(err.value).__name__}: {err.value}"
            assert "weights_only` set to `False" not in str(err.value)
    # a real checkpoint of the wrong kind: a plugin file given as the base
    sam, _ = write_tiny_base(tmp_path / "swap")
    torch.save({"method": "stable_sam", "state_dict": {"x": torch.zeros(1)}}, tmp_path / "swap" / "sam.pt")
    info = json.loads((tmp_path / "swap" / "base.json").read_text())
    info["checkpoint_sha256"] = sha(tmp_path / "swap" / "sam.pt")
    (tmp_path / "swap" / "base.json").write_text(json.dumps(info))
    with pytest.raises(Exception) as err:
        load_base(tmp_path / "swap")
    assert is_known(err.value, tmp_path / "swap" / "sam.pt"), err.value


# --- special files in a dataset folder ----------------------------------------------------------------
def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _dataset(root: Path, n_good: int = 3) -> tuple[Any, int]:
    """DIS5K-TR with ``n_good`` valid pairs + COIFT with one; returns (params, number of valid pairs)."""
    dis, coift = get_set("DIS5K-TR"), get_set("COIFT")
    mask = np.zeros((32, 40), np.uint8)
    mask[5:15, 10:30] = 255
    for layout, stems in ((dis, [f"g{i}" for i in range(n_good)]), (coift, ["x"])):
        (root / layout.image_dir).mkdir(parents=True, exist_ok=True)
        (root / layout.mask_dir).mkdir(parents=True, exist_ok=True)
        for i, stem in enumerate(stems):
            rgb = np.random.default_rng(i).integers(0, 255, (32, 40, 3), dtype=np.uint8)
            Image.fromarray(rgb).save(root / layout.image_dir / f"{stem}.jpg")
            (root / layout.mask_dir / f"{stem}.png").write_bytes(_png(mask))
    params = load_test_params(**{"data.train_sets": ["DIS5K-TR"], "data.eval_sets": ["COIFT"],
                                 "data.max_images_per_set": 0})
    return params, n_good + 1


@probe(timeout_s=30)
def test_dev_zero_symlink_and_named_pipe_in_a_dataset(tmp_path: Path, tally: Tally) -> None:
    root = tmp_path / "hq"
    params, valid = _dataset(root)
    dis = get_set("DIS5K-TR")
    mask = (root / dis.mask_dir / "g0.png").read_bytes()
    os.symlink("/dev/zero", root / dis.image_dir / "zero.jpg")
    (root / dis.mask_dir / "zero.png").write_bytes(mask)
    os.mkfifo(root / dis.image_dir / "pipe.jpg")
    (root / dis.mask_dir / "pipe.png").write_bytes(mask)
    os.mkfifo(root / dis.mask_dir / "fifo_only.png")
    (root / dis.image_dir / "random.jpg").write_bytes(np.random.default_rng(1).bytes(700))
    (root / dis.mask_dir / "random.png").write_bytes(mask)
    result = build_index(root, params, progress=False)
    tally.lost = valid - len(result.rows)
    bad = {q.path.rsplit("/", 1)[-1] for q in result.quarantine}
    assert {"zero.jpg", "pipe.jpg", "random.jpg", "fifo_only.png"} <= bad, bad


# --- full disk, read-only output, stale old copies ---------------------------------------------------
@contextlib.contextmanager
def _patched(obj: Any, name: str, value: Any) -> Iterator[None]:
    real = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, real)


@probe(timeout_s=30)
def test_index_output_faults(tmp_path: Path, tally: Tally) -> None:
    root = tmp_path / "hq"
    params, _ = _dataset(root)
    result = build_index(root, params, progress=False)
    out, metrics = tmp_path / "data" / "index", tmp_path / "metrics" / "index.json"
    write_index(result, out, metrics)
    before = {p.name: sha(p) for p in out.iterdir()}, sha(metrics)
    smaller = index_mod.IndexResult(result.rows[1:], result.quarantine, result.sets, result.index_cfg)

    def full(table: Any, where: Any, **kw: Any) -> None:
        Path(where).write_bytes(b"PAR1")
        raise OSError(errno.ENOSPC, "No space left on device")

    def refuse(src: Any, dst: Any, real: Callable[[Any, Any], None] = os.replace) -> None:
        if str(src).endswith(".tmp"):
            raise PermissionError(errno.EACCES, "Permission denied", str(dst))
        real(src, dst)

    real_access = os.access
    faults = [(index_mod.pq, "write_table", full), (os, "replace", refuse),
              (os, "access", lambda p, m, **kw: False if Path(p) == out else real_access(p, m, **kw))]
    for obj, name, fake in faults:
        with _patched(obj, name, fake), pytest.raises(OutputWriteError) as err:
            write_index(smaller, out, metrics)
        assert str(out) in str(err.value) or str(metrics) in str(err.value)
        now = {p.name: sha(p) for p in out.iterdir()}, sha(metrics)
        tally.stale += int(now != before) + len(leftovers(out.parent, metrics.parent))
    write_index(smaller, out, metrics)  # the fault is gone: the next run just works
    tally.stale += len(leftovers(out.parent, metrics.parent))
    assert len(index_mod.read_index(out)) == len(smaller.rows)


# --- config holes --------------------------------------------------------------------------------------
@probe(timeout_s=30)
def test_non_finite_and_misspelt_params(tmp_path: Path, tally: Tally) -> None:
    raw = yaml.safe_load(TEST_PARAMS_PATH.read_text())
    cases = [("train", "lr", float("nan")), ("train", "epochs", float("inf")), ("report", "ours", "stabel_sam"),
             ("report", "baseline", "SAM")]
    for section, key, value in cases:
        bad = copy.deepcopy(raw)
        bad[section][key] = value
        path = tmp_path / f"{section}_{key}.yaml"
        path.write_text(yaml.safe_dump(bad))
        with pytest.raises(ConfigError, match=rf"{section}\.{key}"):
            load_params(path)


# --- DVC's repo lock held by a plain `dvc` ------------------------------------------------------------
@probe(timeout_s=120)
def test_flow_dvc_call_waits_for_a_running_dvc(tmp_path: Path, tally: Tally) -> None:
    zc_lockfile = pytest.importorskip("zc.lockfile")
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    if not Path(dvc).is_file():
        pytest.skip("dvc is not installed")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True, timeout=60, env=env)
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"hello": {"cmd": "echo hi > out.txt",
                                                                            "outs": ["out.txt"]}}}))
    held = zc_lockfile.LockFile(str(dvc_lock_path(tmp_path)))  # what a running `dvc repro` holds
    threading.Timer(3.0, held.close).start()
    lines: list[str] = []
    t0 = time.monotonic()
    rc = run_waiting_for_dvc(lambda on: stream_command([dvc, "repro", "hello"], tmp_path, on, env=env), tmp_path,
                             lines.append, timeout_s=90, poll_s=0.2)
    assert rc == 0, lines
    assert time.monotonic() - t0 >= 2.5 and any("held by another dvc process" in line for line in lines)
    tally.stale = int((tmp_path / "out.txt").read_text().strip() != "hi")


# --- the table ---------------------------------------------------------------------------------------------
def test_zz_fault_table(capsys: pytest.CaptureFixture[str]) -> None:
    """Print the probes' table (to the terminal's stderr, with or without -s) and require no crash, hang,
    lost sample or stale output."""
    if not RESULTS:
        pytest.skip("no probe ran (deselected)")
    rows = [("probes tried", len(RESULTS)), ("survived", sum(r.status == "survived" for r in RESULTS)),
            ("crashes", sum(r.status == "crash" for r in RESULTS)), ("hangs", sum(r.status == "hang" for r in RESULTS)),
            ("valid samples lost", sum(r.lost for r in RESULTS)), ("stale outputs", sum(r.stale for r in RESULTS))]
    lines = ["", "fault-injection summary", "-" * 32, *(f"{k:<22}{v:>10}" for k, v in rows)]
    for r in RESULTS:
        if r.status != "survived" or r.lost or r.stale:
            lines.append(f"  {r.name}: {r.status}, lost {r.lost}, stale {r.stale} {r.detail}")
    with capsys.disabled():
        print("\n".join(lines), file=sys.stderr, flush=True)
    counts = dict(rows)
    assert counts["crashes"] == counts["hangs"] == counts["valid samples lost"] == counts["stale outputs"] == 0
    assert counts["survived"] == counts["probes tried"]
