"""Stage ``prompts``: synthesise the training prompt mix and the fixed evaluation prompts.

Reads only the GT columns (view_id, dataset, height, width, mask_rle) of the embedding cache's shards,
never the embeddings. Work is done shard by shard into ``<out>/.work/<fingerprint>/`` (atomic part files,
so a killed run resumes where it stopped; the fingerprint covers the params, the model frame and each
shard's size and mtime, so stale parts are never reused), then merged into ``<out>/train.parquet`` and
``<out>/eval.parquet``; views whose GT is unusable are listed in ``<out>/quarantine.parquet`` with a
reason, and ``<out>/summary.json`` has the counts.

    python -m stages.prompts --params params.yaml --embeddings data/embeddings --out data/prompts
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from pipeline.common.atomic import atomic_write_json
from pipeline.common.cli import StageError
from pipeline.common.hashing import sha256_bytes
from pipeline.config import Params
from pipeline.data import rle
from pipeline.prompts.synthesis import ModelFrame, SynthesisStats, eval_prompts, train_prompts
from pipeline.prompts.tables import (
    EVAL_SCHEMA, FORMAT_VERSION, QUARANTINE_SCHEMA, TRAIN_SCHEMA, to_table, write_table,
)

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
GT_COLUMNS = ["view_id", "dataset", "height", "width", "mask_rle"]


def list_shards(root: Path, cache: dict[str, Any], split: str) -> list[Path]:
    """The shards of ``split`` listed in the cache's CACHE.json (the only ones to trust), sorted."""
    return sorted(Path(root) / s["path"] for s in cache["shards"] if s["split"] == split)


def model_frame(meta: dict[str, Any]) -> ModelFrame:
    """The model input frame recorded in the cache metadata (img_size, grid, preprocessing mode)."""
    pre = meta.get("preprocessing", "sam")
    mode = pre.get("mode", "sam") if isinstance(pre, dict) else pre
    if mode not in ("sam", "squash"):
        mode = "squash" if "squash" in str(mode) else "sam"
    return ModelFrame(img_size=int(meta["img_size"]), grid=int(meta["grid"]), mode=mode)


def _fingerprint(params: Params, frame: ModelFrame, shard: Path) -> str:
    st = shard.stat()
    key = {"prompts": params.prompts.__dict__, "frame": frame.__dict__, "shard": str(shard),
           "size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": FORMAT_VERSION}
    return sha256_bytes(json.dumps(key, sort_keys=True, default=list).encode())[:16]


def _process_shard(shard: Path, split: str, params: Params, frame: ModelFrame, stats: SynthesisStats,
                   bar: tqdm) -> tuple[pa.Table, list[dict[str, Any]]]:
    try:
        t = pq.read_table(shard, columns=GT_COLUMNS)
    except (OSError, pa.ArrowInvalid, KeyError) as exc:
        raise StageError(f"{shard}: cannot read the GT columns {GT_COLUMNS} ({exc}); "
                           "re-run the embed stage (`dvc repro embed`)") from None
    cols = {c: t.column(c).to_pylist() for c in GT_COLUMNS}
    rows: list[dict[str, Any]] = []
    quarantine: list[dict[str, Any]] = []
    for i, vid in enumerate(cols["view_id"]):
        bar.update(1)
        ds = cols["dataset"][i]
        try:
            mask = rle.decode(cols["mask_rle"][i], cols["height"][i], cols["width"][i])
        except Exception as exc:  # a corrupt RLE string: quarantine the view, keep going
            quarantine.append({"view_id": vid, "dataset": ds, "split": split, "reason": f"bad mask_rle: {exc}"})
            continue
        if not mask.any():
            quarantine.append({"view_id": vid, "dataset": ds, "split": split, "reason": "empty GT mask"})
            continue
        if split == "train":
            new = train_prompts(vid, mask, params.prompts, frame, stats)
        else:
            new = eval_prompts(vid, mask, params.prompts, stats)
        for r in new:
            r["dataset"] = ds
        rows.extend(new)
    return to_table(rows, TRAIN_SCHEMA if split == "train" else EVAL_SCHEMA), quarantine


def make_prompts(params: Params, embeddings: Path, out: Path) -> dict[str, Any]:
    """Write ``out/{train,eval,quarantine}.parquet`` + ``out/summary.json``; returns the summary."""
    from pipeline.data.embedding_format import read_cache_meta  # the cache's contract (pipeline/data/embedding_format.py)

    embeddings, out = Path(embeddings), Path(out)
    meta = read_cache_meta(embeddings)
    frame = model_frame(meta)
    table_meta = {"seed": params.prompts.seed, "img_size": frame.img_size, "grid": frame.grid,
                  "preprocessing": frame.mode, "format_version": FORMAT_VERSION,
                  "checkpoint_sha256": meta.get("checkpoint_sha256", "")}
    work = out / ".work"
    summary: dict[str, Any] = {"views": {}, "prompts": {}, "types": {}, "quarantined": {}}
    all_quarantine: list[dict[str, Any]] = []
    stats = SynthesisStats()
    for split in SPLITS:
        shards = list_shards(embeddings, meta, split)
        if not shards:
            raise FileNotFoundError(f"{embeddings}: no {split} shards (<dataset>/{split}/*.parquet); "
                                    "run the embed stage first (`dvc repro embed`)")
        total = sum(pq.ParquetFile(s).metadata.num_rows for s in shards)
        parts: list[Path] = []
        with tqdm(total=total, desc=f"prompts {split}", unit="view") as bar:
            for shard in shards:
                part = work / _fingerprint(params, frame, shard) / f"{split}.parquet"
                qpart = part.with_name(f"{split}.quarantine.parquet")
                if part.is_file() and qpart.is_file():  # resumed: this shard is done
                    bar.update(pq.ParquetFile(shard).metadata.num_rows)
                else:
                    table, quarantine = _process_shard(shard, split, params, frame, stats, bar)
                    write_table(to_table(quarantine, QUARANTINE_SCHEMA), qpart)
                    write_table(table, part)
                parts.append(part)
                all_quarantine.extend(pq.read_table(qpart).to_pylist())
        merged = pa.concat_tables([pq.read_table(p) for p in parts])
        merged = merged.replace_schema_metadata(to_table([], TRAIN_SCHEMA if split == "train" else EVAL_SCHEMA,
                                                         {**table_meta, "split": split}).schema.metadata)
        write_table(merged, out / f"{split}.parquet")
        summary["views"][split] = total
        summary["prompts"][split] = merged.num_rows
        kinds = merged.column("prompt_type").value_counts().to_pylist()
        summary["types"][split] = {k["values"]: k["counts"] for k in sorted(kinds, key=lambda k: k["values"])}
    for q in all_quarantine:
        log.warning("prompts: quarantined %s (%s split): %s", q["view_id"], q["split"], q["reason"])
        summary["quarantined"][q["split"]] = summary["quarantined"].get(q["split"], 0) + 1
    write_table(to_table(all_quarantine, QUARANTINE_SCHEMA), out / "quarantine.parquet")
    summary["noisy_box_fallbacks"] = stats.noisy_box_fallbacks
    summary["noisy_box_mean_tries"] = stats.noisy_box_tries / max(stats.noisy_boxes, 1)  # shards done this run
    if stats.noisy_box_fallbacks:
        log.warning("prompts: %d noisy boxes fell back to the GT box (no candidate reached IoU %.2f)",
                    stats.noisy_box_fallbacks, params.prompts.noisy_box_min_iou)
    atomic_write_json(out / "summary.json", summary)
    shutil.rmtree(work, ignore_errors=True)
    return summary


def run_prompts(params: Params, embeddings: Path, out: Path) -> dict[str, Any]:
    """The ``prompts`` stage: :func:`make_prompts` from the cache at ``embeddings`` into ``out``; prints the summary."""
    summary = make_prompts(params, Path(embeddings), Path(out))
    print(json.dumps(summary, indent=2, sort_keys=True))
    return summary
