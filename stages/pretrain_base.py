"""Regenerate the embedded-default base model (assets/tiny_sam.pt): one command, deterministic by seed.

    python -m stages.pretrain_base --params params.yaml --out assets/tiny_sam.pt

Not a DVC stage (two phases, about two hours on two CPU cores); its output is a committed asset whose sha256
is pinned in pipeline/modeling/backbones.py. See pipeline/training/pretrain_base.py for the recipe; the
work is done by :func:`pipeline.training.pretrain_base.run_pretrain_base`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.training.pretrain_base import run_pretrain_base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="assets/tiny_sam.pt")
    ap.add_argument("--steps", type=int, default=None, help="override base_pretrain.steps")
    ap.add_argument("--no-resume", action="store_true", help="start over: ignore train-state files and finished phases")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_stage("pretrain_base", lambda: run_pretrain_base(
        load_params(args.params), Path(args.out), steps=args.steps, resume=not args.no_resume, threads=args.threads))


if __name__ == "__main__":
    sys.exit(main())
