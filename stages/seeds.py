"""DVC stage ``seeds``: retrain ``seeds.methods`` with the seeds of ``seeds.extra`` and report mean ± std.

    python -m stages.seeds --params params.yaml --embeddings data/embeddings --prompts data/prompts \\
        --base models/base --eval-dir metrics/eval --work models/seeds --out metrics/seeds.json

The pipeline's own run (params ``seed``) is the first sample; see pipeline/evaluation/seeds.py.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipeline.config import ConfigError, load_params
from pipeline.evaluation.predict import EvaluationError
from pipeline.evaluation.report import ReportError
from pipeline.evaluation.seeds import run_seeds
from pipeline.modeling.plugin_file import PluginFileError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.seeds", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--embeddings", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True, help="folder with train.parquet and eval.parquet")
    ap.add_argument("--base", type=Path, required=True)
    ap.add_argument("--eval-dir", type=Path, required=True, help="the evaluate stage's metrics (the first seed)")
    ap.add_argument("--work", type=Path, required=True, help="folder for the extra seeds' plugins, checkpoints, scores")
    ap.add_argument("--out", type=Path, required=True, help="metrics/seeds.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = run_seeds(load_params(args.params), embeddings=args.embeddings, prompts=args.prompts, base=args.base,
                           eval_dir=args.eval_dir, work=args.work, out=args.out)
    except (ConfigError, ReportError, EvaluationError, PluginFileError, FileNotFoundError, ValueError) as exc:
        print(f"seeds: error: {exc}", file=sys.stderr)
        return 2
    for method, block in result["methods"].items():
        for prompt in ("noisy_box", "point_1"):
            r = block.get(prompt, {}).get("recovery")
            if r:
                print(f"{method} R_{prompt}: {r['mean']:.3f} ± {r['std']:.3f} over {r['n']} seeds")
    print(json.dumps({"out": str(args.out), "seeds": result["seeds"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
