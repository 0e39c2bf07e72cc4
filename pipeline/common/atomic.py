"""Atomic file outputs: write to a temporary sibling, fsync, then rename.

A killed run therefore never leaves a half-written file (or folder) under the final name. A write that
fails (full disk, read-only folder) leaves the previous output exactly as it was, removes its temporaries
and raises :class:`OutputWriteError` naming the output and the fix.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import io
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

log = logging.getLogger(__name__)

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


class OutputWriteError(OSError):
    """An output could not be written (full disk, read-only folder ...); the previous output is unchanged.

    ``errno`` is the underlying error's; the message names the output and what to do.
    """


def _reason(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def _write_error(dests: Sequence[Path], exc: OSError, where: Path | None = None) -> OutputWriteError:
    """``exc`` re-worded as an :class:`OutputWriteError` naming ``dests`` and the fix."""
    names = ", ".join(str(d) for d in dests)
    folder = where or dests[0].parent
    if exc.errno in _DISK_FULL or "No space left on device" in str(exc):
        fix = f"free disk space on the drive holding {folder} and re-run"
    elif exc.errno in _NOT_WRITABLE:
        fix = f"make {folder} writable (e.g. chmod -R u+w {folder}) and re-run"
    else:
        fix = f"check that {folder} is a writable folder and re-run"
    err = OutputWriteError(f"{names}: cannot write the output ({_reason(exc)}); {fix}; "
                           "the previous output, if any, is unchanged")
    err.errno = exc.errno
    return err


def _is_write_fault(exc: OSError, temps: Sequence[Path], dests: Sequence[Path]) -> bool:
    """Whether an ``OSError`` raised while the caller filled a temporary is about writing it (and not,
    say, a missing input file the caller was reading)."""
    if isinstance(exc, OutputWriteError):
        return False
    if exc.errno in _DISK_FULL or "No space left on device" in str(exc):
        return True
    if exc.errno in _NOT_WRITABLE:
        name = str(exc.filename or "")
        places = [str(p) for p in (*temps, *(d.parent for d in dests))]
        return not name or any(name.startswith(p) for p in places)
    return False


def _unwritable_folders(dest: Path) -> list[Path]:
    """Folders in ``dest``'s tree whose entries could not be deleted (so an old copy could not be removed)."""
    if not dest.is_dir() or dest.is_symlink():
        return []
    bad = []
    for folder, subdirs, _files in os.walk(dest):
        if not os.access(folder, os.W_OK | os.X_OK):
            bad.append(Path(folder))
        subdirs[:] = [s for s in subdirs if not os.path.islink(os.path.join(folder, s))]
    return bad


def _old_name(dest: Path) -> Path:
    return dest.with_name(f".{dest.name}.old")


def _check_replaceable(dest: Path) -> None:
    """Refuse, before anything changes, a swap that could not finish (a stale or undeletable old copy)."""
    old = _old_name(dest)
    if old.exists() or old.is_symlink():
        _remove(old)
        if old.exists() or old.is_symlink():
            raise OutputWriteError(f"{dest}: a left-over {old} cannot be removed; delete it (or make it "
                                   "writable) and re-run")
    bad = _unwritable_folders(dest)
    if bad:
        raise OutputWriteError(f"{dest}: the previous output cannot be replaced: {bad[0]} is not writable; make it "
                               f"writable (chmod -R u+w {dest}) or delete it, and re-run; it is unchanged")


def _commit(tmp: Path, dest: Path) -> None:
    """Rename ``tmp`` onto ``dest`` (a folder is swapped via ``.<name>.old``, put back if the swap fails)."""
    if dest.is_dir() and not dest.is_symlink():
        old = _old_name(dest)
        os.replace(dest, old)
        try:
            os.replace(tmp, dest)
        except OSError as exc:
            try:
                os.replace(old, dest)  # the previous output goes back under its name
            except OSError:
                raise OutputWriteError(f"{dest}: cannot write the output ({_reason(exc)}) nor restore the previous "
                                       f"one: it is in {old}; rename it back to {dest.name} or re-run") from exc
            raise
        shutil.rmtree(old, ignore_errors=True)
        if old.exists():
            log.warning("%s: could not remove the previous output's copy %s; delete it", dest, old)
    else:
        if tmp.is_file():
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, dest)


def _remove(tmp: Path) -> None:
    if tmp.is_dir() and not tmp.is_symlink():
        shutil.rmtree(tmp, ignore_errors=True)
    elif tmp.exists() or tmp.is_symlink():
        with contextlib.suppress(OSError):
            tmp.unlink()


def _sweep_stale_temps(dest: Path, keep: Sequence[Path] = ()) -> None:
    """Remove temporaries of ``dest`` left by killed earlier writers (``.<name>.<8 random chars>.tmp``, as
    :func:`_temp_for` names them), once ``dest`` itself is complete: inside a DVC output they would
    otherwise be cached as part of it."""
    pattern = re.compile(rf"\.{re.escape(dest.name)}\.[a-z0-9_]{{8}}\.tmp")
    for stale in dest.parent.glob(f".{glob.escape(dest.name)}.*.tmp"):
        if pattern.fullmatch(stale.name) and stale not in keep:
            log.info("removing %s, left by an interrupted write of %s", stale, dest)
            _remove(stale)


def _temp_for(dest: Path) -> Path:
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    except OSError as exc:
        raise _write_error([dest], exc) from exc
    tmp.rmdir()  # the caller decides whether it is a file or a folder
    return tmp


@contextlib.contextmanager
def atomic_paths(*dests: str | os.PathLike[str]) -> Iterator[list[Path]]:
    """Yield one temporary path next to each of ``dests``; on success they are renamed onto them together.

    Every temporary is written before any output is replaced, so a full disk or a read-only folder fails
    with all previous outputs unchanged (:class:`OutputWriteError`); on any exception the temporaries are
    removed.
    """
    paths = [Path(d) for d in dests]
    temps: list[Path] = []
    try:
        for dest in paths:
            temps.append(_temp_for(dest))
        try:
            yield temps
        except OSError as exc:
            if not _is_write_fault(exc, temps, paths):
                raise
            hit = [d for d, t in zip(paths, temps) if exc.filename and str(exc.filename).startswith(str(t))]
            raise _write_error(hit or paths, exc) from exc
        for dest in paths:
            _check_replaceable(dest)
        for dest, tmp in zip(paths, temps):
            try:
                _commit(tmp, dest)
            except OSError as exc:
                raise _write_error([dest], exc) from exc
        for dest in paths:
            _sweep_stale_temps(dest, keep=temps)
    finally:
        for tmp in temps:
            _remove(tmp)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success it is renamed onto ``dest``.

    Works for files and folders alike (the caller creates whatever it wants at the yielded path).
    On an exception the temporary is removed and ``dest`` is untouched; a write fault is an
    :class:`OutputWriteError` naming ``dest`` and the fix.
    """
    with atomic_paths(dest) as (tmp,):
        yield tmp


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``dest`` atomically."""
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``dest`` atomically."""
    atomic_write_bytes(dest, text.encode("utf-8"))


def torch_bytes(obj: Any) -> bytes:
    """``torch.save(obj)`` as bytes. Saved to memory, not to a file: ``torch.save`` records the name of the
    file it writes to inside the archive, so saving to a temporary file would make every save's bytes
    (and sha256) differ."""
    import torch  # imported here: most users of this module never touch torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def atomic_write_torch(dest: str | os.PathLike[str], obj: Any) -> None:
    """``torch.save`` ``obj`` to ``dest`` atomically; the same object always gives the same bytes."""
    atomic_write_bytes(dest, torch_bytes(obj))


def finite_json(obj: Any) -> Any:
    """``obj`` with every NaN/inf float (in nested dicts and lists) replaced by None: strict JSON for
    ``dvc metrics`` and other readers."""
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def atomic_write_json(dest: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON to ``dest`` atomically."""
    atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=True) + "\n")


__all__ = [
    "OutputWriteError", "atomic_path", "atomic_paths", "atomic_write_bytes", "atomic_write_json",
    "atomic_write_text", "atomic_write_torch", "finite_json", "torch_bytes",
]
