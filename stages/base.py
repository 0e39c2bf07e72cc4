"""Stage ``base``: install the verified frozen SAM checkpoint.

    python -m stages.base --params params.yaml --out models/base
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.config import load_params
from pipeline.modeling.base import prepare_base


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="models/base")
    args = ap.parse_args(argv)
    info = prepare_base(load_params(args.params), Path(args.out))
    print(json.dumps(info, indent=2))


if __name__ == "__main__":
    main()
