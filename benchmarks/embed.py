"""Benchmark: the embed stage's images/s vs a bare encoder forward on the same images; bf16 vs fp32.

    python -m benchmarks.embed                          # generated scenes, the default tiny SAM (random init)
    python -m benchmarks.embed --base models/base       # the real frozen base (its weights make the IoU check meaningful)
    python -m benchmarks.embed --images 8 --variant vit_b   # random-init ViT-B at 1024² (slow on a CPU)

Reports (last line, one JSON object):
- ``ratio`` = embed-stage images/s (render + preprocess + encode + fp16 Parquet shards + CACHE.json, with
  the params' ``embed.render_workers``) / bare ``image_encoder`` forward images/s on the same
  pre-rendered batches. Goal >= 0.90. ``ratio_render_workers_<n>``: the same with n render threads.
- ``bf16_speedup`` = fp32 / bf16-autocast forward time, and ``bf16_max_abs_miou_change``: the largest
  per-view change of mask IoU (vs the view's GT) that bf16 embeddings cause when the base decoder is
  prompted with GT boxes (``bf16_mean_miou_change`` the mean).
"""
from __future__ import annotations

import argparse
import io
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from pipeline.config import load_params
from pipeline.data import rle
from pipeline.data.embed import embed_views, encode, render_batch, sort_views
from pipeline.data.embedding_reader import iter_views
from pipeline.data.index import INDEX_SCHEMA, METADATA_KEY, mask_box
from pipeline.data.synthetic import generate_sample
from pipeline.data.views import build_views
from pipeline.evaluation.metrics import mask_iou

PROJECT = Path(__file__).resolve().parent.parent


def make_images(root: Path, n: int, seed: int = 0) -> pa.Table:
    """``n`` generated scenes (JPEG + PNG mask) under ``root``; returns their index table."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        s = generate_sample(rng, "salient" if i % 2 else "thin", 256, 480, 3)
        stem = f"img{i:04d}"
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, format="JPEG", quality=92)
        (root / "BENCH").mkdir(parents=True, exist_ok=True)
        (root / "BENCH" / f"{stem}.jpg").write_bytes(buf.getvalue())
        Image.fromarray(s.target.astype(np.uint8) * 255).save(root / "BENCH" / f"{stem}.png")
        h, w = s.target.shape
        rows.append({"sample_id": f"BENCH/{stem}", "dataset": "BENCH", "split": "train",
                     "image_path": f"BENCH/{stem}.jpg", "mask_path": f"BENCH/{stem}.png", "height": h, "width": w,
                     "mask_area": int(s.target.sum()), "box": list(mask_box(s.target)), "content_sha256": f"{i:064x}"})
    meta = {METADATA_KEY: json.dumps({"mask_threshold": 128}).encode()}
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA.with_metadata(meta))


def load_model(base: Path | None, variant: str) -> tuple[torch.nn.Module, dict]:
    from pipeline.modeling.backbones import build_sam, get_spec, load_base

    if base is not None:
        return load_base(base)
    torch.manual_seed(0)
    sam = build_sam(variant)
    spec = get_spec(variant)
    info = {"variant": variant, "checkpoint_sha256": "0" * 64, "img_size": spec.img_size, "grid": spec.grid,
            "channels": int(sam.prompt_encoder.embed_dim)}
    return sam, info


def time_forward(encoder: torch.nn.Module, batches: list[torch.Tensor], bf16: bool) -> float:
    device = torch.device("cpu")
    t = time.perf_counter()
    for x in batches:
        encode(encoder, x, device, bf16)
    return time.perf_counter() - t


def miou_changes(sam: torch.nn.Module, fp32_root: Path, bf16_root: Path, img_size: int) -> list[float]:
    """Per view: IoU(bf16 masks, GT) - IoU(fp32 masks, GT), the base decoder prompted with the GT box."""
    from pipeline.inference.predictor import Predictor
    from pipeline.modeling.methods import sam_decoder

    predictor = Predictor(sam, sam_decoder(sam).eval())
    out = []
    bf16_rows = {r["view_id"]: r for r in iter_views(bf16_root, "train")}
    for r in iter_views(fp32_root, "train"):
        gt = rle.decode(r["mask_rle"], r["height"], r["width"])
        ious = []
        for emb in (r["embedding"], bf16_rows[r["view_id"]]["embedding"]):
            predictor.set_embedding(emb, (r["height"], r["width"]), (r["input_h"], r["input_w"]))
            masks, _, _ = predictor.predict(box=np.asarray(mask_box(gt), np.float32), multimask_output=False)
            ious.append(mask_iou(masks[0], gt))
        out.append(ious[1] - ious[0])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", type=Path, default=None, help="frozen base folder (models/base); default: random init")
    ap.add_argument("--variant", default="tiny", help="random-init variant when no --base (tiny, vit_b, ...)")
    ap.add_argument("--images", type=int, default=16, help="source images (each gives ~3-4 training views)")
    ap.add_argument("--max-views", type=int, default=0, help="use only the first N views (0 = all; for slow encoders)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the render_workers sweep (slow encoders)")
    ap.add_argument("--repeats", type=int, default=3, help="timings are the best of this many runs")
    ap.add_argument("--params", type=Path, default=PROJECT / "params.yaml")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    sam, info = load_model(args.base, args.variant)
    img_size = int(info["img_size"])
    cfg = replace(params.embed, device="cpu", bf16=False)
    torch.set_grad_enabled(False)
    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        root = Path(tmp) / "data"
        index = make_images(root, args.images)
        views, _ = build_views(index, root, params.views, output_size=img_size, mask_threshold=128, progress=False)
        views = sort_views(views)
        if args.max_views:
            views = views.slice(0, args.max_views)
        n = views.num_rows
        rows = views.to_pylist()
        # the same batches the stage encodes (batches never cross shards; one shard here when n <= shard_rows)
        cfg = replace(cfg, shard_rows=max(cfg.shard_rows, n))
        batches = [render_batch(rows[s:s + cfg.batch_size], root, img_size)[0] for s in range(0, n, cfg.batch_size)]
        encoder = sam.image_encoder.eval()
        for bf16 in (False, True) if not args.no_sweep else ():  # warm-up: oneDNN primitives for both batch shapes
            time_forward(encoder, [batches[0], batches[-1]] if len(batches) > 1 else batches, bf16)
        t_bf16 = min(time_forward(encoder, batches, True) for _ in range(args.repeats))

        def stage(out: Path, **kw) -> float:
            """One full stage run into a fresh folder (nothing is resumed)."""
            t = time.perf_counter()
            embed_views(views, root, sam, info, out, replace(cfg, **kw), progress=False)
            return time.perf_counter() - t

        if not args.no_sweep:  # one-time costs of a first stage run (imports, pools, first shapes) are not throughput
            embed_views(views.slice(0, cfg.batch_size), root, sam, info, Path(tmp) / "warm", cfg, progress=False)
        # Interleaved: every stage run right after a bare forward over the same batches, so a change of the
        # machine's load during the benchmark hits both sides alike; each side's time is its best run.
        sweep = () if args.no_sweep else (0, 1, 2)
        bare_runs: list[float] = []
        stage_runs: list[float] = []
        worker_runs: dict[int, list[float]] = {w: [] for w in sweep}
        for r in range(args.repeats):
            bare_runs.append(time_forward(encoder, batches, False))
            stage_runs.append(stage(Path(tmp) / f"emb_fp32_{r}"))
            for w in sweep:
                worker_runs[w].append(stage(Path(tmp) / f"emb_fp32_w{w}_{r}", render_workers=w))
        t_bare, t_stage = min(bare_runs), min(stage_runs)
        t_workers = {w: min(runs) for w, runs in worker_runs.items()}
        embed_views(views, root, sam, info, Path(tmp) / "emb_bf16", replace(cfg, bf16=True), progress=False)
        changes = miou_changes(sam, Path(tmp) / "emb_fp32_0", Path(tmp) / "emb_bf16", img_size)

    result = {
        "benchmark": "embed",
        "ratio": round(t_bare / t_stage, 3),
        **{f"ratio_render_workers_{w}": round(t_bare / t, 3) for w, t in t_workers.items()},
        "render_workers": cfg.render_workers,
        "stage_img_per_s": round(n / t_stage, 2),
        "bare_forward_img_per_s": round(n / t_bare, 2),
        "bf16_forward_img_per_s": round(n / t_bf16, 2),
        "bf16_speedup": round(t_bare / t_bf16, 3),
        "bf16_max_abs_miou_change": round(max(abs(c) for c in changes), 5),
        "bf16_mean_miou_change": round(float(np.mean(changes)), 5),
        "views": n,
        "batch_size": cfg.batch_size,
        "variant": info["variant"],
        "img_size": img_size,
        "weights": "base" if args.base else "random-init",
        "torch_threads": torch.get_num_threads(),
        "goal": "ratio >= 0.90",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
