"""Stage ``train``: train one method's plugin on cached embeddings, SAM frozen (single process or torchrun DDP).

    python -m stages.train --params params.yaml --method stable_sam --embeddings data/embeddings \\
        --prompts data/prompts/train.parquet --base models/base --out models/plugins \\
        --metrics metrics/train --plots plots/train [--resume]
    torchrun --standalone --nproc_per_node 2 -m stages.train ...   # DDP (gloo on CPU, NCCL on CUDA)

The work is done by :func:`pipeline.training.train.run_train`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.training.train import run_train


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--method", required=True, help="a name of pipeline.modeling.methods.METHODS")
    ap.add_argument("--embeddings", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True, help="data/prompts/train.parquet")
    ap.add_argument("--base", type=Path, required=True, help="folder with sam.pt + base.json")
    ap.add_argument("--out", type=Path, required=True, help="plugin folder: <out>/<method>.pt (+ .ckpt)")
    ap.add_argument("--metrics", type=Path, required=True, help="folder for <method>.json")
    ap.add_argument("--plots", type=Path, required=True, help="folder for <method>_loss.csv/.png")
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help="folder for the resumable <method>.ckpt (default: --out)")
    ap.add_argument("--resume", nargs="?", const="yes", default="no", choices=("no", "yes", "auto"),
                    help="continue from <checkpoints>/<method>.ckpt; 'auto' starts over if the run changed")
    args = ap.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s %(levelname)s [rank {rank}] %(name)s: %(message)s")
    return run_stage("train", lambda: run_train(
        load_params(args.params), args.method, embeddings=args.embeddings, prompts=args.prompts, base=args.base,
        out=args.out, metrics=args.metrics, plots=args.plots,
        resume={"no": False, "yes": True, "auto": "auto"}[args.resume], checkpoints=args.checkpoints))


if __name__ == "__main__":
    sys.exit(main())
