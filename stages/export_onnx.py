"""Export a trained method's prompt-to-mask decoder (plugins included) to ONNX; checks it in onnxruntime.

    python -m stages.export_onnx --method stable_sam --out stable_sam_decoder.onnx

Inputs/outputs follow segment-anything's exported decoder (pipeline/inference/onnx_export.py has the
table). Before ``--out`` is written, the graph is run in onnxruntime next to PyTorch on one box and one
point prompt and the largest logit difference is printed; over ``--tolerance`` is an error (exit 2, no file).
The work is done by :func:`pipeline.inference.onnx_export.run_export_onnx`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.inference.onnx_export import run_export_onnx


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.export_onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="stable_sam")
    ap.add_argument("--plugin", type=Path, default=None, help="plugin file (default models/plugins/<method>.pt)")
    ap.add_argument("--base", type=Path, default=Path("models/base"))
    ap.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    ap.add_argument("--multimask", action="store_true", help="export SAM's 3 multimask outputs instead of 1")
    ap.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed onnxruntime vs PyTorch logit difference")
    args = ap.parse_args(argv)
    return run_stage("export_onnx", lambda: run_export_onnx(
        args.method, args.out, plugin=args.plugin, base=args.base, multimask=args.multimask, tolerance=args.tolerance))


if __name__ == "__main__":
    sys.exit(main())
