"""Compare headline metrics across MLflow runs: markdown table + PNG bar chart (+ JSON).

    python -m stages.compare --params params.yaml --out reports/compare                 # last 5 pipeline runs
    python -m stages.compare --params params.yaml --out reports/compare --mode aliases  # champion vs challenger

`--experiment` overrides `tracking.experiment`; `--metric` (repeatable) overrides
`tracking.headline_metrics`. Not a DVC stage (it reads MLflow, not files); the work is done by
:func:`pipeline.tracking.compare.run_compare`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default tracking.experiment)")
    parser.add_argument("--out", type=Path, default=Path("reports/compare"), help="output folder")
    parser.add_argument("--mode", choices=("runs", "aliases"), default="runs",
                        help="runs: newest pipeline runs; aliases: champion vs challenger")
    parser.add_argument("--last", type=int, default=5, help="how many runs in --mode runs")
    parser.add_argument("--metric", action="append", default=None, help="dotted eval metric (repeatable)")
    args = parser.parse_args(argv)

    from pipeline.tracking.compare import run_compare  # imports mlflow lazily: after argument errors

    return run_stage("compare", lambda: run_compare(
        load_params(args.params), args.params.resolve().parent, args.out, experiment=args.experiment,
        mode=args.mode, last=args.last, metrics=args.metric))


if __name__ == "__main__":
    sys.exit(main())
