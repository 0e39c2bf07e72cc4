"""DVC stage `embed`: every view through the frozen SAM image encoder into fp16 Parquet shards.

    python -m stages.embed --params params.yaml --views data/views/views.parquet --root data/hqseg44k \
        --base models/base --out data/embeddings

Reads params `embed` (batch size, bf16, device, row group and shard sizes, render threads). Writes
`<out>/<dataset>/<split>/part-NNNNN.parquet` and, last, `<out>/CACHE.json`. Resumable: re-running
after an interruption keeps the finished shards; a cache made by another checkpoint, preprocessing,
format or from other views is refused with the fix. The work is done by
:func:`pipeline.data.embed.run_embed`.

Started by torchrun (``RANK``/``WORLD_SIZE`` set), each rank embeds every N-th missing shard and rank 0
writes `CACHE.json` once all exist (:func:`pipeline.data.embed.run_embed` hands over to
:func:`pipeline.data.embed_shards.run_embed_torchrun`); the cache
is the same as the single process's:

    torchrun --nproc_per_node=2 -m stages.embed --params params.yaml --views data/views/views.parquet \
        --root data/hqseg44k --base models/base --out data/embeddings
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.data.embed import run_embed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    parser.add_argument("--views", type=Path, required=True, help="views.parquet (views stage output)")
    parser.add_argument("--root", type=Path, required=True, help="HQSeg-44K dataset root")
    parser.add_argument("--base", type=Path, required=True, help="frozen base model folder (base stage output)")
    parser.add_argument("--out", type=Path, required=True, help="embedding cache folder")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--on-stale", choices=("refuse", "rebuild"), default="refuse",
                        help="shards made by another checkpoint/preprocessing/views: refuse (default) or "
                             "discard them and re-embed (dvc.yaml uses rebuild: DVC re-runs embed only when "
                             "a dependency changed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def work() -> None:
        with logging_redirect_tqdm():
            run_embed(load_params(args.params), args.views, args.root, args.base, args.out,
                      progress=not args.quiet, on_stale=args.on_stale)

    return run_stage("embed", work)


if __name__ == "__main__":
    sys.exit(main())
