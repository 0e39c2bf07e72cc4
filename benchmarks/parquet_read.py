"""Benchmark: EmbeddingDataset throughput vs a raw sequential read of the same shard files (warm cache).

    python -m benchmarks.parquet_read                       # synthetic 2 MiB embeddings in a temp dir
    python -m benchmarks.parquet_read --cache data/embeddings --split train

Both rates are file bytes per second; the reader's includes decoding fp16 to the float32 tensors it
yields, its shuffle buffer and a trivial consumer. Goal: ``ratio`` = reader / raw >= 0.5. The last
line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from pipeline.data.embedding_reader import EmbeddingDataset
from pipeline.data.embedding_format import CacheMeta, read_cache_meta
from tests.fakes import write_synthetic_cache


def raw_read(paths: list[Path], chunk: int = 16 << 20) -> int:
    """Read every file sequentially into one reused buffer; returns the bytes read."""
    buf = bytearray(chunk)
    view = memoryview(buf)
    total = 0
    for p in paths:
        with open(p, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total


def reader_pass(root: Path, split: str, shuffle_buffer: int) -> int:
    """One epoch through EmbeddingDataset, touching every yielded tensor; returns rows."""
    rows = 0
    acc = 0.0
    for row in EmbeddingDataset(root, split, shuffle_buffer=shuffle_buffer):
        acc += float(row["embedding"][0, 0, 0])
        rows += 1
    return rows


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="an existing embedding cache (default: synthetic)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--rows", type=int, default=384, help="synthetic rows (2 MiB each)")
    ap.add_argument("--shuffle-buffer", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_parquet_") as tmp:
        root = args.cache
        if root is None:
            root = Path(tmp)
            meta = CacheMeta(variant="vit_l", checkpoint_sha256="0" * 64, img_size=1024, grid=64, channels=256)
            write_synthetic_cache(root, {("SYN", args.split): args.rows}, meta, shard_rows=128, row_group_size=32)
        cache = read_cache_meta(root)
        paths = [root / s["path"] for s in cache["shards"] if s["split"] == args.split]
        nbytes = sum(p.stat().st_size for p in paths)
        raw_read(paths)  # warm the page cache
        t_raw = best_of(lambda: raw_read(paths), args.repeats)
        rows = reader_pass(root, args.split, args.shuffle_buffer)  # warm-up
        t_reader = best_of(lambda: reader_pass(root, args.split, args.shuffle_buffer), args.repeats)
        result = {
            "benchmark": "parquet_read",
            "ratio": round(t_raw / t_reader, 3),
            "reader_MBps": round(nbytes / t_reader / 1e6, 1),
            "raw_MBps": round(nbytes / t_raw / 1e6, 1),
            "rows": rows,
            "bytes": nbytes,
            "shuffle_buffer": args.shuffle_buffer,
            "goal": ">= 0.5",
            "synthetic": args.cache is None,
        }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
