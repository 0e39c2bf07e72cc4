"""The fidelity study (not a DVC stage: about half an hour on two cores): what limits the plugins' gain.

    python -m stages.fidelity --params params.yaml --embeddings data/embeddings --prompts data/prompts \\
        --base models/base --work models/fidelity --out metrics/fidelity.json [--only "stable_sam" ...]

Run after `make pipeline`; prints the Markdown table that reports/fidelity.md quotes. See
pipeline/evaluation/fidelity.py for the variants; the work is done by
:func:`pipeline.evaluation.fidelity.run_fidelity`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.evaluation.fidelity import run_fidelity


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.fidelity", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--embeddings", type=Path, default=Path("data/embeddings"))
    ap.add_argument("--prompts", type=Path, default=Path("data/prompts"))
    ap.add_argument("--base", type=Path, default=Path("models/base"))
    ap.add_argument("--work", type=Path, default=Path("models/fidelity"))
    ap.add_argument("--out", type=Path, default=Path("metrics/fidelity.json"))
    ap.add_argument("--plot", type=Path, default=Path("plots/fidelity/recovery.png"))
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (sam always runs)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_stage("fidelity", lambda: run_fidelity(
        load_params(args.params), embeddings=args.embeddings, prompts=args.prompts, base=args.base,
        work=args.work, out=args.out, plot=args.plot, only=args.only))


if __name__ == "__main__":
    sys.exit(main())
