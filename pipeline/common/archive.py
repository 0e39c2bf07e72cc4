"""Safe, atomic extraction of a zip archive.

Every member name is checked BEFORE anything is written: absolute paths, drive letters, ``..``
components and symlinks resolving outside the target are refused ("zip slip"). Members are extracted
into a temporary folder next to the target, with zipfile's CRC check on every member, and the folder
is renamed onto the target only when all of it succeeded; a truncated or corrupted archive fails with
a message naming the archive and the fix (delete it and re-run), leaving no target behind.

    python -c "from pathlib import Path; from pipeline.common.archive import safe_extract_zip; \
print(len(safe_extract_zip(Path('DIS5K.zip'), Path('out/DIS5K_zip'))))"
"""
from __future__ import annotations

import os
import posixpath
import shutil
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from pipeline.common.cli import StageError
from pipeline.common.atomic import atomic_path

_CHUNK = 1 << 20


class ArchiveError(StageError):
    """An archive that cannot be extracted safely; the message names the archive and the fix."""


class UnsafeArchiveError(ArchiveError):
    """A member that would be written (or would point) outside the target folder."""


class CorruptArchiveError(ArchiveError):
    """A truncated or corrupted archive (bad central directory, bad CRC, bad deflate stream)."""


def safe_extract_zip(archive: Path, target: Path) -> list[str]:
    """Extract ``archive`` into the folder ``target`` atomically; return the extracted file names.

    Names are relative POSIX paths (directories and symlinks excluded), in archive order. ``target``
    is replaced as a whole only on success; on any error it is left as it was. Raises
    :class:`UnsafeArchiveError` for zip-slip members and :class:`CorruptArchiveError` for a damaged
    archive. Symlinks are recreated only when they resolve inside the target.
    """
    archive, target = Path(archive), Path(target)
    try:
        zf = zipfile.ZipFile(archive)
    except FileNotFoundError:
        raise ArchiveError(f"{archive}: archive not found") from None
    except (zipfile.BadZipFile, EOFError, OSError) as exc:
        raise _corrupt(archive, exc) from None
    with zf:
        members = _checked_members(archive, zf)
        _check_free_space(archive, zf, target)
        files: list[str] = []
        with atomic_path(target) as tmp:
            tmp.mkdir()
            links: list[tuple[Path, str]] = []
            total = sum(info.file_size for info, _ in members)
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=f"unzip {archive.name}",
                      mininterval=1.0, leave=False) as bar:
                for info, rel in members:
                    out = tmp.joinpath(*rel.parts)
                    if info.is_dir():
                        out.mkdir(parents=True, exist_ok=True)
                        continue
                    out.parent.mkdir(parents=True, exist_ok=True)
                    if _is_symlink(info):
                        links.append((out, _read_member(archive, zf, info).decode("utf-8")))
                        continue
                    _copy_member(archive, zf, info, out, bar)
                    files.append(str(rel))
            _make_links(archive, tmp, links)
    return files


# --------------------------------------------------------------------------------------------------
def _corrupt(archive: Path, exc: BaseException) -> CorruptArchiveError:
    return CorruptArchiveError(
        f"{archive}: truncated or corrupted zip ({type(exc).__name__}: {exc}); delete {archive} and re-run "
        "to download it again"
    )


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def _checked_members(archive: Path, zf: zipfile.ZipFile) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """(info, safe relative path) for every member; raises UnsafeArchiveError on the first bad one."""
    out = []
    for info in zf.infolist():
        name = info.filename
        norm = name.replace("\\", "/")  # a backslash is a separator for whoever extracts on Windows
        parts = [p for p in norm.split("/") if p not in ("", ".")]
        if norm.startswith("/") or (len(norm) > 1 and norm[1] == ":") or ".." in parts:
            raise UnsafeArchiveError(
                f"{archive}: refusing member {name!r}: absolute paths and '..' would write outside the target; "
                "the archive is not a genuine dataset archive: delete it and check the download URL"
            )
        if not parts:
            continue
        rel = PurePosixPath(*parts)
        if _is_symlink(info):
            link = _read_member(archive, zf, info).decode("utf-8", errors="replace")
            resolved = posixpath.normpath(posixpath.join(str(rel.parent), link))
            if link.startswith("/") or resolved == ".." or resolved.startswith("../"):
                raise UnsafeArchiveError(
                    f"{archive}: refusing symlink {name!r} -> {link!r}: it points outside the target; "
                    "delete the archive and check the download URL"
                )
        out.append((info, rel))
    return out


def _check_free_space(archive: Path, zf: zipfile.ZipFile, target: Path) -> None:
    need = sum(info.file_size for info in zf.infolist())
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(parent).free
    if need > free:
        raise ArchiveError(
            f"{archive}: needs {need / 2**30:.2f} GiB to extract but {parent} has {free / 2**30:.2f} GiB free; "
            "free some disk space and re-run"
        )


def _read_member(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        return zf.read(info)
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise _corrupt(archive, exc) from None


def _copy_member(archive: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo, out: Path, bar: tqdm) -> None:
    """Stream one member to ``out``; zipfile checks its CRC-32 when the last byte is read."""
    try:
        src = zf.open(info)
    except NotImplementedError as exc:  # e.g. Deflate64, which Python's zipfile cannot read
        raise ArchiveError(
            f"{archive}: member {info.filename!r}: {exc}; extract the archive with `unzip` or 7-Zip and "
            "re-pack it with standard deflate, or report the archive"
        ) from None
    except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
        raise _corrupt(archive, exc) from None
    with src:
        try:
            dst = open(out, "wb")
        except OSError as exc:
            raise ArchiveError(f"{archive}: cannot write {out}: {exc} (fix permissions / disk)") from None
        with dst:
            while True:
                try:
                    chunk = src.read(_CHUNK)
                except (zipfile.BadZipFile, EOFError, zlib.error, OSError) as exc:
                    raise _corrupt(archive, exc) from None
                if not chunk:
                    break
                try:
                    dst.write(chunk)
                except OSError as exc:
                    raise ArchiveError(f"{archive}: cannot write {out}: {exc} (free disk space)") from None
                bar.update(len(chunk))


def _make_links(archive: Path, root: Path, links: list[tuple[Path, str]]) -> None:
    """Create the (already lexically checked) symlinks, then check each really resolves inside ``root``."""
    for path, link in links:
        if path.exists() or path.is_symlink():
            path.unlink()
        os.symlink(link, path)
    real_root = os.path.realpath(root)
    for path, link in links:
        real = os.path.realpath(path)
        if os.path.commonpath([real_root, real]) != real_root:
            raise UnsafeArchiveError(
                f"{archive}: refusing symlink {path.relative_to(root)} -> {link!r}: through other links it "
                "resolves outside the target; delete the archive and check the download URL"
            )


__all__ = ["ArchiveError", "CorruptArchiveError", "UnsafeArchiveError", "safe_extract_zip"]
