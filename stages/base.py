"""Stage ``base``: install the verified frozen SAM checkpoint.

    python -m stages.base --params params.yaml --out models/base

The work is done by :func:`pipeline.modeling.sam_checkpoint.run_base`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.modeling.sam_checkpoint import run_base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="models/base")
    args = ap.parse_args(argv)
    return run_stage("base", lambda: run_base(load_params(args.params), Path(args.out)))


if __name__ == "__main__":
    sys.exit(main())
