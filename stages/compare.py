"""Compare headline metrics across MLflow runs: markdown table + PNG bar chart (+ JSON).

    python -m stages.compare --params params.yaml --out reports/compare                 # last 5 pipeline runs
    python -m stages.compare --params params.yaml --out reports/compare --mode aliases  # champion vs challenger

`--experiment` overrides `tracking.experiment`; `--metric` (repeatable) overrides
`tracking.headline_metrics`. Not a DVC stage (it reads MLflow, not files); the work is done by
:mod:`pipeline.tracking.compare`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_params


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
    try:
        cfg = load_params(args.params).tracking
    except ConfigError as exc:
        print(f"compare: error: {exc}", file=sys.stderr)
        return 2
    from pipeline.tracking.compare import gather, to_markdown, write
    from pipeline.tracking.mlflow_adapter import Tracker, resolve_tracking_uri

    tracker = Tracker(resolve_tracking_uri(cfg.tracking_uri, args.params.resolve().parent),
                      args.experiment or cfg.experiment)
    comp = gather(tracker, args.metric or cfg.headline_metrics, mode=args.mode, last=args.last,
                  registered_model=cfg.registered_model)
    paths = write(comp, args.out)
    print(to_markdown(comp))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
