"""Full-geometry rehearsal: the whole DVC pipeline at the full profile's real shapes, on a CPU, in minutes.

The full profile (params-full.yaml) runs the official SAM ViT at 1024x1024 input with 64x64x256 embeddings
on the real HQSeg-44K download. This module proves that code path end to end without the 7.4 GB download or
a GPU: it derives the rehearsal params from params-full.yaml (only the size knobs of :data:`OVERRIDES`
change, so the two cannot drift), writes

- an official-architecture ``vit_b`` checkpoint (``segment_anything.sam_model_registry``, random weights,
  seeded) and
- a small HQSeg-44K fixture: the three archives in the real folder layout, two image/mask pairs per set,

serves both from a loopback HTTP server (the same verified download path as the real files, with their
sha256 in ``download.expected_sha256`` / ``sam.checkpoint_sha256``), copies the project's code into a
scratch folder and runs ``dvc repro`` there. Every stage command runs under a measuring shim (``python`` on
PATH), so each stage's wall time, CPU time and peak RSS are its own; the result (stages, checks of the
outputs' shapes) goes to ``reports/rehearsal.json`` and is printed as a table.

    python -m pipeline.rehearsal --out reports/rehearsal.json     # or: make rehearsal
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import yaml
from PIL import Image, ImageDraw

from pipeline import PROJECT_ROOT
from pipeline.common.atomic import atomic_write_json
from pipeline.config import load_params
from pipeline.data.layout import ARCHIVES, HQSEG_SETS

FULL_PARAMS = PROJECT_ROOT / "params-full.yaml"
VARIANT = "vit_b"
CHECKPOINT_NAME = "sam_vit_b_rehearsal.pth"
PAIRS_PER_SET = 2  # the fixture ships two pairs per set; data.max_images_per_set keeps one (the cap is exercised)
# Image sizes of the fixture (w, h): larger and smaller than the 1024 input, landscape and portrait.
FIXTURE_SIZES: tuple[tuple[int, int], ...] = ((1600, 1200), (900, 1400), (1024, 768), (700, 520))

# The only values that differ from params-full.yaml (dotted key -> value): sizes, CPU devices and the local
# sources. Everything else (prompt types, loss, plugins, methods, views, postprocessing) is the full profile.
OVERRIDES: dict[str, Any] = {
    "data.train_sets": ["DIS5K-TR", "DUTS-TR"],    # separate im/gt folders + cascade_psp's side-by-side pairs
    "data.eval_sets": ["DIS5K-VD", "HRSOD"],
    "data.max_images_per_set": 1,
    "sam.variant": VARIANT,
    "embed.batch_size": 1,                         # rel-pos attention at 1024 px: 4 GB peak; 7-9 GB at batch 2
    "embed.device": "cpu",
    "embed.shard_rows": 4,                         # several shards per split, as at full scale
    "embed.row_group_size": 2,
    "prompts.eval_draws": 2,
    "train.batch_size": 2,
    "train.max_steps": 2,
    "train.device": "cpu",
    "train.sanity_views": 4,
    "seeds.extra": [1],
    "evaluate.benchmarks": ["DIS5K-VD", "HRSOD"],
    "evaluate.device": "cpu",
    "evaluate.gallery_images": 2,
}
# Set at run time from the fixture: download.endpoint, download.expected_sha256, sam.checkpoint_url/_sha256.

# What travels into the scratch copy: the code, DVC's files and the committed asset (a dep of `base`);
# never outputs (metrics/, plots/, reports/, models/, data/, dvc.lock), so every stage must run and write anew.
COPY_PREFIXES = (".dvc/config", ".dvcignore", ".gitignore", "dvc.yaml", "assets/", "pipeline/", "stages/")
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "17179869184"}

# The measuring shim: put on PATH as `python`, it runs the real interpreter and appends one JSON line with
# the DVC stage, wall time, CPU time (user + system: what a busy machine does not inflate) and the peak RSS
# of its child (ru_maxrss of RUSAGE_CHILDREN: KiB on Linux).
_SHIM = '''#!{python}
import json, os, resource, subprocess, sys, time
t0 = time.monotonic()
rc = subprocess.call([{python!r}, *sys.argv[1:]])
wall = time.monotonic() - t0
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open({log!r}, "a", encoding="utf-8") as f:
    f.write(json.dumps({{"stage": os.environ.get("DVC_STAGE", ""), "argv": sys.argv[1:], "rc": rc,
                        "wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
                        "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}}) + "\\n")
sys.exit(rc)
'''


class RehearsalError(RuntimeError):
    """A rehearsal that did not prove the pipeline: a failed or skipped stage, or an output of the wrong shape."""


# ---------------------------------------------------------------------------------------------- params
def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``a.b.c`` in a params tree; the key must already exist there (an override cannot add one)."""
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node[part]
    if leaf not in node:
        raise RehearsalError(f"{FULL_PARAMS.name}: no key {key!r} to override; update OVERRIDES in {__name__}")
    node[leaf] = value


def rehearsal_params(sources: dict[str, Any], full: Path = FULL_PARAMS) -> dict[str, Any]:
    """params-full.yaml with :data:`OVERRIDES` and ``sources`` (the fixture's URLs and sha256) applied."""
    tree = yaml.safe_load(Path(full).read_text(encoding="utf-8"))
    for key, value in {**OVERRIDES, **sources}.items():
        _set_dotted(tree, key, value)
    return tree


# ---------------------------------------------------------------------------------------------- fixture
def make_checkpoint(path: Path, seed: int = 0) -> str:
    """An official ViT-B SAM state dict (segment_anything's own builder, random weights, seeded); its sha256."""
    import torch
    from segment_anything import sam_model_registry

    torch.manual_seed(seed)
    sam = sam_model_registry[VARIANT]()
    buffer = io.BytesIO()
    torch.save(sam.state_dict(), buffer)
    Path(path).write_bytes(buffer.getvalue())
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def fixture_pair(seed: int, size: tuple[int, int]) -> tuple[bytes, bytes]:
    """One JPEG photo-like image and its 0/255 PNG mask: a blob with thin strokes over a noisy gradient."""
    w, h = size
    rng = np.random.default_rng(seed)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = w * rng.uniform(0.35, 0.65), h * rng.uniform(0.35, 0.65)
    rx, ry = w * rng.uniform(0.12, 0.25), h * rng.uniform(0.12, 0.25)
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    for _ in range(6):  # thin structures, the HQ sets' difficulty
        angle = rng.uniform(0, 2 * math.pi)
        length = rng.uniform(0.2, 0.45) * min(w, h)
        draw.line((cx, cy, cx + length * math.cos(angle), cy + length * math.sin(angle)),
                  fill=255, width=int(rng.integers(2, 6)))
    m = np.asarray(mask) > 0
    yy, xx = np.mgrid[0:h, 0:w]
    background = (60 + 80 * xx[..., None] / w + 40 * yy[..., None] / h) * np.array([1.0, 0.9, 0.7])
    color = rng.uniform(120, 240, size=3)
    pixels = np.where(m[..., None], color, background) + rng.normal(0, 12, size=(h, w, 3))
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    jpg, png = io.BytesIO(), io.BytesIO()
    img.save(jpg, format="JPEG", quality=90)
    mask.save(png, format="PNG")
    return jpg.getvalue(), png.getvalue()


def make_archives(out_dir: Path, pairs_per_set: int = PAIRS_PER_SET) -> dict[str, str]:
    """The three HQSeg-44K zips in the real layout (every set, ``pairs_per_set`` pairs); {archive: sha256}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sums: dict[str, str] = {}
    for archive in ARCHIVES:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:  # JPEG/PNG do not deflate further
            for i, s in enumerate(HQSEG_SETS):
                if s.archive != archive:
                    continue
                for j in range(pairs_per_set):
                    stem = f"{s.name.lower()}_{j:04d}"
                    jpg, png = fixture_pair(100 * i + j, FIXTURE_SIZES[(i + j) % len(FIXTURE_SIZES)])
                    zf.writestr(f"{s.image_dir}/{stem}.jpg", jpg)
                    zf.writestr(f"{s.mask_dir}/{stem}.png", png)
        (out_dir / archive).write_bytes(buf.getvalue())
        sums[archive] = hashlib.sha256(buf.getvalue()).hexdigest()
    return sums


@contextlib.contextmanager
def serve_folder(folder: Path) -> Iterator[str]:
    """A loopback HTTP server over ``folder`` for the duration; yields its base URL."""
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        yield f"http://{host}:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# ---------------------------------------------------------------------------------------------- project copy
def copy_project(dest: Path, source: Path = PROJECT_ROOT) -> int:
    """Copy the working tree's code (tracked and untracked-but-not-ignored files under :data:`COPY_PREFIXES`)
    into ``dest`` as a fresh git repository; returns the number of files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=source,
                            check=True, capture_output=True).stdout.decode().split("\0")
    n = 0
    for rel in sorted(set(filter(None, listed))):
        src = source / rel
        if not rel.startswith(COPY_PREFIXES) or not src.is_file() or "__pycache__" in rel:
            continue  # deleted in the working tree, or not part of the code
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel)
        n += 1
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    return n


def _write_shim(folder: Path, log: Path) -> None:
    """Write the measuring ``python`` shim into ``folder``; it appends its records to ``log``."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "python"
    shim.write_text(_SHIM.format(python=sys.executable, log=str(log)), encoding="utf-8")
    shim.chmod(0o755)


# ---------------------------------------------------------------------------------------------- checks
def check_outputs(project: Path) -> dict[str, Any]:
    """The full-shape facts of a finished run: embedding shape/rows, plugins loading on the vit_b base,
    finite evaluation numbers. Raises :class:`RehearsalError` when one does not hold."""
    from pipeline.data.embedding_reader import iter_views
    from pipeline.data.embedding_format import read_cache_meta
    from pipeline.modeling.backbones import load_base
    from pipeline.modeling.methods import build_method
    from pipeline.modeling.plugin_file import read_plugin_file

    base = json.loads((project / "models/base/base.json").read_text(encoding="utf-8"))
    cache = read_cache_meta(project / "data/embeddings")
    rows = {split: list(iter_views(project / "data/embeddings", split)) for split in ("train", "eval")}
    shapes = {tuple(int(d) for d in np.asarray(r["embedding"]).shape) for split in rows.values() for r in split}
    facts: dict[str, Any] = {
        "variant": base["variant"], "img_size": base["img_size"], "grid": base["grid"],
        "base_parameters": base["parameters"], "embedding_shapes": sorted(list(s) for s in shapes),
        "views": {split: len(r) for split, r in rows.items()}, "shards": len(cache["shards"]),
    }
    if base["variant"] != VARIANT or shapes != {(256, 64, 64)} or min(facts["views"].values()) == 0:
        raise RehearsalError(f"embeddings are not the full profile's 256x64x64 for {VARIANT}: {facts}")
    params = load_params(project / "params.yaml")
    sam, info = load_base(project / "models/base")  # what Predictor.from_pretrained does, the base loaded once
    facts["plugins"] = {}
    for method in params.train.methods:
        stored = read_plugin_file(project / f"models/plugins/{method}.pt", method, info["checkpoint_sha256"])
        decoder = build_method(method, sam, params.plugin)
        if decoder.num_trainable:
            decoder.load_plugin_state_dict(stored["state_dict"])
        facts["plugins"][method] = {"trainable": decoder.num_trainable, "tensors": len(stored["state_dict"])}
    eval_json = json.loads((project / "metrics/eval.json").read_text(encoding="utf-8"))
    numbers = list(_numbers(eval_json))
    facts["eval_numbers"] = len(numbers)
    if not numbers or not all(math.isfinite(x) for x in numbers):
        raise RehearsalError(f"{project / 'metrics/eval.json'}: {len(numbers)} numbers, not all finite")
    return facts


def _numbers(obj: Any) -> Iterator[float]:
    """Every number in a JSON tree (booleans excluded)."""
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield float(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _numbers(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _numbers(v)


# ---------------------------------------------------------------------------------------------- run
def _stream(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> int:
    """Run ``cmd``, echoing and logging its output with elapsed seconds; returns its exit status."""
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as out, subprocess.Popen(
        cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            stamped = f"[{time.monotonic() - t0:7.1f}s] {line.rstrip()}"
            print(stamped, flush=True)
            out.write(stamped + "\n")
        return proc.wait()


def run_rehearsal(work: Path, out: Path, *, keep: bool = False) -> dict[str, Any]:
    """Rehearse the whole pipeline in ``work`` (created, and removed unless ``keep``); writes ``out``."""
    work = Path(work)
    if work.exists() and (not work.is_dir() or any(work.iterdir())):
        raise RehearsalError(f"{work}: the scratch folder must be new or empty (it is removed afterwards)")
    work.mkdir(parents=True, exist_ok=True)
    project, fixture, shim_dir = work / "project", work / "fixture", work / "shim"
    stage_log = work / "stages.jsonl"
    try:
        t0 = time.monotonic()
        copy_project(project)
        sums = make_archives(fixture)
        ckpt_sha = make_checkpoint(fixture / CHECKPOINT_NAME)
        prepare_s = time.monotonic() - t0
        _write_shim(shim_dir, stage_log)
        dvc = Path(sys.executable).parent / "dvc"
        env = {**os.environ, **MALLOC_ENV, "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "NO_ALBUMENTATIONS_UPDATE": "1",
               "PATH": os.pathsep.join([str(shim_dir), str(dvc.parent), os.environ.get("PATH", "")])}
        env.pop("PREFECT_HOME", None)  # the copy's own (pipeline/__init__.py sets it inside the project)
        with serve_folder(fixture) as url:
            params = rehearsal_params({
                "download.endpoint": url, "download.expected_sha256": sums,
                "sam.checkpoint_url": f"{url}/{CHECKPOINT_NAME}", "sam.checkpoint_sha256": ckpt_sha,
            })
            (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
            load_params(project / "params.yaml")  # the derived profile is a valid one
            listed = subprocess.run([str(dvc), "stage", "list", "--name-only"], cwd=project, env=env,
                                    check=True, capture_output=True, text=True).stdout.split()
            t1 = time.monotonic()
            rc = _stream([str(dvc), "repro"], project, env, work / "dvc_repro.log")
            repro_s = time.monotonic() - t1
        records = [json.loads(line) for line in stage_log.read_text(encoding="utf-8").splitlines()] \
            if stage_log.is_file() else []
        stages = [{k: r[k] for k in ("stage", "wall_s", "cpu_s", "peak_rss_mib", "rc")} for r in records]
        report: dict[str, Any] = {
            "profile": FULL_PARAMS.name, "overrides": OVERRIDES, "cpus": os.cpu_count(), "dvc_rc": rc,
            "expected_stages": listed, "stages": stages,
            "prepare_s": round(prepare_s, 1), "repro_wall_s": round(repro_s, 1),
            "dvc_overhead_s": round(repro_s - sum(s["wall_s"] for s in stages), 1),
            "peak_rss_mib": max((s["peak_rss_mib"] for s in stages), default=0.0),
        }
        problems = stage_problems(listed, stages, rc, work / "dvc_repro.log")
        if not problems:
            report["checks"] = check_outputs(project)
        report["ok"] = not problems
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, report)
        print(format_table(report))
        if problems:
            raise RehearsalError("; ".join(problems) + f"; report: {out}")
        return report
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def stage_problems(expected: list[str], stages: list[dict[str, Any]], rc: int, log: Path) -> list[str]:
    """Why a run proves nothing: DVC failed, a stage of ``expected`` did not run (exactly once), or one failed."""
    problems = [f"`dvc repro` exited {rc} (log: {log})"] if rc != 0 else []
    ran = [s["stage"] for s in stages]
    missing = [name for name in expected if name not in ran]
    if not expected or missing:
        problems.append(f"stages that did not run: {', '.join(missing) or 'all (no stage listed)'}")
    repeated = sorted({name for name in ran if ran.count(name) > 1})
    if repeated:
        problems.append(f"stages that ran more than once: {', '.join(repeated)}")
    failed = [s["stage"] for s in stages if s["rc"] != 0]
    if failed:
        problems.append(f"stages that failed: {', '.join(failed)}")
    return problems


def format_table(report: dict[str, Any]) -> str:
    """The per-stage table (wall time, peak RSS) with the totals."""
    stages = report["stages"]
    rows = [f"{'stage':34s} {'wall s':>8s} {'CPU s':>8s} {'peak RSS MiB':>13s}", "-" * 66]
    rows += [f"{s['stage']:34s} {s['wall_s']:8.1f} {s['cpu_s']:8.1f} {s['peak_rss_mib']:13.0f}"
             + ("  FAILED" if s["rc"] else "") for s in stages]
    rows += ["-" * 66,
             f"{'stages (sum; max RSS)':34s} {sum(s['wall_s'] for s in stages):8.1f} "
             f"{sum(s['cpu_s'] for s in stages):8.1f} {report['peak_rss_mib']:13.0f}",
             f"{'dvc overhead':34s} {report['dvc_overhead_s']:8.1f}",
             f"{'dvc repro (wall)':34s} {report['repro_wall_s']:8.1f}",
             f"{'fixture + checkpoint + copy':34s} {report['prepare_s']:8.1f}"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """CLI: run the rehearsal; exit 2 with one ``rehearsal: error:`` line when it proves nothing."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=PROJECT_ROOT / "reports" / "rehearsal.json")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (project copy + outputs)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="stable-sam-rehearsal-"))
    try:
        run_rehearsal(work, args.out, keep=args.keep)
    except RehearsalError as exc:
        print(f"rehearsal: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
