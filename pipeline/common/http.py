"""Resumable, verified download of one file over http(s):// or file:// (standard library only).

The bytes stream into ``<dest>.part``; an interrupted download resumes from there with an HTTP
``Range`` request (a server that ignores ``Range`` and answers ``200`` is handled by starting over).
Only after the size and sha256 are verified is the ``.part`` renamed onto ``dest``, so ``dest`` is
always complete. Used for the HQSeg-44K archives (stage ``download``) and SAM checkpoints (``base``).

    python -c "from pathlib import Path; from pipeline.common.http import download_file; \
print(download_file('https://example.org/x.zip', Path('x.zip')))"
"""
from __future__ import annotations

import http.client
import logging
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm import tqdm

from pipeline.common.cli import StageError
from pipeline.common.hashing import sha256_file

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_USER_AGENT = "stable-sam-pipeline/1.0 (python-urllib)"
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
# HTTP statuses worth retrying: timeouts, throttling and server-side failures.
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(StageError):
    """A download that could not be completed; the message names the URL, the file and the fix."""


class ChecksumError(DownloadError):
    """Downloaded bytes whose size or sha256 differ from what was expected."""

    def __init__(self, message: str, *, url: str, path: Path, expected: str, actual: str) -> None:
        super().__init__(message)
        self.url, self.path, self.expected, self.actual = url, path, expected, actual


class _Transient(Exception):
    """Internal: a failure worth retrying (network error, short read, 5xx)."""


def part_path(dest: Path) -> Path:
    """Where the partial download of ``dest`` lives: ``<dest>.part``."""
    return dest.with_suffix(dest.suffix + ".part")


def download_file(
    url: str,
    dest: Path,
    *,
    expected_sha256: str | None = None,
    expected_size: int | None = None,
    timeout_s: float = 60,
    retries: int = 3,
    desc: str | None = None,
    backoff_s: float = 1.0,
) -> str:
    """Download ``url`` to ``dest`` (resumable, verified, atomic) and return its hex sha256.

    If ``dest`` already exists and matches ``expected_sha256`` (or, with no expected hash, matches
    ``expected_size`` when given) it is returned at once without any network access. Network errors,
    short reads and 408/429/5xx answers are retried ``retries`` times with exponential backoff
    (``backoff_s``, 2x each time), resuming from the ``.part`` file. A size or sha256 mismatch deletes
    the ``.part`` and raises :class:`ChecksumError`; other failures raise :class:`DownloadError`.
    """
    dest = Path(dest)
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in ("http", "https", "file"):
        raise DownloadError(f"{url}: unsupported URL scheme {scheme!r}; use http://, https:// or file://")
    expected_sha256 = expected_sha256.lower() if expected_sha256 else None
    if dest.is_file():
        existing = _existing_ok(dest, expected_sha256, expected_size)
        if existing is not None:
            return existing
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)

    attempt = 0
    while True:
        try:
            _fetch_into(url, part, expected_size, timeout_s, desc or dest.name)
            break
        except _Transient as exc:
            if attempt >= retries:
                have = part.stat().st_size if part.exists() else 0
                raise DownloadError(
                    f"{url}: download failed after {retries + 1} attempts ({exc}); {have} bytes kept in "
                    f"{part}: re-run to resume, or check the network/URL"
                ) from None
            delay = backoff_s * (2**attempt)
            log.warning("%s: %s; retry %d/%d in %.1fs", url, exc, attempt + 1, retries, delay)
            time.sleep(delay)
            attempt += 1

    digest = _verify(url, part, dest, expected_sha256, expected_size)
    with open(part, "rb") as fh:
        os.fsync(fh.fileno())
    os.replace(part, dest)
    return digest


# --------------------------------------------------------------------------------------------------
def _existing_ok(dest: Path, expected_sha256: str | None, expected_size: int | None) -> str | None:
    """sha256 of an existing ``dest`` if it can be reused as is, else None (it will be re-downloaded)."""
    size = dest.stat().st_size
    if expected_size is not None and size != expected_size:
        log.warning("%s: has %d bytes, expected %d; downloading again", dest, size, expected_size)
        return None
    digest = sha256_file(dest)
    if expected_sha256 is not None and digest != expected_sha256:
        log.warning("%s: sha256 %s != expected %s; downloading again", dest, digest, expected_sha256)
        return None
    return digest


def _verify(url: str, part: Path, dest: Path, expected_sha256: str | None, expected_size: int | None) -> str:
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        part.unlink()
        raise ChecksumError(
            f"{url}: downloaded {size} bytes for {dest}, expected {expected_size}; the partial file was "
            "deleted. Re-run to download again; if it persists the upstream file changed: update the "
            "expected size/sha256 in params.",
            url=url, path=dest, expected=str(expected_size), actual=str(size),
        )
    digest = sha256_file(part)
    if expected_sha256 is not None and digest != expected_sha256:
        part.unlink()
        raise ChecksumError(
            f"{url}: sha256 mismatch for {dest}: expected {expected_sha256}, got {digest}; the partial "
            "file was deleted. Re-run to download again; if it persists the upstream file changed (or "
            "the expected sha256 is wrong): update the expected sha256 in params.",
            url=url, path=dest, expected=expected_sha256, actual=digest,
        )
    return digest


def _fetch_into(url: str, part: Path, expected_size: int | None, timeout_s: float, desc: str) -> None:
    """One attempt: append the missing bytes to ``part`` (or restart it). Raises _Transient to retry."""
    offset = part.stat().st_size if part.exists() else 0
    if expected_size is not None and offset > expected_size:
        log.warning("%s: larger than the expected %d bytes; starting over", part, expected_size)
        part.unlink()
        offset = 0
    if expected_size is not None and offset == expected_size and offset > 0:
        return  # complete already; verification decides
    try:
        stream, start, total = _open(url, offset, timeout_s)
    except _RangeDone:
        return
    except _RangeInvalid:  # only raised for offset > 0: the recursion starts at 0 and ends
        log.warning("%s: server rejected resuming at byte %d; starting over", url, offset)
        part.unlink()
        return _fetch_into(url, part, expected_size, timeout_s, desc)
    if start != offset:
        log.info("%s: server did not honour Range (resume at %d); starting over", url, offset)
    try:
        with stream, open(part, "ab" if start else "wb") as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
            desc=desc, mininterval=1.0, leave=False,
        ) as bar:
            got = start
            while True:
                try:
                    chunk = stream.read(_CHUNK)
                except (OSError, http.client.HTTPException) as exc:
                    raise _Transient(f"connection lost at byte {got}: {exc}") from None
                if not chunk:
                    break
                out.write(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    except OSError as exc:  # the local disk, not the network (those became _Transient): do not retry
        raise DownloadError(f"{url}: cannot write {part}: {exc} (free disk space / fix permissions)") from None
    if total is not None and got < total:
        raise _Transient(f"connection closed early: got {got} of {total} bytes")


class _RangeDone(Exception):
    """Internal: the server says the requested range starts at the end (the .part is complete)."""


class _RangeInvalid(Exception):
    """Internal: the server cannot serve the requested range (the .part is unusable)."""


def _open(url: str, offset: int, timeout_s: float, refetch: bool = True) -> tuple[BinaryIO, int, int | None]:
    """Open ``url`` at byte ``offset``; return (stream, actual start offset, total size or None).

    A 206 for another range than the one asked for is answered by one plain (Range-less) request; a server
    that still answers with a range nobody asked for is a :class:`DownloadError`, never a loop.
    """
    if url.lower().startswith("file:"):
        return _open_file(url, offset)
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"})
    if offset:
        request.add_header("Range", f"bytes={offset}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and offset:
            match = re.search(r"\*/(\d+)", exc.headers.get("Content-Range", "") or "")
            exc.close()
            if match and int(match.group(1)) == offset:
                raise _RangeDone() from None
            raise _RangeInvalid() from None
        exc.close()
        if exc.code in _RETRY_STATUS:
            raise _Transient(f"HTTP {exc.code} {exc.reason}") from None
        raise DownloadError(f"{url}: HTTP {exc.code} {exc.reason}; check the URL (and access rights)") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
        raise _Transient(f"cannot connect: {getattr(exc, 'reason', exc)}") from None
    length = response.headers.get("Content-Length")
    if response.status == 206:
        match = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
        if match and int(match.group(1)) == offset:
            total = None if match.group(3) == "*" else int(match.group(3))
            return response, offset, total
        response.close()
        if refetch:  # a range we did not ask for: refetch everything without Range, once
            return _open(url, 0, timeout_s, refetch=False)
        raise DownloadError(f"{url}: the server answers with byte ranges it was not asked for "
                            f"(Content-Range {response.headers.get('Content-Range')!r}); it cannot be downloaded "
                            "reliably: use another mirror (download.endpoint)")
    total = int(length) if length and length.isdigit() else None
    return response, 0, total


def _open_file(url: str, offset: int) -> tuple[BinaryIO, int, int | None]:
    parsed = urllib.parse.urlsplit(url)
    if parsed.netloc not in ("", "localhost"):
        raise DownloadError(f"{url}: file:// URLs must be local (file:///abs/path)")
    path = Path(urllib.request.url2pathname(parsed.path))
    if not path.is_file():
        raise DownloadError(f"{url}: no such file {path}; fix the URL or create the file")
    total = path.stat().st_size
    start = offset if offset <= total else 0
    fh = open(path, "rb")
    fh.seek(start)
    return fh, start, total


__all__ = ["ChecksumError", "DownloadError", "download_file", "part_path"]
