"""One DVC run per workspace at a time: an exclusive ``flock`` on a file inside the workspace.

DVC itself fails (rather than waits) when a second ``dvc repro`` meets its lock, and a Prefect
concurrency limit lives in the Prefect server (lost with an ephemeral one). A file lock works with any
server, across processes and threads (``flock`` locks belong to the open file, and each acquisition
opens the file anew), and the kernel releases it when a holder dies.

    python -c "from pipeline.flows.locking import workspace_lock; import time; \\
with workspace_lock('.'): time.sleep(5)"
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Iterator, Optional


class LockTimeout(TimeoutError):
    """The workspace stayed locked by another run for longer than the timeout."""


def lock_path(workspace: str | Path) -> Path:
    """``.dvc/tmp/pipeline-flow.lock`` in a DVC project (git-ignored by DVC), else ``.pipeline-flow.lock``."""
    workspace = Path(workspace)
    if (workspace / ".dvc").is_dir():
        return workspace / ".dvc" / "tmp" / "pipeline-flow.lock"
    return workspace / ".pipeline-flow.lock"


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "unknown"
    except OSError:
        return "unknown"


@contextlib.contextmanager
def workspace_lock(workspace: str | Path, *, timeout_s: Optional[float] = None, poll_s: float = 0.5,
                   on_wait: Optional[Callable[[str], None]] = None, owner: str = "") -> Iterator[Path]:
    """Hold the workspace's lock for the ``with`` block; wait (forever, or ``timeout_s``) while another run
    holds it, telling ``on_wait`` once who holds it. Raises :class:`LockTimeout` on timeout."""
    path = lock_path(workspace)
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")
    locked = False
    try:
        start = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if not told and on_wait is not None:
                    on_wait(f"workspace {workspace} is busy ({path}: {_holder(path)}); waiting")
                    told = True
                if timeout_s is not None and time.monotonic() - start > timeout_s:
                    raise LockTimeout(f"{path}: still held after {timeout_s:g} s by {_holder(path)}") from None
                time.sleep(poll_s)
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "owner": owner,
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        fh.flush()
        yield path
    finally:
        if locked:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


__all__ = ["LockTimeout", "lock_path", "workspace_lock"]
