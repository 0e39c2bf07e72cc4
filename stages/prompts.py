"""Stage ``prompts``: training prompt mix + fixed evaluation prompts from the embedding cache's GT masks.

    python -m stages.prompts --params params.yaml --embeddings data/embeddings --out data/prompts

The work is done by :func:`pipeline.prompts.stage.run_prompts`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.prompts.stage import run_prompts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--embeddings", type=Path, required=True, help="embedding cache root (data/embeddings)")
    ap.add_argument("--out", type=Path, required=True, help="output folder (data/prompts)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_stage("prompts", lambda: run_prompts(load_params(args.params), args.embeddings, args.out))


if __name__ == "__main__":
    sys.exit(main())
