"""Resumable training checkpoints (the published plugin file is pipeline.modeling.plugin_file).

``<checkpoints>/<method>.ckpt``: plugin weights, optimiser state, step, RNG states (torch, CUDA, numpy,
python), every rank's reader position, the loss history and the config. Written atomically and read with
``torch.load(..., weights_only=True)``: RNG states are stored as tensors and plain Python lists, never
pickled objects.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from pipeline.common.torch_files import load_error_reason
from pipeline.common.atomic import atomic_write_torch
from pipeline.common.cli import StageError

CKPT_VERSION = 1


class CheckpointError(StageError):
    """A resume checkpoint that cannot be used (unreadable, foreign, another version); the message names the
    file and the fix."""


def capture_rng() -> dict[str, Any]:
    """The global RNG states, in a ``weights_only``-loadable form."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: Mapping[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Atomically ``torch.save`` a resume checkpoint (tensors moved to the CPU); the same state always gives
    the same bytes, whatever the file's name."""
    atomic_write_torch(path, {"version": CKPT_VERSION, **_cpu(dict(payload))})


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read a resume checkpoint (``weights_only=True``); a foreign or broken file raises
    :class:`CheckpointError` naming it and the fix."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of a truncated, foreign or random file
        raise CheckpointError(f"{path}: unreadable training checkpoint ({load_error_reason(exc)}); "
                              "delete it to start over, or run without --resume") from None
    if not isinstance(ckpt, dict) or ckpt.get("version") != CKPT_VERSION:
        raise CheckpointError(f"{path}: not a version-{CKPT_VERSION} training checkpoint; delete it to start over, "
                              "or run without --resume")
    return ckpt
