"""The prompt tables ``data/prompts/{train,eval}.parquet``: schemas, writing and reading back.

Columns (docs/ARCHITECTURE.md): ``view_id, dataset, prompt_type, draw, box (list<float32>[4] | null),
points (list<float32>[2N] | null), point_labels (list<int32>[N] | null)`` and, in ``train`` only,
``mask_input_rle`` (coarse mask, COCO RLE at ``4g x 4g`` in the padded model-input frame). Boxes and
points are in the VIEW image's pixel frame. Schema metadata (key ``stable_sam``, JSON) records the
seed, the model frame (img_size, grid, preprocessing) and the format version.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.atomic import atomic_path

FORMAT_VERSION = 1
META_KEY = b"stable_sam"

_COMMON = [
    pa.field("view_id", pa.string(), nullable=False),
    pa.field("dataset", pa.string(), nullable=False),
    pa.field("prompt_type", pa.string(), nullable=False),
    pa.field("draw", pa.int32(), nullable=False),
    pa.field("box", pa.list_(pa.float32())),
    pa.field("points", pa.list_(pa.float32())),
    pa.field("point_labels", pa.list_(pa.int32())),
]
TRAIN_SCHEMA = pa.schema([*_COMMON, pa.field("mask_input_rle", pa.string())])
EVAL_SCHEMA = pa.schema(_COMMON)
QUARANTINE_SCHEMA = pa.schema([pa.field("view_id", pa.string()), pa.field("dataset", pa.string()),
                               pa.field("split", pa.string()), pa.field("reason", pa.string())])


def to_table(rows: Iterable[dict[str, Any]], schema: pa.Schema, meta: dict[str, Any] | None = None) -> pa.Table:
    """Rows (dicts) -> a table with exactly ``schema``'s columns (extra keys are dropped)."""
    names = schema.names
    rows = list(rows)
    table = pa.Table.from_pylist([{k: r.get(k) for k in names} for r in rows], schema=schema)
    if meta is not None:
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta, sort_keys=True).encode()})
    return table


def write_table(table: pa.Table, dest: Path) -> None:
    """Atomic parquet write (zstd; these tables are small)."""
    with atomic_path(dest) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_meta(path: Path) -> dict[str, Any]:
    """The ``stable_sam`` schema metadata of a prompt table ({} when absent)."""
    md = pq.read_schema(path).metadata or {}
    return json.loads(md[META_KEY]) if META_KEY in md else {}


TrainRow = dict[str, Any]  # one stored training prompt: prompt_type, draw, box, points, point_labels, mask_input_rle


def load_train_prompts(path: Path) -> dict[str, list[TrainRow]]:
    """``train.parquet`` -> {view_id: [row of draw 0, draw 1, ...]} (the stage stores draws 0..n-1).

    Rows stay plain dicts (coarse masks as RLE) until a batch needs them:
    ``pipeline.inference.prompts.Prompt.from_row`` turns one into a prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no training prompts (run `dvc repro prompts`)")
    t = pq.read_table(path, columns=["view_id", "prompt_type", "draw", "box", "points", "point_labels", "mask_input_rle"])
    out: dict[str, list[TrainRow]] = {}
    for row in t.to_pylist():
        out.setdefault(row["view_id"], []).append(row)
    return {vid: sorted(rows, key=lambda r: r["draw"]) for vid, rows in out.items()}
