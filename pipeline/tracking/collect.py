"""Read what the pipeline's stages wrote into plain Python values for the tracking adapter (no MLflow here).

Everything here is a pure function of files: flattened params, DVC output hashes from ``dvc.lock``, the
git commit, ``metrics/eval.json`` ({benchmark: {method: {prompt_type: {metric: value}}}}), per-method
training metrics and loss curves, and a run key that identifies one pipeline run's inputs (so that a
re-run of the ``track`` stage after a crash resumes the same MLflow run instead of duplicating it).

    python -c "from pipeline.tracking.collect import flatten; print(flatten({'a': {'b': 1}}))"
"""
from __future__ import annotations

import csv
import json
import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from pipeline.common.hashing import sha256_file, sha256_bytes

MAX_PARAM_CHARS = 250  # MLflow stores longer values elsewhere; CONVENTIONS: keep them short
DATA_HASH_STAGES = ("download", "embed", "train")  # stages whose outputs' md5 go into the run's tags
_BAD_KEY_CHARS = re.compile(r"[^0-9A-Za-z_\-. /]")


class TrackingInputError(ValueError):
    """A stage output that the track stage cannot read; the message names the file and the fix."""


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings -> {"a.b.c": leaf}. Lists and other leaves are kept as they are."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def param_value(value: Any) -> str:
    """A leaf as a short, stable string (JSON for lists/dicts), cut to :data:`MAX_PARAM_CHARS`."""
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), sort_keys=True)
    if len(text) > MAX_PARAM_CHARS:
        text = text[: MAX_PARAM_CHARS - 3] + "..."
    return text


def flatten_params(params: Mapping[str, Any]) -> dict[str, str]:
    """``params.yaml`` as MLflow params: dotted keys, string values of at most 250 characters."""
    return {safe_key(k): param_value(v) for k, v in flatten(params).items()}


def safe_key(key: str) -> str:
    """An MLflow-legal key: letters, digits, ``_ - . space /`` only (``@`` etc. become ``-``)."""
    return _BAD_KEY_CHARS.sub("-", key)


def numeric_leaves(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite int/float leaves of a nested mapping under dotted keys (bools, strings, lists, NaN skipped)."""
    out: dict[str, float] = {}
    for key, value in flatten(tree, prefix).items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if math.isfinite(float(value)):
            out[safe_key(key)] = float(value)
    return out


def read_json(path: Path, what: str) -> Any:
    """Parse a JSON file or raise :class:`TrackingInputError` naming it and the stage to re-run."""
    if not path.is_file():
        raise TrackingInputError(f"{path}: {what} not found; run the stage that writes it (`dvc repro`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise TrackingInputError(f"{path}: {what} is not valid JSON ({exc}); re-run its stage") from None


def read_eval(path: Path) -> dict[str, dict[str, dict[str, dict[str, Any]]]]:
    """``metrics/eval.json`` checked to be {benchmark: {method: {prompt_type: {metric: value}}}}."""
    data = read_json(path, "evaluation metrics")
    if not isinstance(data, dict) or not data:
        raise TrackingInputError(f"{path}: expected {{benchmark: {{method: {{prompt_type: {{metric: value}}}}}}}}")
    for bench, methods in data.items():
        if not isinstance(methods, dict) or not all(isinstance(p, dict) for p in methods.values()):
            raise TrackingInputError(f"{path}: benchmark {bench!r} must map method -> prompt_type -> metrics")
    return data


def eval_metrics_for_method(evaluation: Mapping[str, Any], method: str) -> dict[str, float]:
    """All numeric eval metrics of one method under the full dotted key ``<benchmark>.<method>.<prompt>.<metric>``."""
    out: dict[str, float] = {}
    for bench, methods in evaluation.items():
        if method in methods:
            out.update(numeric_leaves(methods[method], f"{bench}.{method}."))
    return out


def read_loss_curve(path: Path) -> dict[str, tuple[list[int], list[float]]]:
    """``<method>_loss.csv`` (columns ``step, loss, ...``) -> {column: (steps, values)}; non-numeric cells skipped."""
    if not path.is_file():
        raise TrackingInputError(f"{path}: loss curve not found; re-run the train stage")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "step" not in reader.fieldnames:
            raise TrackingInputError(f"{path}: a loss curve needs a header with a 'step' column")
        series: dict[str, tuple[list[int], list[float]]] = {
            c: ([], []) for c in reader.fieldnames if c != "step"
        }
        for row_no, row in enumerate(reader, start=2):
            try:
                step = int(float(row["step"]))
            except (TypeError, ValueError):
                raise TrackingInputError(f"{path}:{row_no}: step {row['step']!r} is not a number") from None
            for col, (steps, values) in series.items():
                try:
                    value = float(row[col])
                except (TypeError, ValueError):
                    continue
                if math.isfinite(value):
                    steps.append(step)
                    values.append(value)
    return {c: s for c, s in series.items() if s[0]}


def dvc_out_hashes(lock_path: Path, stages: Iterable[str] = DATA_HASH_STAGES,
                   items: Mapping[str, Iterable[str]] | None = None) -> dict[str, str]:
    """md5 of the outputs of ``stages`` (and their ``foreach`` items, ``train@x``) from ``dvc.lock``.

    ``items`` names the current ``foreach`` items per stage (``{"train": train.methods}``): ``dvc.lock``
    keeps the entries of items since removed from the pipeline, and a run must not carry their hashes.
    Returns {"dvc.md5.<stage>.<out path>": md5}; an absent ``dvc.lock`` gives {} (not a DVC run).
    """
    if not lock_path.is_file():
        return {}
    try:
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise TrackingInputError(f"{lock_path}: not valid YAML ({exc}); run `dvc repro` to rewrite it") from None
    wanted = tuple(stages)
    out: dict[str, str] = {}
    for name, entry in (lock.get("stages") or {}).items():
        stage, _, item = name.partition("@")
        if stage not in wanted or not isinstance(entry, dict):
            continue
        if item and items is not None and stage in items and item not in set(items[stage]):
            continue  # an item no longer in the pipeline (e.g. a method dropped from train.methods)
        for item in entry.get("outs") or []:
            digest = item.get("md5") or item.get("etag") or item.get("checksum")
            if digest:
                out[safe_key(f"dvc.md5.{name.replace('@', '.')}.{item['path']}")] = str(digest)
    return out


def git_info(root: Path) -> dict[str, str]:
    """{"commit": sha or "none", "dirty": "true"/"false"} for the repository at ``root``."""
    def _git(*args: str) -> str | None:
        try:
            res = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return res.stdout.strip() if res.returncode == 0 else None

    commit = _git("rev-parse", "HEAD") or "none"
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": "unknown" if status is None else str(bool(status)).lower()}


@dataclass(frozen=True)
class PipelineOutputs:
    """Where the stages wrote their files (paths as given in ``dvc.yaml``)."""

    root: Path
    eval_json: Path
    train_metrics: Path  # folder of <method>.json
    train_plots: Path  # folder of <method>_loss.csv
    plots: Path  # every *.png below is an artifact
    report: Path
    metrics: Path  # every *.json below is an artifact
    plugins: Path  # models/plugins/<method>.pt
    base: Path  # models/base
    dvc_lock: Path

    @classmethod
    def default(cls, root: Path) -> "PipelineOutputs":
        """The paths ``dvc.yaml`` uses, below ``root``."""
        root = Path(root)
        return cls(root=root, eval_json=root / "metrics/eval.json", train_metrics=root / "metrics/train",
                   train_plots=root / "plots/train", plots=root / "plots", report=root / "reports/summary.md",
                   metrics=root / "metrics", plugins=root / "models/plugins", base=root / "models/base",
                   dvc_lock=root / "dvc.lock")


@dataclass
class Artifact:
    path: Path  # local file
    artifact_dir: str  # folder inside the run's artifacts ("" = top level)


@dataclass
class CollectedRun:
    """Everything one pipeline run logs, read from disk."""

    params: dict[str, str]
    tags: dict[str, str]
    evaluation: dict[str, Any]
    train_metrics: dict[str, dict[str, float]]  # method -> metrics
    loss_curves: dict[str, dict[str, tuple[list[int], list[float]]]]  # method -> column -> (steps, values)
    artifacts: list[Artifact] = field(default_factory=list)
    run_key: str = ""


def _artifacts(out: PipelineOutputs, methods: Iterable[str], exclude: Iterable[Path]) -> list[Artifact]:
    arts: list[Artifact] = []
    skip = {Path(e).resolve() for e in exclude}

    def add(files: Iterable[Path]) -> None:
        root = out.root.resolve()
        for f in sorted(files):
            f = f.resolve()
            if f.is_file() and f not in skip:
                rel = f.relative_to(root) if f.is_relative_to(root) else Path(f.name)
                arts.append(Artifact(f, rel.parent.as_posix() if rel.parent != Path(".") else ""))

    if out.plots.is_dir():
        add(out.plots.rglob("*.png"))
    if out.report.is_file():
        add([out.report])
    if out.metrics.is_dir():
        add(out.metrics.rglob("*.json"))
    add(out.plugins / f"{m}.pt" for m in methods)
    return arts


def collect(out: PipelineOutputs, params: Mapping[str, Any], train_methods: Iterable[str],
            *, exp_name: str = "", exclude: Iterable[Path] = ()) -> CollectedRun:
    """Read every stage output the ``track`` stage logs. Raises :class:`TrackingInputError` naming a bad file.

    ``exclude``: files never logged nor hashed (the track stage's own output).
    """
    methods = list(train_methods)
    evaluation = read_eval(out.eval_json)
    train_metrics: dict[str, dict[str, float]] = {}
    curves: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for m in methods:
        data = read_json(out.train_metrics / f"{m}.json", f"training metrics of {m!r}")
        if not isinstance(data, dict):
            raise TrackingInputError(f"{out.train_metrics / f'{m}.json'}: expected a JSON object of metrics")
        train_metrics[m] = numeric_leaves(data)
        curves[m] = read_loss_curve(out.train_plots / f"{m}_loss.csv")
        if not (out.plugins / f"{m}.pt").is_file():
            raise TrackingInputError(f"{out.plugins / f'{m}.pt'}: trained weights of {m!r} not found; "
                                     f"run `dvc repro train@{m}`")
    git = git_info(out.root)
    source = params.get("data", {}).get("source", "") if isinstance(params.get("data"), Mapping) else ""
    tags = {
        "mlflow.source.git.commit": git["commit"],
        "git.commit": git["commit"],
        "git.dirty": git["dirty"],
        "profile": str(source),
        "dvc.exp_name": exp_name,
        **dvc_out_hashes(out.dvc_lock, items={"train": methods}),
    }
    tags = {k: v for k, v in tags.items() if v != ""}
    run = CollectedRun(params=flatten_params(params), tags=tags, evaluation=evaluation,
                       train_metrics=train_metrics, loss_curves=curves, artifacts=_artifacts(out, methods, exclude))
    run.run_key = run_key(run)
    return run


def run_key(run: CollectedRun) -> str:
    """sha256 over params, tags and every artifact's content: equal inputs -> equal key."""
    parts = [json.dumps(run.params, sort_keys=True), json.dumps(run.tags, sort_keys=True)]
    parts += [f"{a.artifact_dir}/{a.path.name}:{sha256_file(a.path)}" for a in run.artifacts]
    return sha256_bytes("\n".join(parts).encode("utf-8"))


__all__ = [
    "Artifact", "CollectedRun", "PipelineOutputs", "TrackingInputError", "collect", "dvc_out_hashes",
    "eval_metrics_for_method", "flatten", "flatten_params", "git_info", "numeric_leaves", "param_value",
    "read_eval", "read_loss_curve", "run_key", "safe_key",
]
