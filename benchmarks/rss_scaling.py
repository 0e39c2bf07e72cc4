"""Benchmark: peak RSS of one reader pass + a training-like consumer at 1x vs 10x rows.

    python -m benchmarks.rss_scaling                  # synthetic 2 MiB embeddings, 96 vs 960 rows
    python -m benchmarks.rss_scaling --rows 64 --shuffle-buffer 32

Each pass runs in a fresh subprocess (``resource.getrusage(RUSAGE_SELF).ru_maxrss``): EmbeddingDataset
-> DataLoader(batch 8) -> a 1x1-conv head forward + backward + Adam step. Memory must not grow with the
dataset: goal ``ratio`` = peak(10x) / peak(1x) <= 1.10. The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# This module stays free of heavy imports at the top: the parent process must stay small, because a
# child's ru_maxrss starts from its parent's RSS at fork time (Linux keeps the high-water mark across exec).
META_KW = dict(variant="vit_l", checkpoint_sha256="0" * 64, img_size=1024, grid=64, channels=256)


def make(root: Path, rows: int) -> None:
    """Write a synthetic cache (in a subprocess of its own, for the reason above)."""
    from pipeline.data.embedding_format import CacheMeta
    from tests.fakes import write_synthetic_cache

    write_synthetic_cache(root, {("SYN", "train"): rows}, CacheMeta(**META_KW), shard_rows=128, row_group_size=32)


def _hwm_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def child(root: Path, shuffle_buffer: int, batch: int) -> dict:
    """One pass over ``root``'s train split with a small trained head; returns rows and peak RSS."""
    import torch
    from torch.utils.data import DataLoader

    from pipeline.data.embedding_reader import EmbeddingDataset

    torch.manual_seed(0)
    head = torch.nn.Conv2d(META_KW["channels"], 4, 1)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3)
    ds = EmbeddingDataset(root, "train", shuffle_buffer=shuffle_buffer)
    loader = DataLoader(ds, batch_size=batch, num_workers=0,
                        collate_fn=lambda rows: torch.stack([r["embedding"] for r in rows]))
    rows = 0
    t = time.perf_counter()
    for x in loader:
        loss = head(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows += len(x)
    return {"rows": rows, "seconds": round(time.perf_counter() - t, 2),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "vm_hwm_mb": _hwm_mb()}


def _self(*args: str) -> str:
    cmd = [sys.executable, "-m", "benchmarks.rss_scaling", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=96, help="rows of the 1x cache (10x has ten times as many)")
    ap.add_argument("--shuffle-buffer", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--make", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.make is not None:
        make(args.make, args.rows)
        return {}
    if args.child is not None:
        out = child(args.child, args.shuffle_buffer, args.batch)
        print(json.dumps(out))
        return out

    with tempfile.TemporaryDirectory(prefix="bench_rss_") as tmp:
        results = {}
        for scale in (1, 10):
            root = Path(tmp) / f"x{scale}"
            _self("--make", str(root), "--rows", str(args.rows * scale))
            out = _self("--child", str(root), "--shuffle-buffer", str(args.shuffle_buffer), "--batch", str(args.batch))
            results[scale] = json.loads(out.strip().splitlines()[-1])
            assert results[scale]["rows"] == args.rows * scale, results[scale]
    result = {
        "benchmark": "rss_scaling",
        "ratio": round(results[10]["max_rss_mb"] / results[1]["max_rss_mb"], 3),
        "peak_rss_mb_1x": results[1]["max_rss_mb"],
        "peak_rss_mb_10x": results[10]["max_rss_mb"],
        "vm_hwm_mb_1x": results[1]["vm_hwm_mb"],
        "vm_hwm_mb_10x": results[10]["vm_hwm_mb"],
        "seconds_10x": results[10]["seconds"],
        "rows_1x": args.rows,
        "rows_10x": args.rows * 10,
        "data_mb_10x": round(args.rows * 10 * META_KW["channels"] * META_KW["grid"] ** 2 * 2 / 1e6),
        "shuffle_buffer": args.shuffle_buffer,
        "goal": "<= 1.10",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
