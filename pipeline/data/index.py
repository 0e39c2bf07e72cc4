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
import contextlib
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.common.cli import StageError
from pipeline.common.atomic import atomic_paths
from pipeline.config import IndexConfig, Params
from pipeline.data.layout import get_set
from pipeline.data.pairs import Candidate, IndexRow, QuarantineRow, list_set, mask_box, validate_pair

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


class IndexBuildError(StageError):
    """The index cannot be built (missing set folder, a set with no valid pair); the message says the fix."""


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


# --------------------------------------------------------------------------------------------------
class _Journal:
    """Append-only JSONL of validated pairs, keyed by both files' stat and the index params (resume)."""

    def __init__(self, path: Path, cfg: IndexConfig) -> None:
        self.path = path
        self.salt = json.dumps([FORMAT_VERSION, cfg.mask_threshold, cfg.min_mask_pixels])
        self.entries: dict[str, dict[str, Any]] = {}
        if path.is_file():
            with open(path, encoding="utf-8", errors="replace") as fh:
                for line in fh:
                    try:
                        entry = json.loads(line)
                        self.entries[entry["key"]] = entry
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # a torn last line from a killed run
            log.info("resuming from %s (%d validated pairs)", path, len(self.entries))
        self.fh: TextIO | None = None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(path, "a", encoding="utf-8")
        except OSError as exc:
            log.warning("%s: cannot write the resume journal (%s); going on without it", path, exc.strerror or exc)

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
        if self.fh is None:
            return
        tag = "row" if isinstance(outcome, IndexRow) else "quarantine"
        try:
            self.fh.write(json.dumps({"key": key, tag: asdict(outcome)}) + "\n")
            self.fh.flush()
        except OSError as exc:  # e.g. the disk filled up: the journal only saves time, so go on without it
            log.warning("%s: cannot write the resume journal (%s); going on without it",
                        self.path, exc.strerror or exc)
            self.close()

    def close(self) -> None:
        if self.fh is not None:
            with contextlib.suppress(OSError):
                self.fh.close()
            self.fh = None


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
    """Write ``<out_dir>/index.parquet`` and ``quarantine.parquet`` (one atomic folder swap) and the metrics JSON.

    Both outputs are written to temporaries before either is replaced: a full disk or a read-only folder
    raises :class:`~pipeline.common.atomic.OutputWriteError` (naming the output and the fix) with the
    previous index and metrics unchanged and no temporary left behind.
    """
    dests = [Path(out_dir)] + ([Path(metrics_path)] if metrics_path is not None else [])
    with atomic_paths(*dests) as temps:
        tmp = temps[0]
        tmp.mkdir(parents=True)
        pq.write_table(index_table(result), tmp / INDEX_FILE)
        pq.write_table(quarantine_table(result), tmp / QUARANTINE_FILE)
        if metrics_path is not None:
            temps[1].write_text(json.dumps(result.metrics(), indent=2, sort_keys=True) + "\n", encoding="utf-8")


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


def default_journal(out: Path) -> Path:
    """Where the resume journal of an index run writing ``out`` lives (outside ``out``: DVC clears it)."""
    return Path(out).parent / f".{Path(out).name}.journal.jsonl"


def run_index(params: Params, root: Path, out: Path, metrics: Path | None = None, *, fresh: bool = False,
              progress: bool = True) -> IndexResult:
    """The ``index`` stage: :func:`build_index` (resumable via :func:`default_journal`), :func:`write_index`,
    remove the journal, print the per-set table. ``fresh`` discards an earlier run's journal first."""
    journal = default_journal(out)
    if fresh:
        journal.unlink(missing_ok=True)
    result = build_index(root, params, journal=journal, progress=progress)
    write_index(result, out, metrics)
    journal.unlink(missing_ok=True)
    print(result.summary_table())
    print(f"wrote {out}/index.parquet ({len(result.rows)} pairs), {out}/quarantine.parquet "
          f"({len(result.quarantine)} files)")
    return result


__all__ = [
    "Candidate", "INDEX_SCHEMA", "IndexBuildError", "IndexResult", "IndexRow", "QUARANTINE_SCHEMA",
    "QuarantineRow", "SetSummary", "build_index", "check_folders", "index_metadata", "index_table",
    "list_set", "mask_box", "quarantine_table", "read_index", "validate_pair", "write_index",
    "default_journal", "run_index",
]
