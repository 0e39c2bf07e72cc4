"""One DVC run per workspace at a time: an exclusive ``flock`` on a file inside the workspace, and
waiting for DVC's own repo lock (:func:`run_waiting_for_dvc`) when a plain ``dvc`` command holds it.

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


# --------------------------------------------------------------------------------------------------
# DVC's own repo lock: a plain `dvc repro` started outside the flows takes it; a flow's dvc call waits.
DVC_LOCK_MESSAGE = "Unable to acquire lock"  # what dvc prints (and exits 1) when another dvc holds its lock
DEFAULT_DVC_LOCK_TIMEOUT_S = 3600.0


def dvc_lock_path(workspace: str | Path) -> Path:
    """DVC 3's repo lock file, ``.dvc/tmp/lock`` (``zc.lockfile``: an ``flock`` plus the holder's pid)."""
    return Path(workspace) / ".dvc" / "tmp" / "lock"


def dvc_lock_holder(workspace: str | Path) -> Optional[str]:
    """Who holds DVC's repo lock in ``workspace`` (``"pid 123"``), or None when it is free.

    Probes with a non-blocking ``flock`` on the existing file (never creates it); a dvc process that
    tries to lock during the probe's microseconds retries by itself (for 3 s)."""
    path = dvc_lock_path(workspace)
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return None  # no lock file: no dvc has run here yet (or no DVC project)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(path)
            return f"pid {pid}" if pid.isdigit() else pid
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _wait_dvc_lock_free(workspace: str | Path, deadline: float, poll_s: float, log: Callable[[str], None],
                        timeout_s: float, told: list[bool]) -> None:
    while (holder := dvc_lock_holder(workspace)) is not None:
        if not told[0]:
            log(f"DVC's repo lock {dvc_lock_path(workspace)} is held by another dvc process ({holder}); "
                f"waiting up to {timeout_s:g} s for it to finish")
            told[0] = True
        if time.monotonic() >= deadline:
            raise LockTimeout(_dvc_timeout_message(workspace, timeout_s, holder))
        time.sleep(poll_s)


def _dvc_timeout_message(workspace: str | Path, timeout_s: float, holder: str) -> str:
    return (f"{dvc_lock_path(workspace)}: DVC's repo lock still held after {timeout_s:g} s ({holder}); wait for the "
            "other dvc command to finish (or stop it), then run the flow again")


def run_waiting_for_dvc(run: Callable[[Callable[[str], None]], int], workspace: str | Path,
                        on_line: Callable[[str], None], *, timeout_s: float = DEFAULT_DVC_LOCK_TIMEOUT_S,
                        poll_s: float = 1.0, log: Optional[Callable[[str], None]] = None) -> int:
    """Run a dvc command (``run(on_line) -> exit code``), waiting for DVC's repo lock instead of failing on it.

    Before each attempt, waits while another dvc process holds ``.dvc/tmp/lock``; an attempt that still
    fails with DVC's "Unable to acquire lock" (it lost a race, or DVC uses ``core.hardlink_lock``) is
    retried. Logs once (``log``, default ``on_line``) that it waits; after ``timeout_s`` raises
    :class:`LockTimeout` naming the lock and the fix. Returns the exit code of the last attempt.
    """
    say = log or on_line
    deadline = time.monotonic() + timeout_s
    told = [False]
    while True:
        _wait_dvc_lock_free(workspace, deadline, poll_s, say, timeout_s, told)
        lock_failed = False

        def line(text: str) -> None:
            nonlocal lock_failed
            lock_failed = lock_failed or DVC_LOCK_MESSAGE in text
            on_line(text)

        rc = run(line)
        if rc == 0 or not lock_failed:
            return rc
        if time.monotonic() >= deadline:
            raise LockTimeout(_dvc_timeout_message(workspace, timeout_s, dvc_lock_holder(workspace) or "unknown"))
        if not told[0]:
            say(f"another dvc process holds DVC's repo lock in {workspace}; retrying every {poll_s:g} s "
                f"for up to {timeout_s:g} s")
            told[0] = True
        time.sleep(poll_s)


__all__ = [
    "DEFAULT_DVC_LOCK_TIMEOUT_S", "DVC_LOCK_MESSAGE", "LockTimeout", "dvc_lock_holder", "dvc_lock_path",
    "lock_path", "run_waiting_for_dvc", "workspace_lock",
]
