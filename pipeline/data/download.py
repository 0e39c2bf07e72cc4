"""Acquire the HQSeg-44K tree: download + verify + extract the three archives, or generate a stand-in.

``download_hqseg44k`` fetches ``{download.endpoint}/{archive}`` for each of ``download.archives`` into
``download.cache_dir`` (resumable), verifies each against ``download.expected_sha256`` (params win) or
the sha256/size recorded in ``<cache_dir>/SHA256SUMS.json`` on the first successful run, extracts each
archive safely into a staging folder next to ``out_root`` (an extracted archive survives a killed run),
and finally moves the HQSeg-44K top folders into ``out_root`` in one atomic rename, with
``out_root/MANIFEST.json``. A killed run therefore never leaves ``out_root`` looking complete.

    python -m stages.download --params params.yaml --out data/hqseg44k
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from pipeline.common.archive import ArchiveError, safe_extract_zip
from pipeline.common.atomic import atomic_path, atomic_write_json
from pipeline.common.http import ChecksumError, DownloadError, download_file
from pipeline.config import DownloadConfig, Params
from pipeline.data.layout import HQSEG_SETS, SetLayout

log = logging.getLogger(__name__)

SUMS_NAME = "SHA256SUMS.json"
MANIFEST_NAME = "MANIFEST.json"
FORMAT_VERSION = 1


def acquire_dataset(cfg: Params, out_root: Path) -> dict[str, Any]:
    """Produce the HQSeg-44K tree at ``out_root`` from ``data.source``; return a short summary dict."""
    out_root = Path(out_root)
    if cfg.data.source == "hqseg44k":
        return download_hqseg44k(cfg, out_root)
    from pipeline.data.synthetic import generate_dataset  # the embedded stand-in (no network)

    summary = generate_dataset(out_root, cfg.generate)
    return {"source": "embedded", "root": str(out_root), **(summary or {})}


def download_hqseg44k(cfg: Params, out_root: Path) -> dict[str, Any]:
    """Download, verify and extract ``download.archives`` so ``out_root`` holds the HQSeg-44K tree.

    Returns ``{"source", "root", "skipped", "archives": {name: {"url", "sha256", "size", "files"}},
    "missing_sets"}``; ``skipped`` is True when ``out_root`` was already complete for the same archives.
    Raises :class:`DownloadError` (network, checksum) or :class:`ArchiveError` (unsafe/corrupt zip).
    """
    dl = cfg.download
    out_root = Path(out_root)
    cache = Path(dl.cache_dir)
    sums_path = cache / SUMS_NAME
    sums = _read_json(sums_path)

    done = _complete_manifest(out_root, dl.archives, dl.expected_sha256, sums)
    if done is not None:
        log.info("%s is complete (%s); nothing to do", out_root, MANIFEST_NAME)
        return _summary(out_root, done, skipped=True)

    staging = out_root.parent / f".{out_root.name}.staging"
    archives: dict[str, dict[str, Any]] = {}
    missing: list[str] = []
    for name in dl.archives:
        url = f"{dl.endpoint.rstrip('/')}/{name}"
        zip_path = cache / name
        digest, size = _fetch(url, zip_path, name, dl.expected_sha256.get(name), sums.get(name), sums_path, dl)
        files = _extract(zip_path, name, digest, staging)
        sums[name] = {"sha256": digest, "size": size}
        atomic_write_json(sums_path, sums)  # recorded only once the archive proved to be a valid zip
        missing += _missing_sets(staging / _stem(name), name)
        archives[name] = {"url": url, "sha256": digest, "size": size, "files": files}

    manifest = {
        "format_version": FORMAT_VERSION,
        "source": "hqseg44k",
        "endpoint": dl.endpoint,
        "archives": archives,
        "missing_sets": sorted(missing),
    }
    _assemble(out_root, staging, dl.archives, manifest)
    for name in missing:
        log.warning("set %s: its folders are not in the archive; the index stage will find no images", name)
    return _summary(out_root, manifest, skipped=False)


# --------------------------------------------------------------------------------------------------
def _stem(archive: str) -> str:
    return archive[: -len(".zip")] if archive.endswith(".zip") else archive


def _top_folders(archive: str) -> list[str]:
    """The top-level folders of the HQSeg-44K tree that ``archive`` ships (from the layout table)."""
    tops = {s.image_dir.split("/")[0] for s in HQSEG_SETS if s.archive == archive}
    tops |= {s.mask_dir.split("/")[0] for s in HQSEG_SETS if s.archive == archive}
    return sorted(tops) or [_stem(archive)]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DownloadError(f"{path}: not valid JSON ({exc}); delete it and re-run (it is re-recorded)") from None
    if not isinstance(data, dict):
        raise DownloadError(f"{path}: expected a JSON object; delete it and re-run (it is re-recorded)")
    return data


def _complete_manifest(
    out_root: Path, archives: tuple[str, ...], expected: dict[str, str], sums: dict[str, Any]
) -> dict[str, Any] | None:
    """The manifest of ``out_root`` if it is complete for these archives and checksums, else None."""
    path = out_root / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        recorded = {name: manifest["archives"][name]["sha256"] for name in archives}
    except (json.JSONDecodeError, KeyError, TypeError):
        return None
    if manifest.get("format_version") != FORMAT_VERSION or set(manifest["archives"]) != set(archives):
        return None
    for name in archives:
        want = expected.get(name) or (sums.get(name) or {}).get("sha256")
        if want and want.lower() != recorded[name]:
            return None
    return manifest


def _fetch(
    url: str, zip_path: Path, name: str, param_sha: str | None, record: dict[str, Any] | None,
    sums_path: Path, dl: DownloadConfig,
) -> tuple[str, int]:
    """Download (or reuse) one archive, verified against params or the recorded sums; (sha256, size)."""
    record = record or {}
    sha = param_sha or record.get("sha256") or None
    same = bool(record.get("sha256")) and (not param_sha or param_sha.lower() == record["sha256"])
    size = record.get("size") if same else None
    try:
        digest = download_file(
            url, zip_path, expected_sha256=sha, expected_size=size,
            timeout_s=dl.timeout_s, retries=dl.retries, desc=name,
        )
    except ChecksumError as exc:
        source = f"download.expected_sha256.{name} in params" if param_sha else f"the entry {name!r} in {sums_path}"
        raise ChecksumError(
            f"{exc}\nThe expected value comes from {source}. If the upstream archive legitimately changed, "
            "correct or remove that value and re-run.",
            url=exc.url, path=exc.path, expected=exc.expected, actual=exc.actual,
        ) from None
    return digest, zip_path.stat().st_size


def _extract(zip_path: Path, name: str, digest: str, staging: Path) -> int:
    """Extract one archive into ``staging/<stem>`` unless a marker says it already was; file count."""
    target = staging / _stem(name)
    marker = staging / f"{_stem(name)}.extracted.json"
    if marker.is_file() and target.is_dir():
        info = _read_json(marker)
        if info.get("sha256") == digest:
            log.info("%s: already extracted in %s", name, target)
            return int(info.get("files", 0))
    if marker.exists():
        marker.unlink()
    files = safe_extract_zip(zip_path, target)
    _unwrap(target, name)
    atomic_write_json(marker, {"sha256": digest, "files": len(files)})
    return len(files)


def _unwrap(target: Path, name: str) -> None:
    """Normalise the archive's root to the HQSeg-44K top folders.

    Accepted: the top folders themselves (``DIS5K/...``, the documented layout), one extra wrapping
    folder (``data/DIS5K/...``: moved up), or a single-top archive that lacks it (``DIS-TR/...``: wrapped
    into ``DIS5K/``). Anything else is an error listing what the archive holds.
    """
    tops = _top_folders(name)
    if any((target / t).is_dir() for t in tops):
        return
    children = [c for c in target.iterdir() if c.name != "__MACOSX"]
    dirs = [c for c in children if c.is_dir()]
    if len(dirs) == 1 and any((dirs[0] / t).is_dir() for t in tops):
        wrapper = dirs[0].rename(target / f".{dirs[0].name}.unwrap")
        for child in wrapper.iterdir():
            os.replace(child, target / child.name)
        shutil.rmtree(wrapper)
        return
    if len(tops) == 1:
        subs = {d.split("/")[1] for s in HQSEG_SETS if s.archive == name for d in (s.image_dir, s.mask_dir)
                if "/" in d}
        if any((target / sub).is_dir() for sub in subs):
            holder = target / f".{tops[0]}.wrap"
            holder.mkdir()
            for child in children:
                os.replace(child, holder / child.name)
            holder.rename(target / tops[0])
            return
    found = ", ".join(sorted(c.name for c in target.iterdir())) or "nothing"
    raise ArchiveError(
        f"{name}: none of the expected top folders {tops} is in the archive (found: {found}); the archive "
        "does not have the HQSeg-44K layout (pipeline/data/layout.py): check download.endpoint/archives"
    )


def _missing_sets(extracted: Path, name: str) -> list[str]:
    sets: list[SetLayout] = [s for s in HQSEG_SETS if s.archive == name]
    return [s.name for s in sets if not ((extracted / s.image_dir).is_dir() and (extracted / s.mask_dir).is_dir())]


def _assemble(out_root: Path, staging: Path, archives: tuple[str, ...], manifest: dict[str, Any]) -> None:
    """Move every archive's top folders from staging into ``out_root`` with one atomic rename."""
    with atomic_path(out_root) as tmp:
        tmp.mkdir()
        for name in archives:
            src = staging / _stem(name)
            (staging / f"{_stem(name)}.extracted.json").unlink(missing_ok=True)  # staging is consumed now
            for top in _top_folders(name):
                if not (src / top).exists():
                    continue
                if (tmp / top).exists():
                    raise ArchiveError(f"{name}: folder {top!r} is also shipped by another archive; "
                                       "check download.archives for duplicates")
                os.replace(src / top, tmp / top)
            extras = sorted(c.name for c in src.iterdir()) if src.is_dir() else []
            if extras:
                log.info("%s: ignoring entries outside the HQSeg-44K tree: %s", name, ", ".join(extras[:10]))
        atomic_write_json(tmp / MANIFEST_NAME, manifest)
    shutil.rmtree(staging, ignore_errors=True)


def _summary(out_root: Path, manifest: dict[str, Any], *, skipped: bool) -> dict[str, Any]:
    return {
        "source": "hqseg44k",
        "root": str(out_root),
        "skipped": skipped,
        "archives": manifest["archives"],
        "missing_sets": manifest.get("missing_sets", []),
    }


def run_download(params: Params, out: Path | None = None) -> dict[str, Any]:
    """The ``download`` stage: :func:`acquire_dataset` into ``out`` (default ``data.root``); prints a summary."""
    out = Path(out or params.data.root)
    summary = acquire_dataset(params, out)
    print(f"{summary.get('source')}: dataset at {out}" + (" (already complete)" if summary.get("skipped") else ""))
    for name, info in (summary.get("archives") or {}).items():
        print(f"  {name}: {info['files']} files, {info['size']} bytes, sha256 {info['sha256']}")
    for name, info in (summary.get("sets") or {}).items():
        print(f"  {name}: {info}")
    if summary.get("missing_sets"):
        print(f"  WARNING: sets missing from the archives: {', '.join(summary['missing_sets'])}")
    return summary


__all__ = ["MANIFEST_NAME", "SUMS_NAME", "acquire_dataset", "download_hqseg44k", "run_download"]
