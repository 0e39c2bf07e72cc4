"""DVC stages `evaluate` (one per HQ set: every method), `evaluate_coco` / `evaluate_folder` (one per entry and
method): score methods on a benchmark.

    python -m stages.evaluate --params params.yaml --benchmark COIFT --all-methods \
        --embeddings data/embeddings --prompts data/prompts/eval.parquet --base models/base \
        --plugins models/plugins --out metrics/eval --predictions data/predictions
    python -m stages.evaluate ... --benchmark COIFT --method stable_sam ...     # one method

``--all-methods`` scores every ``evaluate.methods`` entry in one process and keeps the finished outputs of a
method whose inputs did not change (:mod:`pipeline.evaluation.reuse`), so that DVC re-running the stage for
one retrained method scores only that method.

Reads params `evaluate` (postprocess, boundary ratio, device, batch size, coco/folders entries), `plugin`
(to rebuild the method), `prompts` (folder benchmarks and noisy COCO boxes), `data.max_images_per_set`
(COCO/folder cap) and `index` (folder masks). Writes `<out>/<benchmark>/<method>.json` and
`<predictions>/<benchmark>/<method>.parquet`; an interrupted run resumes from
`<predictions>/<benchmark>/.<method>.partial/` (`--fresh` discards it).
The work is done by :func:`pipeline.evaluation.evaluate.run_evaluate`.

A user dataset (an ``evaluate.coco`` / ``evaluate.folders`` entry) may be named by its whole entry, as
dvc.yaml does (``${item}`` unpacks it: ``--name mine --images ... --masks ... --mask_suffix .png``), so that
DVC re-runs exactly the stages whose entry changed; every given field must equal the params entry.
``--index-only`` validates a user dataset like the index stage (no method, no model) and writes
``<index-dir>/<name>/{index,quarantine}.parquet`` and ``<out>/<name>/index.json``:

    python -m stages.evaluate --params params.yaml --index-only --name mine --out metrics/eval \
        --index-dir data/eval_index
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.common.cli import run_stage
from pipeline.config import load_params
from pipeline.evaluation.evaluate import run_evaluate
from pipeline.evaluation.user_datasets import ENTRY_FIELDS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    parser.add_argument("--benchmark", "--name", dest="benchmark", required=True,
                        help="an HQ eval set, or the name of an evaluate.coco / evaluate.folders entry")
    parser.add_argument("--method", help="method name (pipeline.modeling.methods.METHODS); not with --index-only")
    parser.add_argument("--all-methods", action="store_true",
                        help="an HQ set: score every evaluate.methods entry in this process, reusing the finished "
                             "outputs of methods whose inputs did not change (what dvc.yaml runs)")
    parser.add_argument("--index-only", action="store_true",
                        help="validate the user dataset --benchmark and write its index + quarantine list")
    parser.add_argument("--index-dir", type=Path, default=Path("data/eval_index"),
                        help="with --index-only: writes <index-dir>/<benchmark>/{index,quarantine}.parquet")
    for key in ENTRY_FIELDS:
        parser.add_argument(f"--{key}", *([f"--{key.replace('_', '-')}"] if "_" in key else []), dest=f"entry_{key}",
                            help=f"must equal the entry's {key} in params (dvc.yaml passes the whole entry)")
    parser.add_argument("--embeddings", type=Path, default=Path("data/embeddings"), help="embedding cache root")
    parser.add_argument("--prompts", type=Path, default=Path("data/prompts/eval.parquet"), help="eval prompts parquet")
    parser.add_argument("--base", type=Path, default=Path("models/base"), help="base model folder (sam.pt + base.json)")
    parser.add_argument("--plugins", type=Path, default=Path("models/plugins"), help="folder of trained <method>.pt files")
    parser.add_argument("--out", type=Path, required=True, help="metrics folder: writes <out>/<benchmark>/<method>.json")
    parser.add_argument("--predictions", type=Path, help="writes <predictions>/<benchmark>/<method>.parquet")
    parser.add_argument("--fresh", action="store_true", help="discard partial results of an interrupted run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.all_methods and (args.method is not None or args.index_only):
        parser.error("--all-methods scores every evaluate.methods entry: not with --method or --index-only")
    if not args.index_only and ((args.method is None and not args.all_methods) or args.predictions is None):
        parser.error("--method (or --all-methods) and --predictions are required (unless --index-only)")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def work() -> None:
        with logging_redirect_tqdm():
            run_evaluate(
                load_params(args.params), args.benchmark, args.method,
                entry={k: getattr(args, f"entry_{k}") for k in ENTRY_FIELDS}, index_only=args.index_only,
                index_dir=args.index_dir, embeddings=args.embeddings, prompts=args.prompts, base=args.base,
                plugins=args.plugins, out=args.out, predictions=args.predictions, fresh=args.fresh,
                progress=not args.quiet, all_methods=args.all_methods,
            )

    return run_stage("evaluate", work)


if __name__ == "__main__":
    sys.exit(main())
