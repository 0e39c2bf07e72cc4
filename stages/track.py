"""DVC stage `track`: log the whole pipeline run to MLflow (parent + child runs, artifacts, challenger model).

    python -m stages.track --params params.yaml

Reads every stage's outputs (paths below, defaults = dvc.yaml's), params `tracking` (store, experiment,
registered model, promote metric, model format) and the whole params file (logged flattened). Writes
`--out` (default metrics/track.json: run ids, registered version). Re-running after a crash resumes the
same MLflow run. The work is done by :func:`pipeline.tracking.track.run_track`; promotion is
`python -m pipeline.tracking.promotion` (the Prefect `retrain` flow runs it after the pipeline).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.tracking.collect import PipelineOutputs


def main(argv: list[str] | None = None) -> int:
    d = PipelineOutputs.default(Path("."))
    parser = argparse.ArgumentParser(prog="python -m stages.track", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    parser.add_argument("--eval-json", type=Path, default=d.eval_json, help="report stage's metrics JSON")
    parser.add_argument("--train-metrics", type=Path, default=d.train_metrics, help="folder of <method>.json")
    parser.add_argument("--train-plots", type=Path, default=d.train_plots, help="folder of <method>_loss.csv")
    parser.add_argument("--plots", type=Path, default=d.plots, help="every *.png below is logged")
    parser.add_argument("--report", type=Path, default=d.report, help="the summary markdown")
    parser.add_argument("--metrics-dir", type=Path, default=d.metrics, help="every *.json below is logged")
    parser.add_argument("--plugins", type=Path, default=d.plugins, help="folder of <method>.pt")
    parser.add_argument("--base", type=Path, default=d.base, help="base SAM folder (base stage output)")
    parser.add_argument("--dvc-lock", type=Path, default=d.dvc_lock, help="dvc.lock (output md5 tags)")
    parser.add_argument("--out", type=Path, default=Path("metrics/track.json"), help="result JSON")
    parser.add_argument("--exp-name", default=None, help="run name (default: env DVC_EXP_NAME, else a timestamp)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from pipeline.tracking.track import run_track  # imports mlflow (slow): after argument errors

    outputs = PipelineOutputs(
        root=Path(".").resolve(), eval_json=args.eval_json, train_metrics=args.train_metrics,
        train_plots=args.train_plots, plots=args.plots, report=args.report, metrics=args.metrics_dir,
        plugins=args.plugins, base=args.base, dvc_lock=args.dvc_lock)
    return run_stage("track", lambda: run_track(load_params(args.params), outputs, exp_name=args.exp_name,
                                                out_json=args.out))


if __name__ == "__main__":
    sys.exit(main())
