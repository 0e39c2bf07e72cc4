"""Stage ``base``: install the verified frozen SAM checkpoint.

    python -m stages.base --params params.yaml --out models/base
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.modeling.base import prepare_base


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="models/base")
    args = ap.parse_args(argv)
    return run_stage("base", lambda: print(json.dumps(prepare_base(load_params(args.params), Path(args.out)), indent=2)))


if __name__ == "__main__":
    sys.exit(main())
