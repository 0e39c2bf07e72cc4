"""DVC stage `report`: metrics/eval.json + headline.json, plots (PNG + CSV), gallery and reports/summary.md.

    python -m stages.report --params params.yaml --eval-dir metrics/eval --predictions data/predictions \
        --prompts data/prompts/eval.parquet --index data/index/index.parquet --root data/hqseg44k \
        --metrics metrics/eval.json --plots plots/eval --report reports/summary.md

Reads params `data`, `sam`, `prompts.eval_types`/`eval_draws`, `index.mask_threshold`, `evaluate` (methods,
benchmarks, gallery_images) and `report`. `--headline` defaults to `headline.json` next to `--metrics`.
The work is done by :func:`pipeline.evaluation.report.run_report`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.evaluation.report import run_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    parser.add_argument("--eval-dir", type=Path, required=True, help="evaluate stage outputs: <dir>/<benchmark>/<method>.json")
    parser.add_argument("--predictions", type=Path, default=None, help="predictions folder (gallery): <dir>/<benchmark>/<method>.parquet")
    parser.add_argument("--prompts", type=Path, default=None, help="eval prompts parquet (gallery)")
    parser.add_argument("--index", type=Path, default=None, help="index parquet (gallery, image counts)")
    parser.add_argument("--root", type=Path, default=None, help="HQSeg-44K dataset root (gallery images)")
    parser.add_argument("--metrics", type=Path, required=True, help="aggregated metrics JSON to write (metrics/eval.json)")
    parser.add_argument("--headline", type=Path, default=None, help="headline metrics JSON (default: headline.json next to --metrics)")
    parser.add_argument("--seeds", type=Path, default=None, help="metrics/seeds.json of the seeds stage (optional)")
    parser.add_argument("--plots", type=Path, required=True, help="folder for PNG + CSV plots (plots/eval)")
    parser.add_argument("--report", type=Path, required=True, help="Markdown summary to write (reports/summary.md)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_stage("report", lambda: run_report(
        load_params(args.params), args.eval_dir, args.predictions, args.prompts, args.index, args.root,
        args.metrics, args.plots, args.report, out_headline=args.headline, seeds_json=args.seeds))


if __name__ == "__main__":
    sys.exit(main())
