"""DVC stage ``seeds``: retrain ``seeds.methods`` with the seeds of ``seeds.extra`` and report mean ± std.

    python -m stages.seeds --params params.yaml --embeddings data/embeddings --prompts data/prompts \\
        --base models/base --eval-dir metrics/eval --work models/seeds --out metrics/seeds.json

The pipeline's own run (params ``seed``) is the first sample. The work is done by
:func:`pipeline.evaluation.seeds.run_seeds`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.evaluation.seeds import run_seeds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.seeds", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--embeddings", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True, help="folder with train.parquet and eval.parquet")
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--eval-dir", type=Path, required=True, help="the evaluate stage's metrics (the first seed)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the extra seeds' plugins, checkpoints, scores")
    ap.add_argument("--out", type=Path, required=True, help="metrics/seeds.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_stage("seeds", lambda: run_seeds(
        load_params(args.params), embeddings=args.embeddings, prompts=args.prompts, base=args.base,
        eval_dir=args.eval_dir, work=args.work, out=args.out))


if __name__ == "__main__":
    sys.exit(main())
