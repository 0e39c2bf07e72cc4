"""Reuse of finished HQ evaluation outputs, so that one ``evaluate@<benchmark>`` process can score every method.

DVC re-runs a benchmark's stage when anything it depends on changes: one method's plugin file, a param, the
code. Only the methods whose inputs changed need scoring again. Each finished prediction file therefore
carries, in its Parquet schema metadata, the fingerprint of everything its scores are a function of:

- ``code``: sha256 over every ``.py`` file of ``pipeline/`` and ``stages/evaluate.py`` (any code change
  rescores every method: conservative on purpose);
- ``embeddings``: sha256 of ``CACHE.json`` and of the bytes of the benchmark's eval shards;
- ``prompts``: sha256 of ``eval.parquet``; ``base``: sha256 of ``base.json`` (the checkpoint's sha256 is in it,
  and ``load_base`` verifies the checkpoint against it);
- ``method``, ``plugin`` (:func:`plugin_weights_sha256` of ``<plugins>/<method>.pt``, or None), ``plugin_params``
  (``params.plugin``: the evaluation builds the architecture from it), ``evaluate`` (the params that change
  scores) and ``bf16`` (the resolved ``evaluate.bf16``).

The predictions file is written after the metrics JSON, so it is the commit marker: a method is reused only
when both files exist and the stored fingerprint equals the one computed now.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow.parquet as pq
import torch

from pipeline.common.hashing import sha256_file

FINGERPRINT_KEY = b"stable_sam_eval_inputs"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def code_sha256(root: Path = PROJECT_ROOT) -> str:
    """sha256 over the relative path and bytes of every ``pipeline/**/*.py`` and ``stages/evaluate.py``."""
    files = sorted([*(root / "pipeline").rglob("*.py"), root / "stages" / "evaluate.py"])
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


def files_sha256(paths: Iterable[Path], root: Path) -> str:
    """sha256 over the relative path and content sha256 of each file (in sorted order)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(f"{path.relative_to(root).as_posix()}\0{sha256_file(path)}\0".encode())
    return digest.hexdigest()


def plugin_weights_sha256(path: Path) -> str:
    """sha256 of what in a plugin file changes scores: its method, base and trained tensors (names, dtypes, shapes,
    bytes). Not its stored config or step count, which the evaluation does not read, so ``sam``'s empty plugin
    file, rewritten with every training-param change, keeps its scores. A file that is not a readable plugin file
    hashes by its bytes (scoring it then reports the problem)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        method, base, state = obj["method"], obj.get("base_sha256"), obj["state_dict"]
    except Exception:  # noqa: BLE001 - any unreadable file: fall back to its bytes
        return "file:" + sha256_file(path)
    digest = hashlib.sha256(f"{method}\0{base}\0".encode())
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def shared_inputs(benchmark: str, *, embeddings: Path, prompts: Path, base: Path) -> dict[str, str | None]:
    """The fingerprint parts every method of ``benchmark`` shares (computed once per process)."""
    embeddings = Path(embeddings)
    files = [embeddings / "CACHE.json", *(embeddings / benchmark / "eval").glob("*.parquet")]
    return {  # a missing input hashes as None: the evaluation itself then reports it (naming the fix)
        "code": code_sha256(),
        "embeddings": files_sha256([f for f in files if f.is_file()], embeddings),
        "prompts": sha256_file(prompts) if Path(prompts).is_file() else None,
        "base": sha256_file(Path(base) / "base.json") if (Path(base) / "base.json").is_file() else None,
    }


def method_fingerprint(shared: Mapping[str, str | None], method: str, plugin: Path | None, *,
                       evaluate_params: Mapping[str, Any], plugin_params: Mapping[str, Any],
                       bf16: bool) -> dict[str, Any]:
    """``shared`` + what is ``method``'s own: its plugin file's sha256 (None without one) and the params."""
    return {**shared, "method": method, "plugin": plugin_weights_sha256(plugin) if plugin is not None else None,
            "plugin_params": dict(plugin_params), "evaluate": dict(evaluate_params), "bf16": bool(bf16)}


def encode_fingerprint(fingerprint: Mapping[str, Any]) -> bytes:
    return json.dumps(fingerprint, sort_keys=True).encode()


def stored_fingerprint(predictions: Path) -> dict[str, Any] | None:
    """The fingerprint stored in a predictions file, or None (no file, unreadable, or written without one)."""
    try:
        meta = pq.read_schema(str(predictions)).metadata or {}
    except (OSError, ValueError):
        return None
    raw = meta.get(FINGERPRINT_KEY)
    return json.loads(raw) if raw else None


def reusable(metrics_json: Path, predictions: Path, fingerprint: Mapping[str, Any]) -> bool:
    """Whether a method's finished outputs were made from exactly these inputs."""
    if not Path(metrics_json).is_file():
        return False
    stored = stored_fingerprint(predictions)
    return stored is not None and stored == json.loads(encode_fingerprint(fingerprint))


def remove_unlisted(folder: Path, suffix: str, methods: Iterable[str]) -> list[Path]:
    """Delete ``<folder>/<name><suffix>`` files and ``.<name>.partial`` folders of methods not in ``methods``
    (a method taken out of ``evaluate.methods`` leaves nothing behind in the stage's output folders)."""
    keep = set(methods)
    removed = []
    if not Path(folder).is_dir():
        return removed
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.name.endswith(suffix) and path.name[: -len(suffix)] not in keep:
            path.unlink()
            removed.append(path)
        elif path.is_dir() and path.name.startswith(".") and path.name.endswith(".partial") \
                and path.name[1: -len(".partial")] not in keep:
            shutil.rmtree(path)
            removed.append(path)
    return removed
