"""User datasets (``evaluate.folders`` and ``evaluate.coco`` entries): found by name, checked against the
command line, and validated like the HQ sets before they are scored.

Validation uses the index stage's own checks (:func:`pipeline.data.index.validate_pair`: decoding, size,
empty mask; same quarantine reasons) plus pairing checks for folders (stray files, an image without a
mask, a mask without an image, duplicate stems); COCO entries go through
:func:`pipeline.evaluation.coco.validate_coco`. :func:`write_user_index` writes
``<index_dir>/<name>/{index,quarantine}.parquet`` and ``<out>/<name>/index.json`` (counts and every
quarantined file with its reason, shown in ``reports/summary.md``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.common.atomic import atomic_write_json
from pipeline.config import ConfigError, IndexConfig, Params
from pipeline.data.index import IndexResult, SetSummary, write_index
from pipeline.data.pairs import Candidate, IndexRow, QuarantineRow, validate_pair
from pipeline.data.layout import SETS_BY_NAME
from pipeline.evaluation.predict import EvaluationError

log = logging.getLogger(__name__)

# Images a user dataset may hold (folders and COCO image folders); anything else is a stray file.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# The fields of an entry that dvc.yaml passes on the command line (``${item}`` unpacks the whole entry).
ENTRY_FIELDS = ("images", "masks", "mask_suffix", "annotations", "box_source", "detections")


def resolve_benchmark(params: Params, benchmark: str) -> tuple[str, dict[str, Any] | None]:
    """``("cache", None)`` for an HQ set, ``("coco", entry)`` / ``("folder", entry)`` for params entries."""
    for entry in params.evaluate.coco:
        if entry["name"] == benchmark:
            return "coco", entry
    for entry in params.evaluate.folders:
        if entry["name"] == benchmark:
            return "folder", entry
    if benchmark in SETS_BY_NAME:
        return "cache", None
    known = [*params.data.eval_sets, *(e["name"] for e in params.evaluate.coco), *(e["name"] for e in params.evaluate.folders)]  # noqa: E501
    raise ValueError(f"unknown benchmark {benchmark!r}; known: {', '.join(known)} (add COCO/folder sets to evaluate.coco / evaluate.folders)")


def check_entry(cfg: Params, benchmark: str, given: dict[str, str | None]) -> None:
    """Each entry field given on the command line must equal the params entry ``benchmark`` (else ``ConfigError``)."""
    given = {k: v for k, v in given.items() if v is not None}
    if not given:
        return
    kind, entry = resolve_benchmark(cfg, benchmark)
    section = {"coco": "evaluate.coco", "folder": "evaluate.folders"}.get(kind)
    if entry is None or section is None:
        raise ConfigError(f"--{next(iter(given))}: {benchmark!r} is an HQ set, not an evaluate.coco / "
                          "evaluate.folders entry; give only --benchmark")
    for key, value in given.items():
        if key not in entry:
            raise ConfigError(f"--{key}: {section}[{benchmark}] has no field {key!r} (its fields: {', '.join(entry)})")
        if str(entry[key]) != value:
            raise ConfigError(f"--{key} {value!r} differs from {section}[{benchmark}].{key} {entry[key]!r} in the "
                              "params file; dvc.yaml passes the entry itself, so re-run `dvc repro`")


def _list_folder(entry: dict[str, Any]) -> tuple[list[Candidate], list[QuarantineRow]]:
    """Pair an ``evaluate.folders`` entry's files by stem: candidates + quarantine rows (stray, unpaired, duplicate)."""
    name, suffix = str(entry["name"]), str(entry["mask_suffix"])
    images, masks = Path(entry["images"]), Path(entry["masks"])
    for folder, key in ((images, "images"), (masks, "masks")):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: folder not found (evaluate.folders[{name}].{key})")
    same = images.resolve() == masks.resolve()
    quarantine: list[QuarantineRow] = []
    found_images: dict[str, list[str]] = {}
    found_masks: dict[str, str] = {}

    def stray(path: Path, reason: str, kind: str = "stray_file") -> None:
        quarantine.append(QuarantineRow(str(path), name, reason, kind))  # type: ignore[arg-type]

    for folder, role in ((images, "image"), *(() if same else ((masks, "mask"),))):
        for f in sorted(folder.iterdir(), key=lambda q: q.name):
            if f.is_dir():
                stray(f, "stray folder (user folders are flat; not scanned)", "stray_folder")
            elif f.name.startswith("."):
                stray(f, "stray file (hidden file, e.g. .DS_Store or a macOS ._ resource fork)")
            elif f.name.endswith(suffix) and (same or role == "mask"):
                found_masks[f.name[: -len(suffix)]] = str(f)
            elif role == "image" and f.suffix.lower() in IMAGE_SUFFIXES:
                found_images.setdefault(f.stem, []).append(str(f))
            elif role == "mask":
                stray(f, f"stray file (masks end with evaluate.folders[{name}].mask_suffix {suffix!r})")
            else:
                stray(f, f"stray file (unexpected extension {f.suffix or '(none)'!r}; images are "
                         f"{'/'.join(IMAGE_SUFFIXES)})")
    candidates: list[Candidate] = []
    for stem in sorted(set(found_images) | set(found_masks)):
        ims, mask = found_images.get(stem, []), found_masks.get(stem)
        if len(ims) > 1:
            listed = ", ".join(ims)
            for im in ims:
                quarantine.append(QuarantineRow(im, name, f"duplicate image for stem {stem!r}: {listed}", "duplicate"))
            if mask:
                quarantine.append(QuarantineRow(mask, name, f"mask's image is ambiguous: {listed}", "duplicate"))
        elif ims and mask is None:
            quarantine.append(QuarantineRow(ims[0], name, f"no mask for image (expected {masks / (stem + suffix)})",
                                            "no_mask"))
        elif mask is not None and not ims:
            quarantine.append(QuarantineRow(mask, name, f"no image for mask (expected {images / stem}"
                                            f"{{{','.join(IMAGE_SUFFIXES)}}})", "no_image"))
        else:
            candidates.append(Candidate(stem, ims[0], mask))  # type: ignore[arg-type]
    return candidates, quarantine


def validate_folder(entry: dict[str, Any], cfg: IndexConfig) -> IndexResult:
    """Validate every file of an ``evaluate.folders`` entry with the index stage's checks (:func:`validate_pair`)."""
    name = str(entry["name"])
    candidates, quarantine = _list_folder(entry)
    summary = SetSummary(name, "eval", candidates=len(candidates))
    rows: list[IndexRow] = []
    for cand in candidates:
        outcome = validate_pair(Path("."), cand, name, "eval", cfg)  # paths are as given in params
        if isinstance(outcome, IndexRow):
            rows.append(outcome)
        else:
            quarantine.append(outcome)
    return index_result(name, rows, quarantine, summary, cfg)


def index_result(name: str, rows: list[IndexRow], quarantine: list[QuarantineRow], summary: SetSummary,
                 cfg: IndexConfig) -> IndexResult:
    """A user dataset's :class:`IndexResult`: quarantine sorted by path, counts filled in, each row logged."""
    quarantine.sort(key=lambda q: q.path)
    summary.pairs, summary.quarantined = len(rows), len(quarantine)
    summary.kinds.update(q.kind for q in quarantine)
    for q in quarantine:
        log.warning("quarantined %s: %s: %s", name, q.path, q.reason)
    return IndexResult(rows, quarantine, {name: summary}, cfg)


def validate_user_dataset(params: Params, benchmark: str) -> IndexResult:
    """Validate the ``evaluate.folders`` / ``evaluate.coco`` entry ``benchmark`` (see the module docstring)."""
    kind, entry = resolve_benchmark(params, benchmark)
    if kind == "folder":
        return validate_folder(entry, params.index)  # type: ignore[arg-type]
    if kind == "coco":
        from pipeline.evaluation.coco import validate_coco

        return validate_coco(entry, params.index)  # type: ignore[arg-type]
    raise ValueError(f"{benchmark}: an HQ set is validated by the index stage (data/index), not here")


def user_index_json(result: IndexResult, fmt: str) -> dict[str, Any]:
    """``index.json`` of a user dataset: counts, reasons' categories and every quarantined file with its reason."""
    (summary,) = result.sets.values()
    return {
        "dataset": summary.name, "format": fmt, "candidates": summary.candidates, "valid": summary.pairs,
        "quarantined": summary.quarantined, "reasons": dict(sorted(summary.kinds.items())),
        "quarantine": [{"path": q.path, "reason": q.reason, "kind": q.kind} for q in result.quarantine],
    }


def write_user_index(params: Params, benchmark: str, *, out: Path, index_dir: Path) -> dict[str, Any]:
    """Validate ``benchmark`` (a user dataset) and write ``<index_dir>/<name>/{index,quarantine}.parquet`` and
    ``<out>/<name>/index.json``; returns the JSON. No valid pair/image is an :class:`EvaluationError`."""
    kind, _ = resolve_benchmark(params, benchmark)
    result = validate_user_dataset(params, benchmark)
    doc = user_index_json(result, kind)
    write_index(result, Path(index_dir) / benchmark)
    atomic_write_json(Path(out) / benchmark / "index.json", doc)
    if not result.rows:
        examples = "; ".join(f"{q['path']}: {q['reason']}" for q in doc["quarantine"][:5])
        raise EvaluationError(f"{benchmark}: no valid {'image' if kind == 'coco' else 'image/mask pair'} "
                              f"({doc['quarantined']} quarantined{': ' + examples if examples else ''}); fix the "
                              f"files or the evaluate.{'coco' if kind == 'coco' else 'folders'} entry")
    return doc


__all__ = [
    "ENTRY_FIELDS",
    "IMAGE_SUFFIXES",
    "index_result",
    "check_entry",
    "resolve_benchmark",
    "user_index_json",
    "validate_folder",
    "validate_user_dataset",
    "write_user_index",
]
