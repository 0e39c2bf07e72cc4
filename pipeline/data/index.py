"""The index stage: pair, decode and validate every HQSeg-44K image/mask, and quarantine the rest.

For each configured set (``data.train_sets + data.eval_sets``; folders from :mod:`pipeline.data.layout`)
files are paired by stem (``<stem>.jpg|.jpeg|.png`` image + ``<stem>.png`` mask; in side-by-side sets
the image must be ``.jpg``/``.jpeg`` since ``.png`` is the mask). Each pair is read once, hashed and
decoded with :mod:`pipeline.data.images`; a pair is valid when both files decode, the sizes agree and
the mask has at least ``index.min_mask_pixels`` pixels > ``index.mask_threshold``. Everything else
(stray files, unpaired files, undecodable or truncated files, size mismatches, empty masks) becomes a
quarantine row with a human-readable reason; a bad file never stops the stage. Errors are only: a
missing set folder (re-run the download stage) and a configured set left with zero valid pairs.

Resumable: with a ``journal`` path, each validated pair's outcome is appended to a JSONL file keyed by
both files' (path, size, mtime) and the index params, and reused on the next run.

    python -m stages.index --params params.yaml --root data/hqseg44k --out data/index --metrics metrics/index.json
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.common.cli import StageError
from pipeline.common.atomic import atomic_path, atomic_write_json
from pipeline.config import IndexConfig, Params
from pipeline.data.images import IMAGE_EXTENSIONS, MASK_EXTENSIONS, DecodeError, image_to_rgb, mask_to_bool, open_image
from pipeline.data.layout import SetLayout, get_set

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
INDEX_FILE = "index.parquet"
QUARANTINE_FILE = "quarantine.parquet"
METADATA_KEY = b"stable_sam"

INDEX_SCHEMA = pa.schema([
    ("sample_id", pa.string()),
    ("dataset", pa.string()),
    ("split", pa.string()),
    ("image_path", pa.string()),
    ("mask_path", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("mask_area", pa.int64()),
    ("box", pa.list_(pa.float32(), 4)),
    ("content_sha256", pa.string()),
])
QUARANTINE_SCHEMA = pa.schema([("path", pa.string()), ("dataset", pa.string()), ("reason", pa.string())])

# Short machine-readable categories of quarantine reasons (summary table only; not a column).
Kind = Literal[
    "stray_file", "stray_folder", "no_mask", "no_image", "duplicate", "unreadable",
    "image_undecodable", "mask_undecodable", "size_mismatch", "empty_mask",
]


class IndexBuildError(StageError):
    """The index cannot be built (missing set folder, a set with no valid pair); the message says the fix."""


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


@dataclass
class SetSummary:
    """Counts for one set: candidate pairs found by name, valid pairs, quarantined files."""

    name: str
    split: str
    candidates: int = 0
    pairs: int = 0
    quarantined: int = 0
    capped: bool = False
    kinds: collections.Counter = field(default_factory=collections.Counter)


@dataclass
class IndexResult:
    """What :func:`build_index` found: valid rows, quarantine rows and per-set counts."""

    rows: list[IndexRow]
    quarantine: list[QuarantineRow]
    sets: dict[str, SetSummary]
    index_cfg: IndexConfig

    def metrics(self) -> dict[str, Any]:
        """``{set: {"pairs": n, "quarantined": m}, ..., "total": {...}}`` for ``metrics/index.json``."""
        out: dict[str, Any] = {s.name: {"pairs": s.pairs, "quarantined": s.quarantined} for s in self.sets.values()}
        out["total"] = {"pairs": len(self.rows), "quarantined": len(self.quarantine)}
        return out

    def summary_table(self) -> str:
        """A plain-text per-set table (pairs, quarantined, the reasons' categories)."""
        header = ("set", "split", "candidates", "pairs", "quarantined", "reasons")
        lines = [header]
        for s in self.sets.values():
            reasons = ", ".join(f"{n} {k}" for k, n in s.kinds.most_common()) or "-"
            cand = f"{s.candidates}{' (capped)' if s.capped else ''}"
            lines.append((s.name, s.split, cand, str(s.pairs), str(s.quarantined), reasons))
        lines.append(("total", "", str(sum(s.candidates for s in self.sets.values())),
                      str(len(self.rows)), str(len(self.quarantine)), ""))
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        fmt = lambda line: "  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip()  # noqa: E731
        return "\n".join([fmt(lines[0]), fmt(tuple("-" * w for w in widths)), *map(fmt, lines[1:])])


# --------------------------------------------------------------------------------------------------
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


def check_folders(root: Path, names: Iterable[str]) -> None:
    """Raise :class:`IndexBuildError` naming every missing set folder (and the fix)."""
    if not root.is_dir():
        raise IndexBuildError(
            f"{root}: dataset root not found; run the download stage first "
            f"(python -m stages.download --params params.yaml --out {root})"
        )
    missing = []
    for name in names:
        layout = get_set(name)
        for rel in dict.fromkeys((layout.image_dir, layout.mask_dir)):
            if not (root / rel).is_dir():
                missing.append(f"  set {name}: folder {root / rel} not found")
    if missing:
        raise IndexBuildError(
            "missing set folders:\n" + "\n".join(missing) + "\nfix: re-run the download stage "
            f"(python -m stages.download --params params.yaml --out {root}), or remove the set from "
            "data.train_sets / data.eval_sets in params.yaml"
        )


# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
class _Journal:
    """Append-only JSONL of validated pairs, keyed by both files' stat and the index params (resume)."""

    def __init__(self, path: Path, cfg: IndexConfig) -> None:
        self.path = path
        self.salt = json.dumps([FORMAT_VERSION, cfg.mask_threshold, cfg.min_mask_pixels])
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                        self.entries[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a torn last line from a killed run
            log.info("resuming from %s (%d validated pairs)", path, len(self.entries))
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(path, "a", encoding="utf-8")

    def key(self, root: Path, cand: Candidate) -> str | None:
        try:
            stats = [(p, (st := os.stat(root / p)).st_size, st.st_mtime_ns) for p in (cand.image_path, cand.mask_path)]
        except OSError:
            return None
        return hashlib.sha256(json.dumps([self.salt, stats]).encode()).hexdigest()

    def get(self, key: str | None) -> IndexRow | QuarantineRow | None:
        entry = self.entries.get(key) if key else None
        if entry is None:
            return None
        if "row" in entry:
            row = dict(entry["row"])
            return IndexRow(**{**row, "box": tuple(row["box"])})
        return QuarantineRow(**entry["quarantine"])

    def put(self, key: str | None, outcome: IndexRow | QuarantineRow) -> None:
        if key is None:
            return
        tag = "row" if isinstance(outcome, IndexRow) else "quarantine"
        self.fh.write(json.dumps({"key": key, tag: asdict(outcome)}) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


def build_index(
    root: str | Path, cfg: Params, *, journal: str | Path | None = None, progress: bool = True
) -> IndexResult:
    """Pair and validate every configured set under ``root``; see the module docstring.

    ``data.max_images_per_set`` (> 0) keeps the first N valid pairs per set by sorted stem. Raises
    :class:`IndexBuildError` for a missing set folder (before any decoding) or a set with no valid pair.
    """
    root = Path(root)
    names = list(cfg.data.train_sets) + list(cfg.data.eval_sets)
    both = sorted(set(cfg.data.train_sets) & set(cfg.data.eval_sets))
    if both:
        raise IndexBuildError(f"sets listed in both data.train_sets and data.eval_sets: {', '.join(both)}; keep one")
    names = list(dict.fromkeys(names))
    check_folders(root, names)
    cap = cfg.data.max_images_per_set
    rows: list[IndexRow] = []
    quarantine: list[QuarantineRow] = []
    sets: dict[str, SetSummary] = {}
    jr = _Journal(Path(journal), cfg.index) if journal is not None else None
    try:
        for name in names:
            layout = get_set(name)
            summary = sets[name] = SetSummary(name, layout.split)
            candidates, rejected = list_set(root, layout)
            summary.candidates = len(candidates)
            set_q = list(rejected)
            valid = 0
            for cand in tqdm(candidates, desc=f"index {name}", unit="pair", disable=not progress, leave=False):
                if cap and valid >= cap:
                    summary.capped = True
                    break
                key = jr.key(root, cand) if jr else None
                outcome = jr.get(key) if jr else None
                if outcome is None:
                    outcome = validate_pair(root, cand, name, layout.split, cfg.index)
                    if jr:
                        jr.put(key, outcome)
                if isinstance(outcome, IndexRow):
                    rows.append(outcome)
                    valid += 1
                else:
                    set_q.append(outcome)
            set_q.sort(key=lambda q: q.path)
            for q in set_q:
                log.info("quarantine %s: %s: %s", q.dataset, q.path, q.reason)
            quarantine.extend(set_q)
            summary.pairs, summary.quarantined = valid, len(set_q)
            summary.kinds.update(q.kind for q in set_q)
    finally:
        if jr:
            jr.close()
    result = IndexResult(rows, quarantine, sets, cfg.index)
    unusable = [s for s in sets.values() if s.pairs == 0]
    if unusable:
        lines = []
        for s in unusable:
            examples = [f"    {q.path}: {q.reason}" for q in quarantine if q.dataset == s.name][:5]
            lines.append(f"  set {s.name}: 0 valid pairs ({s.candidates} paired by name, {s.quarantined} quarantined)")
            lines.extend(examples)
        raise IndexBuildError(
            "configured sets with no valid image/mask pair (the set is unusable):\n" + "\n".join(lines)
            + f"\nfix: check the files under {root} (re-run the download stage) or remove the set from "
            "data.train_sets / data.eval_sets in params.yaml"
        )
    return result


# --------------------------------------------------------------------------------------------------
def index_table(result: IndexResult) -> pa.Table:
    """``index.parquet``'s table (schema :data:`INDEX_SCHEMA`, index params in the schema metadata)."""
    cols = {name: [getattr(r, name) for r in result.rows] for name in INDEX_SCHEMA.names}
    cols["box"] = [list(b) for b in cols["box"]]
    meta = {
        "format_version": FORMAT_VERSION,
        "mask_threshold": result.index_cfg.mask_threshold,
        "min_mask_pixels": result.index_cfg.min_mask_pixels,
        "sets": list(result.sets),
    }
    schema = INDEX_SCHEMA.with_metadata({METADATA_KEY: json.dumps(meta, sort_keys=True).encode()})
    return pa.table(cols, schema=schema)


def quarantine_table(result: IndexResult) -> pa.Table:
    """``quarantine.parquet``'s table (schema :data:`QUARANTINE_SCHEMA`)."""
    cols = {name: [getattr(q, name) for q in result.quarantine] for name in QUARANTINE_SCHEMA.names}
    return pa.table(cols, schema=QUARANTINE_SCHEMA)


def write_index(result: IndexResult, out_dir: str | Path, metrics_path: str | Path | None = None) -> None:
    """Write ``<out_dir>/index.parquet`` and ``quarantine.parquet`` (one atomic folder swap) and the metrics JSON."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir(parents=True)
        pq.write_table(index_table(result), tmp / INDEX_FILE)
        pq.write_table(quarantine_table(result), tmp / QUARANTINE_FILE)
    if metrics_path is not None:
        atomic_write_json(metrics_path, result.metrics())


def read_index(path: str | Path) -> pa.Table:
    """Read ``index.parquet`` (a file, or the folder holding it) and check its columns."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: index not found; run `python -m stages.index` first")
    table = pq.read_table(path)
    missing = [n for n in INDEX_SCHEMA.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{path}: not an index table (missing columns {missing}); re-run `python -m stages.index`")
    return table


def index_metadata(table: pa.Table) -> dict[str, Any]:
    """The ``stable_sam`` schema metadata of an index table (mask threshold, min pixels, sets, version)."""
    raw = (table.schema.metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


__all__ = [
    "Candidate", "INDEX_SCHEMA", "IndexBuildError", "IndexResult", "IndexRow", "QUARANTINE_SCHEMA",
    "QuarantineRow", "SetSummary", "build_index", "check_folders", "index_metadata", "index_table",
    "list_set", "mask_box", "quarantine_table", "read_index", "validate_pair", "write_index",
]
