"""Regenerate the embedded-default base model (assets/tiny_sam.pt): one command, deterministic by seed.

    python -m stages.pretrain_base --params params.yaml --out assets/tiny_sam.pt

Not a DVC stage (it takes about an hour on two CPU cores); its output is a committed asset whose sha256
is pinned in pipeline/modeling/backbones.py. See pipeline/training/pretrain_base.py for the recipe.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from pipeline.config import load_params, replace
from pipeline.common.hashing import sha256_file
from pipeline.training.pretrain_base import pretrain


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="assets/tiny_sam.pt")
    ap.add_argument("--steps", type=int, default=None, help="override base_pretrain.steps")
    ap.add_argument("--no-resume", action="store_true", help="start over even if a train-state file exists")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params = load_params(args.params)
    if args.steps:
        params = replace(params, **{"base_pretrain.steps": args.steps})
    report = pretrain(params.base_pretrain, params.generate, params.prompts, Path(args.out), resume=not args.no_resume)
    print(json.dumps(report["holdout_miou_lowres"], indent=2))
    print(f"{args.out}: sha256 {sha256_file(args.out)} (put it in pipeline/modeling/backbones.py TINY_SHA256)")


if __name__ == "__main__":
    main()
