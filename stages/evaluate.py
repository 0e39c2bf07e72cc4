"""DVC stage `evaluate` (matrix benchmark x method): score one method on one benchmark.

    python -m stages.evaluate --params params.yaml --benchmark COIFT --method stable_sam \
        --embeddings data/embeddings --prompts data/prompts/eval.parquet --base models/base \
        --plugins models/plugins --out metrics/eval --predictions data/predictions

Reads params `evaluate` (postprocess, boundary ratio, device, batch size, coco/folders entries), `plugin`
(to rebuild the method), `prompts` (folder benchmarks and noisy COCO boxes), `data.max_images_per_set`
(COCO/folder cap) and `index` (folder masks). Writes `<out>/<benchmark>/<method>.json` and
`<predictions>/<benchmark>/<method>.parquet`; an interrupted run resumes from
`<predictions>/<benchmark>/.<method>.partial/` (`--fresh` discards it).
The work is done by :func:`pipeline.evaluation.evaluate.evaluate_benchmark`.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline.config import ConfigError, load_params
from pipeline.data.embeddings import StaleCacheError
from pipeline.evaluation.evaluate import evaluate_benchmark
from pipeline.evaluation.predict import EvaluationError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    parser.add_argument("--benchmark", required=True, help="an HQ eval set, or the name of an evaluate.coco / evaluate.folders entry")
    parser.add_argument("--method", required=True, help="method name (pipeline.modeling.methods.METHODS)")
    parser.add_argument("--embeddings", type=Path, default=Path("data/embeddings"), help="embedding cache root")
    parser.add_argument("--prompts", type=Path, default=Path("data/prompts/eval.parquet"), help="eval prompts parquet")
    parser.add_argument("--base", type=Path, default=Path("models/base"), help="base model folder (sam.pt + base.json)")
    parser.add_argument("--plugins", type=Path, default=Path("models/plugins"), help="folder of trained <method>.pt files")
    parser.add_argument("--out", type=Path, required=True, help="metrics folder: writes <out>/<benchmark>/<method>.json")
    parser.add_argument("--predictions", type=Path, required=True, help="writes <predictions>/<benchmark>/<method>.parquet")
    parser.add_argument("--fresh", action="store_true", help="discard partial results of an interrupted run")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.fresh:
        shutil.rmtree(args.predictions / args.benchmark / f".{args.method}.partial", ignore_errors=True)
    try:
        cfg = load_params(args.params)
        with logging_redirect_tqdm():
            metrics = evaluate_benchmark(
                cfg, args.benchmark, args.method,
                embeddings=args.embeddings, prompts=args.prompts, base=args.base, plugins=args.plugins,
                out=args.out, predictions=args.predictions, progress=not args.quiet,
            )
    except (ConfigError, FileNotFoundError, ValueError, KeyError, StaleCacheError, EvaluationError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.benchmark} / {args.method}:")
    for ptype, vals in sorted(metrics.items()):
        print(f"  {ptype:14s} " + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in vals.items()))
    print(json.dumps({"benchmark": args.benchmark, "method": args.method, "out": str(args.out / args.benchmark / f"{args.method}.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
