"""The published plugin file ``models/plugins/<method>.pt``: written by training, read by everything else.

Content: ``{"method", "state_dict" (ONLY the method's trainable tensors, never SAM's weights), "config"
(the run's params as a plain dict), "base_sha256" (the SAM checkpoint it was trained on), ...extra}``.
Written atomically with a fixed in-archive name (so the same weights give the same bytes), read with
``torch.load(..., weights_only=True)``; every failure names the file and the fix.
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.common.atomic import atomic_path
from pipeline.common.torch_files import load_error_reason

REQUIRED_KEYS = ("method", "state_dict")


class PluginFileError(ValueError):
    """A plugin file that cannot be used with the requested method or base; the message says why."""


def save_plugin_file(path: Path, *, method: str, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                     base_sha256: str, extra: Mapping[str, Any] | None = None) -> None:
    """Publish trained weights: ``state_dict`` holds only the trainable tensors."""
    payload = {"method": method, "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()},
               "config": dict(config), "base_sha256": base_sha256, **dict(extra or {})}
    buffer = io.BytesIO()
    torch.save(payload, buffer)  # into memory first: torch.save records the file name it writes to
    with atomic_path(Path(path)) as tmp:
        Path(tmp).write_bytes(buffer.getvalue())


def read_plugin_file(path: Path, method: str | None = None, base_sha256: str | None = None) -> dict[str, Any]:
    """Read and check a plugin file: it exists, is a plugin file, holds ``method`` and fits ``base_sha256``."""
    path = Path(path)
    if not path.is_file():
        hint = f"run `dvc repro train@{method}`" if method else "run `dvc repro train`"
        raise FileNotFoundError(f"{path}: no plugin file ({hint})")
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of a truncated or foreign file
        raise PluginFileError(f"{path}: not a readable plugin file ({load_error_reason(exc)}); "
                              "re-run training or pass the right --plugin") from None
    if not isinstance(obj, dict) or any(k not in obj for k in REQUIRED_KEYS):
        raise PluginFileError(f"{path}: not a plugin file (expected a dict with keys method, state_dict, config, "
                              "base_sha256, written by the train stage)")
    if method is not None and obj["method"] != method:
        raise PluginFileError(f"{path}: holds weights of method {obj['method']!r}, not {method!r}; "
                              f"pass --method {obj['method']} or the {method} plugin file")
    saved_base = obj.get("base_sha256")
    if base_sha256 and saved_base and saved_base != base_sha256:
        raise PluginFileError(f"{path}: trained on SAM checkpoint {str(saved_base)[:12]}..., but the base is "
                              f"{base_sha256[:12]}...; use the base it was trained on or retrain the plugin")
    return obj


__all__ = ["PluginFileError", "read_plugin_file", "save_plugin_file"]
