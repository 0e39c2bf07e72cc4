"""Stage `download`: put the HQSeg-44K tree at --out (downloaded archives, or the embedded stand-in).

    python -m stages.download --params params.yaml --out data/hqseg44k

`data.source: hqseg44k` downloads `download.archives` from `download.endpoint` into `download.cache_dir`
(resumable, sha256-verified; re-run after an interruption) and extracts them; `data.source: embedded`
generates the offline stand-in with `generate.*`. A failed download or a bad archive is one error line
and exit code 2. The work is done by :func:`pipeline.data.download.run_download`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.data.download import run_download


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--out", default=None, help="dataset root to create (default: data.root from params)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_stage("download", lambda: run_download(load_params(args.params), Path(args.out) if args.out else None))


if __name__ == "__main__":
    sys.exit(main())
