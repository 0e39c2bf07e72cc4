"""DVC stage `views`: the deterministic original / jitter / occluded views of every image (docs/METHOD.md §3).

    python -m stages.views --params params.yaml --index data/index/index.parquet --root data/hqseg44k --out data/views

Reads params `views` (and `sam.variant` / `base_pretrain.img_size` when `views.output_size` is 0).
Writes `<out>/views.parquet` and `<out>/summary.json` (views per kind, dropped jitter draws and
occlusions), logs the summary, and optionally copies it to `--metrics`. The work is done by
:func:`pipeline.data.views.run_views`; only masks are decoded, in `--workers` processes.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.data.views import run_views


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.views", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    parser.add_argument("--index", type=Path, required=True, help="index.parquet (index stage output)")
    parser.add_argument("--root", type=Path, required=True, help="HQSeg-44K dataset root")
    parser.add_argument("--out", type=Path, required=True, help="output folder (views.parquet, summary.json)")
    parser.add_argument("--metrics", type=Path, default=None, help="also write the summary here (e.g. metrics/views.json)")
    parser.add_argument("--workers", type=int, default=None, help="mask-decoding processes (default: all CPU cores)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def work() -> None:
        with logging_redirect_tqdm():
            run_views(load_params(args.params), args.index, args.root, args.out, workers=args.workers,
                      progress=not args.quiet, metrics=args.metrics)

    return run_stage("views", work)


if __name__ == "__main__":
    sys.exit(main())
