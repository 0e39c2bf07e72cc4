"""Stage commands for the flows: the stage list from ``dvc.yaml``, command templates, and a subprocess
runner that streams the child's output line by line (no Prefect, no ML here).

    python -c "from pipeline.flows.commands import dvc_stages; print(dvc_stages('.'))"
"""
from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import yaml

DEFAULT_REPRO = ("dvc", "repro", "{stage}")
DEFAULT_EXP = ("dvc", "exp", "run", "--temp")  # a temporary folder: the workspace stays as it was
_SEP = re.compile(rb"[\r\n]")


class StageFailed(RuntimeError):
    """A stage command exited non-zero; the message names the command and its exit code."""


def dvc_stages(workspace: str | Path) -> list[str]:
    """Top-level stage names of ``<workspace>/dvc.yaml`` in file order (``foreach``/``matrix`` groups by
    their group name: ``dvc repro train`` runs every ``train@*``)."""
    path = Path(workspace) / "dvc.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no dvc.yaml here; pass the params file of a DVC project (its folder)")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    stages = doc.get("stages") if isinstance(doc, dict) else None
    if not isinstance(stages, dict) or not stages:
        raise ValueError(f"{path}: no `stages:` mapping")
    return list(stages)


def select_stages(available: Sequence[str], wanted: Optional[Sequence[str]], source: str = "dvc.yaml") -> list[str]:
    """``wanted`` (in ``available``'s order) or all; an unknown name raises ``ValueError`` listing the known."""
    if not wanted:
        return list(available)
    unknown = [s for s in wanted if s not in available]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown} in {source}; known: {', '.join(available)}")
    return [s for s in available if s in set(wanted)]


def resolve_program(cmd: Sequence[str]) -> list[str]:
    """``cmd`` with a bare program name (``dvc``) found on PATH or, failing that, next to this Python
    (an unactivated virtual environment); raises ``FileNotFoundError`` saying what to install/activate."""
    cmd = list(cmd)
    if not cmd:
        raise ValueError("empty command")
    if os.sep in cmd[0] or shutil.which(cmd[0]):
        return cmd
    sibling = Path(sys.executable).with_name(cmd[0])
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return [str(sibling), *cmd[1:]]
    raise FileNotFoundError(f"{cmd[0]!r} is not on PATH nor next to {sys.executable}: install it in this "
                            "environment (pip install dvc) or activate the environment that has it")


def stage_command(template: Sequence[str], stage: str) -> list[str]:
    """``template`` with ``{stage}`` substituted in every word."""
    return [word.replace("{stage}", stage) for word in template]


def exp_command(template: Sequence[str], overrides: Mapping[str, Any]) -> list[str]:
    """``dvc exp run`` plus ``-S key=value`` per override (non-strings as JSON, which DVC reads as YAML)."""
    cmd = list(template)
    for key, value in overrides.items():
        text = value if isinstance(value, str) else json.dumps(value)
        cmd += ["-S", f"{key}={text}"]
    return cmd


def stream_command(cmd: Sequence[str], cwd: str | Path, on_line: Callable[[str], None], *,
                   env: Optional[Mapping[str, str]] = None, progress_interval_s: float = 10.0) -> int:
    """Run ``cmd`` in ``cwd``, calling ``on_line`` for every output line (stdout and stderr merged) as it
    comes; returns the exit code.

    Lines ended by a bare ``\\r`` (progress bars such as tqdm redrawing) are passed on at most once per
    ``progress_interval_s``. If the caller is interrupted, the child's whole process group is terminated.
    """
    full_env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(resolve_program(cmd), cwd=str(cwd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, env=full_env, start_new_session=True)
    assert proc.stdout is not None
    buf = b""
    last_progress = float("-inf")
    try:
        while True:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            while (m := _SEP.search(buf)) is not None:
                i = m.start()
                if buf[i:i + 1] == b"\r" and i + 1 == len(buf):
                    break  # a "\r\n" may be split across reads: wait for the next byte
                newline = buf[i:i + 2] == b"\r\n" or buf[i:i + 1] == b"\n"
                line = buf[:i].decode("utf-8", "replace").rstrip()
                buf = buf[i + (2 if buf[i:i + 2] == b"\r\n" else 1):]
                if not line.strip():
                    continue
                if newline:
                    on_line(line)
                elif time.monotonic() - last_progress >= progress_interval_s:
                    last_progress = time.monotonic()
                    on_line(line)
        if buf.strip():
            on_line(buf.decode("utf-8", "replace").rstrip())
        return proc.wait()
    except BaseException:
        _terminate(proc)
        raise
    finally:
        proc.stdout.close()


def _terminate(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    """SIGTERM the child's process group (it was started in its own session), SIGKILL after ``grace_s``."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def describe(cmd: Sequence[str]) -> str:
    return shlex.join(list(cmd))


__all__ = ["DEFAULT_EXP", "DEFAULT_REPRO", "StageFailed", "describe", "dvc_stages", "exp_command",
           "resolve_program", "select_stages", "stage_command", "stream_command"]
