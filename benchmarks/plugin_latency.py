"""Per-prompt mask-decoder latency with and without the Stable-SAM plugins, on the same embeddings.

Times ``sam`` (the frozen decoder) against a plugin method (default ``stable_sam``: DSP + DRP in layer 2)
on identical random embeddings ``[B, C, g, g]`` and box prompts, single (B = 1) and batched (B = 32), under
``torch.inference_mode``, after warm-up, as the median of N repeats (CUDA is synchronised). Uses the
base model in ``--base`` when it exists (its grid), else a random-init SAM prompt encoder + mask decoder
at g = 64, C = 256 (the official ViT decoders' shape; the decoder cost does not depend on the encoder).
The plugin's trained weights do not change its cost, so an untrained plugin is timed.
The LAST line printed is a JSON object: ``ratio`` (plugin / vanilla, batched, per prompt) + raw numbers.

    python benchmarks/plugin_latency.py                       # models/base if present, device auto
    python benchmarks/plugin_latency.py --grid 64 --repeats 20 --device cuda
    python benchmarks/plugin_latency.py --grid 32 --repeats 3 --warmup 1   # a quick CPU check
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import load_params  # noqa: E402
from pipeline.modeling.methods import PromptBatch, build_method  # noqa: E402


def _load_sam(base: Path, grid: int) -> tuple[Any, str]:
    if (base / "base.json").is_file():
        from pipeline.modeling.backbones import load_base

        sam, info = load_base(base)
        return sam, f"{base} ({info.get('variant')})"
    from pipeline.modeling.backbones import build_tiny, freeze

    # Only the prompt encoder and mask decoder are timed; the tiny encoder just fixes img_size = 16 g.
    return freeze(build_tiny(img_size=16 * grid, grid=grid)), f"random-init SAM decoder (g={grid}, C=256)"


def macs_per_image_token(sam: Any, tokens: int, plugin: bool) -> float:
    """Multiply-accumulates per image-grid cell of one single-mask decode (the image-side work, which is all
    but a few per mille of it): SAM's projections of the image side in both two-way layers and the final
    attention, the attention products with ``tokens`` tokens, the two upscaling transposed convs and the mask
    product; with ``plugin``, DSP's 1x1 re-projection, depth-wise conv and offset conv (DRP works on one token).
    The ratio of the two is the arithmetic floor of ``ratio`` for exact rewrites."""
    dec = sam.mask_decoder
    t = dec.transformer
    c = int(dec.transformer_dim)
    total = 0.0
    for layer in t.layers:
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        total += 2 * c * t2i.internal_dim + 2 * tokens * t2i.internal_dim  # k, v projections; q.k and attn.v
        total += 2 * c * i2t.internal_dim + 2 * tokens * i2t.internal_dim  # q and out projections; products
    fin = t.final_attn_token_to_image
    total += 2 * c * fin.internal_dim + 2 * tokens * fin.internal_dim
    up1, up2 = dec.output_upscaling[0], dec.output_upscaling[3]
    total += up1.in_channels * up1.out_channels * 4 + 4 * up2.in_channels * up2.out_channels * 4
    total += 16 * up2.out_channels  # hypernetwork mask product, one mask
    if plugin:
        total += c * c + 25 * c + 2 * c  # DSP: 1x1 projection, 5x5 depth-wise conv, 1x1 offset conv
    return total


def _time(fn: Any, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    params = load_params(args.params)
    sam, source = _load_sam(args.base, args.grid)
    sam = sam.to(device)
    grid = int(sam.prompt_encoder.image_embedding_size[0])
    channels = int(sam.mask_decoder.transformer_dim)
    img_size = int(sam.image_encoder.img_size)
    methods = {m: build_method(m, sam, params.plugin).to(device).eval() for m in ("sam", args.method)}
    gen = torch.Generator().manual_seed(0)
    result: dict[str, Any] = {"device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
                              "model": source, "grid": grid, "channels": channels, "method": args.method,
                              "threads": torch.get_num_threads(), "warmup": args.warmup, "repeats": args.repeats}
    for label, b in (("single", 1), ("batched", args.batch)):
        emb = torch.randn(b, channels, grid, grid, generator=gen).to(device)
        xy = torch.rand(b, 2, 2, generator=gen) * img_size
        boxes = torch.cat([xy.min(1).values, xy.max(1).values], dim=1).to(device)
        prompts = PromptBatch(boxes=boxes)
        for name, dec in methods.items():
            with torch.inference_mode():
                sec = _time(lambda: dec(emb, prompts, multimask_output=False), device, args.warmup, args.repeats)
            result[f"{name}_{label}_ms"] = sec * 1e3
            result[f"{name}_{label}_ms_per_prompt"] = sec * 1e3 / b
        result[f"{label}_batch"] = b
    result["single_ratio"] = result[f"{args.method}_single_ms"] / result["sam_single_ms"]
    result["ratio"] = round(result[f"{args.method}_batched_ms"] / result["sam_batched_ms"], 3)
    result["single_ratio"] = round(result["single_ratio"], 3)
    result["goal"] = "<= 1.10"  # batched and single
    tokens = 1 + int(sam.mask_decoder.num_mask_tokens) + 2  # IoU token, mask tokens, a box's two corners
    result["arithmetic_floor"] = round(macs_per_image_token(sam, tokens, True) / macs_per_image_token(sam, tokens, False), 3)
    result["plugin_params"] = int(methods[args.method].num_trainable)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (plugin section)")
    parser.add_argument("--base", type=Path, default=Path("models/base"), help="base model folder, used if it exists")
    parser.add_argument("--grid", type=int, default=64, help="embedding grid when no base model is found (default 64)")
    parser.add_argument("--method", default="stable_sam", help="plugin method to compare with sam")
    parser.add_argument("--batch", type=int, default=32, help="prompts per batched call (default 32)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    args = parser.parse_args(argv)
    result = run(args)
    print(f"{result['model']} on {result['device']}:")
    for label in ("single", "batched"):
        print(f"  {label:8s} B={result[label + '_batch']:3d}  sam {result['sam_' + label + '_ms_per_prompt']:.3f} ms/prompt"
              f"  {args.method} {result[args.method + '_' + label + '_ms_per_prompt']:.3f} ms/prompt")
    print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
