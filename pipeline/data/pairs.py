"""Finding and validating image/mask pairs: the records of the index (:class:`IndexRow`,
:class:`QuarantineRow`), pairing a set's files by stem (:func:`list_set`), and the one-pair check shared by
the index stage and user datasets (:func:`validate_pair`: read once as a regular file, hash, decode, sizes
agree, mask not empty). A bad file becomes a quarantine row with a stable, human-readable reason.
"""
from __future__ import annotations

import collections
import hashlib
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pipeline.config import IndexConfig
from pipeline.data.images import (
    IMAGE_EXTENSIONS,
    MASK_EXTENSIONS,
    DecodeError,
    image_to_rgb,
    mask_to_bool,
    open_image,
)
from pipeline.data.layout import SetLayout


log = logging.getLogger(__name__)


# Short machine-readable categories of quarantine reasons (summary table only; not a column).
Kind = Literal[
    "stray_file", "stray_folder", "no_mask", "no_image", "duplicate", "unreadable",
    "image_undecodable", "mask_undecodable", "size_mismatch", "empty_mask",
]


@dataclass(frozen=True)
class IndexRow:
    """One valid image/mask pair (a row of ``index.parquet``); ``box`` is inclusive ``[x0, y0, x1, y1]``."""

    sample_id: str
    dataset: str
    split: str
    image_path: str
    mask_path: str
    height: int
    width: int
    mask_area: int
    box: tuple[float, float, float, float]
    content_sha256: str


@dataclass(frozen=True)
class QuarantineRow:
    """One rejected file (a row of ``quarantine.parquet``, plus its reason's category ``kind``)."""

    path: str
    dataset: str
    reason: str
    kind: Kind


# Listing: pair files by stem, quarantine what cannot be paired
@dataclass(frozen=True)
class Candidate:
    """An image/mask pair matched by name, not yet decoded (paths relative to the dataset root)."""

    stem: str
    image_path: str
    mask_path: str


def list_set(root: Path, layout: SetLayout) -> tuple[list[Candidate], list[QuarantineRow]]:
    """Pair a set's files by stem; returns candidates sorted by stem and listing-level quarantine rows.

    The set's folders must exist (checked by :func:`check_folders`).
    """
    images: dict[str, list[str]] = collections.defaultdict(list)
    masks: dict[str, list[str]] = collections.defaultdict(list)
    quarantine: list[QuarantineRow] = []
    if layout.side_by_side:  # one folder; .png there is the mask
        image_exts = tuple(e for e in IMAGE_EXTENSIONS if e not in MASK_EXTENSIONS)
        folders = [(layout.image_dir, "image")]
    else:
        image_exts = IMAGE_EXTENSIONS
        folders = [(layout.image_dir, "image"), (layout.mask_dir, "mask")]
    for rel_dir, role in folders:
        for entry in sorted(os.scandir(root / rel_dir), key=lambda e: e.name):
            rel = f"{rel_dir}/{entry.name}"
            stem, ext = os.path.splitext(entry.name)
            ext = ext.lower()

            def stray(detail: str, kind: str = "stray_file") -> None:
                quarantine.append(QuarantineRow(rel, layout.name, detail, kind))

            if entry.is_dir():
                stray("stray folder (sets are flat; not scanned)", "stray_folder")
            elif entry.name.startswith("."):
                stray("stray file (hidden file, e.g. .DS_Store or a macOS ._ resource fork)")
            elif ext in MASK_EXTENSIONS and (layout.side_by_side or role == "mask"):
                masks[stem].append(rel)
            elif ext in image_exts and role == "image":
                images[stem].append(rel)
            elif role == "mask":
                stray(f"stray file (unexpected extension {ext or '(none)'!r} in a mask folder; masks are .png)")
            else:
                stray(f"stray file (unexpected extension {ext or '(none)'!r}; images are {'/'.join(image_exts)})")

    candidates: list[Candidate] = []
    for stem in sorted(set(images) | set(masks)):
        ims, mks = images.get(stem, []), masks.get(stem, [])
        if len(ims) > 1:
            listed = ", ".join(ims)
            for p in ims:
                reason = f"duplicate image for stem {stem!r}: {listed}"
                quarantine.append(QuarantineRow(p, layout.name, reason, "duplicate"))
            for p in mks:
                quarantine.append(QuarantineRow(p, layout.name, f"mask's image is ambiguous: {listed}", "duplicate"))
        elif ims and not mks:
            expected = f"{layout.mask_dir}/{stem}{MASK_EXTENSIONS[0]}"
            quarantine.append(QuarantineRow(ims[0], layout.name, f"no mask for image (expected {expected})", "no_mask"))
        elif mks and not ims:
            quarantine.append(QuarantineRow(mks[0], layout.name, "no image for mask", "no_image"))
        else:
            candidates.append(Candidate(stem, ims[0], mks[0]))
    return candidates, quarantine


# Validation of one pair
def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    """Tight inclusive box ``(x0, y0, x1, y1)`` of a non-empty ``bool [H, W]`` mask."""
    cols, rows = mask.any(axis=0), mask.any(axis=1)
    if not cols.any():
        raise ValueError("mask_box: empty mask")
    x0, y0 = int(cols.argmax()), int(rows.argmax())
    x1, y1 = len(cols) - 1 - int(cols[::-1].argmax()), len(rows) - 1 - int(rows[::-1].argmax())
    return float(x0), float(y0), float(x1), float(y1)


MAX_FILE_BYTES = 1 << 30  # no image of the HQ sets comes near 1 GiB; a bigger "image" is not one


def read_regular_file(path: Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of ``path`` if it is (or links to) a regular file of at most ``max_bytes``; else ``OSError``.

    Checked before opening, so a named pipe (which would block ``open`` forever) or a link to a device such
    as ``/dev/zero`` (endless bytes) is refused instead of hanging or exhausting memory.
    """
    st = os.stat(path)  # follows links: what would actually be read
    if not stat.S_ISREG(st.st_mode):
        kind = ("named pipe" if stat.S_ISFIFO(st.st_mode) else "device" if stat.S_ISCHR(st.st_mode) or
                stat.S_ISBLK(st.st_mode) else "socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
        raise OSError(f"not a regular file ({kind})")
    if st.st_size > max_bytes:
        raise OSError(f"{st.st_size} bytes, more than the {max_bytes} an image or mask may have")
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"grew past {max_bytes} bytes while being read")
    return data


def validate_pair(
    root: Path, cand: Candidate, dataset: str, split: str, cfg: IndexConfig
) -> IndexRow | QuarantineRow:
    """Read, hash and decode one candidate pair; an :class:`IndexRow` if valid, else a :class:`QuarantineRow`."""
    try:
        image_bytes = read_regular_file(root / cand.image_path)
    except OSError as exc:
        return QuarantineRow(cand.image_path, dataset, f"image not readable: {exc.strerror or exc}", "unreadable")
    try:
        mask_bytes = read_regular_file(root / cand.mask_path)
    except OSError as exc:
        return QuarantineRow(cand.mask_path, dataset, f"mask not readable: {exc.strerror or exc}", "unreadable")
    try:
        image = open_image(image_bytes)
        if image.mode != "RGB":
            image_to_rgb(image)  # proves the conversion every later stage does works
    except DecodeError as exc:
        return QuarantineRow(cand.image_path, dataset, f"image not decodable: {exc}", "image_undecodable")
    try:
        mask_img = open_image(mask_bytes)
        mask = mask_to_bool(mask_img, cfg.mask_threshold)
    except DecodeError as exc:
        return QuarantineRow(cand.mask_path, dataset, f"mask not decodable: {exc}", "mask_undecodable")
    (iw, ih), (mw, mh) = image.size, mask_img.size
    if (iw, ih) != (mw, mh):
        reason = f"mask size {mw}x{mh} != image size {iw}x{ih}"
        if (iw, ih) == (mh, mw) and image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
            reason += " (the image's EXIF orientation rotates it; masks follow the stored raster)"
        return QuarantineRow(cand.mask_path, dataset, reason, "size_mismatch")
    area = int(np.count_nonzero(mask))
    if area < cfg.min_mask_pixels:
        return QuarantineRow(
            cand.mask_path, dataset,
            f"empty mask ({area} px > {cfg.mask_threshold}; need >= {cfg.min_mask_pixels})", "empty_mask",
        )
    digest = hashlib.sha256()
    digest.update(image_bytes)
    digest.update(mask_bytes)
    return IndexRow(
        sample_id=f"{dataset}/{cand.stem}", dataset=dataset, split=split,
        image_path=cand.image_path, mask_path=cand.mask_path, height=ih, width=iw,
        mask_area=area, box=mask_box(mask), content_sha256=digest.hexdigest(),
    )


__all__ = ["Candidate", "IndexRow", "Kind", "MAX_FILE_BYTES", "QuarantineRow", "list_set", "mask_box",
           "read_regular_file", "validate_pair"]
