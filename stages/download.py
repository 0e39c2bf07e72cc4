"""Stage `download`: put the HQSeg-44K tree at --out (downloaded archives, or the embedded stand-in).

    python -m stages.download --params params.yaml --out data/hqseg44k

`data.source: hqseg44k` downloads `download.archives` from `download.endpoint` into `download.cache_dir`
(resumable, sha256-verified; re-run after an interruption) and extracts them; `data.source: embedded`
generates the offline stand-in with `generate.*`. See pipeline/data/download.py.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.archive import ArchiveError
from pipeline.common.http import DownloadError
from pipeline.config import load_params
from pipeline.data.download import acquire_dataset


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    ap.add_argument("--out", default=None, help="dataset root to create (default: data.root from params)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = load_params(args.params)
    out = Path(args.out or cfg.data.root)
    try:
        summary = acquire_dataset(cfg, out)
    except (DownloadError, ArchiveError) as exc:
        print(f"download failed: {exc}", file=sys.stderr)
        return 1
    print(f"{summary.get('source')}: dataset at {out}" + (" (already complete)" if summary.get("skipped") else ""))
    for name, info in (summary.get("archives") or {}).items():
        print(f"  {name}: {info['files']} files, {info['size']} bytes, sha256 {info['sha256']}")
    for name, info in (summary.get("sets") or {}).items():
        print(f"  {name}: {info}")
    if summary.get("missing_sets"):
        print(f"  WARNING: sets missing from the archives: {', '.join(summary['missing_sets'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
