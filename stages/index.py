"""DVC stage `index`: pair and validate every HQSeg-44K image/mask; write the index and the quarantine.

    python -m stages.index --params params.yaml --root data/hqseg44k --out data/index --metrics metrics/index.json

Reads params `data` (sets, cap) and `index` (mask threshold, minimum mask pixels). Writes
`<out>/index.parquet`, `<out>/quarantine.parquet` and the metrics JSON, and prints a per-set table.
An interrupted run resumes from a journal next to `<out>` (`.<out name>.journal.jsonl`, removed on
success; `--fresh` ignores it). The work is done by :func:`pipeline.data.index.run_index`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.data.index import default_journal, run_index

__all__ = ["default_journal", "main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.index", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    parser.add_argument("--root", type=Path, required=True, help="HQSeg-44K dataset root (download stage output)")
    parser.add_argument("--out", type=Path, required=True, help="output folder for index/quarantine parquet")
    parser.add_argument("--metrics", type=Path, default=None, help="metrics JSON path (e.g. metrics/index.json)")
    parser.add_argument("--fresh", action="store_true", help="ignore (and delete) a resume journal of an earlier run")
    parser.add_argument("--quiet", action="store_true", help="no progress bars, no per-file quarantine log lines")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )

    def work() -> None:
        with logging_redirect_tqdm():
            run_index(load_params(args.params), args.root, args.out, args.metrics, fresh=args.fresh,
                      progress=not args.quiet)

    return run_stage("index", work)


if __name__ == "__main__":
    sys.exit(main())
