"""Benchmark: a training step with the frozen ViT-B encoder in the loop vs one reading a cached embedding.

    python -m benchmarks.train_cache                   # 2 encoder-in-the-loop samples, 16 cached samples
    python -m benchmarks.train_cache --method stable_sam --encoder-samples 3

Both steps run batch 1 with a GT-box prompt through the same trainable decoder (default: Stable-SAM's
DSP + DRP plugins over SAM's mask decoder, ``pipeline.modeling.methods``), BCE loss on the low-res
logits, backward and an Adam step. The in-the-loop step first runs SAM ViT-B's image encoder
(``build_sam("vit_b")``: segment-anything's ViT-B, random init, no checkpoint, 1024²) frozen under
``torch.no_grad``; the cached step reads the embedding from a Parquet shard via EmbeddingDataset.
Goal: ``ratio`` = per-sample time (in the loop) / per-sample time (cached) >= 60. The last line printed
is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.config import load_params
from pipeline.data.embedding_reader import EmbeddingDataset
from pipeline.data.embedding_format import CacheMeta
from pipeline.modeling.backbones import build_sam
from pipeline.modeling.methods import PromptBatch, build_method
from pipeline.modeling.transforms import preprocess
from tests.fakes import write_synthetic_cache

PROJECT = Path(__file__).resolve().parent.parent


def step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, emb: torch.Tensor, box: torch.Tensor, target: torch.Tensor
) -> float:
    """Decoder forward + backward + optimiser step on ``emb [1, C, g, g]``; returns the loss."""
    out = model(emb, PromptBatch(boxes=box), multimask_output=False)
    loss = F.binary_cross_entropy_with_logits(out.low_res_logits[:, 0], target)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--method", default="stable_sam", help="trainable decoder (pipeline.modeling.methods)")
    ap.add_argument("--encoder-samples", type=int, default=2, help="in-the-loop steps timed (each runs ViT-B)")
    ap.add_argument("--cached-samples", type=int, default=16, help="cached steps timed")
    ap.add_argument("--params", type=Path, default=PROJECT / "params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    torch.manual_seed(0)
    sam = build_sam("vit_b")  # frozen, eval mode, random init
    model = build_method(args.method, sam, params.plugin)
    model.train()
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-3)
    g = sam.prompt_encoder.image_embedding_size[0]
    box = torch.tensor([[200.0, 240.0, 700.0, 800.0]])
    target = torch.zeros(1, 4 * g, 4 * g)
    target[:, 60:200, 50:175] = 1.0
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (768, 1024, 3), dtype=np.uint8)

    # in the loop: preprocess + frozen encoder + decoder step
    def in_the_loop() -> None:
        x, _ = preprocess(image, sam.image_encoder.img_size)
        with torch.no_grad():
            emb = sam.image_encoder(x[None])
        step(model, opt, emb, box, target)

    in_the_loop()  # warm-up
    t = time.perf_counter()
    for _ in range(args.encoder_samples):
        in_the_loop()
    per_encoder = (time.perf_counter() - t) / args.encoder_samples

    with tempfile.TemporaryDirectory(prefix="bench_train_cache_") as tmp:
        meta = CacheMeta(variant="vit_b", checkpoint_sha256="0" * 64, img_size=1024, grid=g, channels=256)
        n = args.cached_samples + 2
        write_synthetic_cache(tmp, {("SYN", "train"): n}, meta, shard_rows=64, row_group_size=16)
        rows = iter(EmbeddingDataset(tmp, "train", shuffle_buffer=16))
        for _ in range(2):  # warm-up
            step(model, opt, next(rows)["embedding"][None], box, target)
        t = time.perf_counter()
        for _ in range(args.cached_samples):
            step(model, opt, next(rows)["embedding"][None], box, target)
        per_cached = (time.perf_counter() - t) / args.cached_samples

    result = {
        "benchmark": "train_cache",
        "ratio": round(per_encoder / per_cached, 1),
        "per_sample_s_encoder_in_loop": round(per_encoder, 4),
        "per_sample_s_cached": round(per_cached, 5),
        "method": args.method,
        "trainable_params": int(model.num_trainable),
        "encoder": "vit_b random-init 1024",
        "encoder_samples": args.encoder_samples,
        "cached_samples": args.cached_samples,
        "torch_threads": torch.get_num_threads(),
        "goal": ">= 60",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
