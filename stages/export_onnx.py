"""Export a trained method's prompt-to-mask decoder (plugins included) to ONNX; checks it in onnxruntime.

    python -m stages.export_onnx --method stable_sam --out stable_sam_decoder.onnx

Inputs/outputs follow segment-anything's exported decoder (pipeline/inference/onnx_export.py has the
table). After writing, the graph is run in onnxruntime next to PyTorch on one box and one point prompt
and the largest logit difference is printed; over ``--tolerance`` is an error (exit 2).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.config import ConfigError
from pipeline.inference.onnx_export import export_onnx, onnx_inputs
from pipeline.inference.predictor import Predictor
from pipeline.inference.prompts import Prompt, collate
from pipeline.modeling.plugin_file import PluginFileError


def parity(predictor: Predictor, path: Path) -> float:
    """Largest |logit| difference between onnxruntime and PyTorch on a box and a 2-point prompt."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    side = predictor.img_size
    emb = torch.randn(predictor.model.prompt_encoder.embed_dim, *predictor.grid, generator=torch.Generator().manual_seed(0))
    worst = 0.0
    for prompt in (Prompt(box=[0.1 * side, 0.2 * side, 0.7 * side, 0.8 * side]),
                   Prompt(points=[[0.4 * side, 0.5 * side], [0.1 * side, 0.1 * side]], point_labels=[1, 0])):
        _scores, low = session.run(None, onnx_inputs(prompt, emb, 4 * predictor.grid[0]))
        with torch.no_grad():
            want = predictor.decode(emb[None].to(predictor.device), collate([prompt], predictor.device))
        worst = max(worst, float(np.abs(low - want.low_res_logits.cpu().numpy()).max()))
    return worst


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
    plugin = args.plugin or (Path("models/plugins") / f"{args.method}.pt")
    try:
        predictor = Predictor.from_pretrained(args.base, args.method, plugin if plugin.is_file() else None, device="cpu")
        export_onnx(predictor.decoder, args.out, multimask_output=args.multimask)
        diff = parity(predictor, args.out) if not args.multimask else float("nan")
    except (PluginFileError, ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"export_onnx: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps({"method": args.method, "out": str(args.out), "bytes": args.out.stat().st_size,
                      "max_abs_logit_diff_vs_torch": diff}))
    if diff > args.tolerance:
        print(f"export_onnx: error: onnxruntime and PyTorch differ by {diff:.2e} > {args.tolerance}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
