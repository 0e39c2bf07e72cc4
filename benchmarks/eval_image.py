"""Benchmark: evaluation time per image as the ``evaluate`` stage scores it vs the bare decoder forward.

    python -m benchmarks.eval_image                            # embedded default: tiny base, 256 px, 32x32 grid
    python -m benchmarks.eval_image --repeats 1 --warmup 0 --images 1   # a quick check

The inputs are written with the production writers into a temp dir (``benchmarks.train_step.build_workload``):
``--images`` generated eval scenes of the embedded default (``params.generate`` sizes) embedded by the
embedded default's base (``assets/tiny_sam.pt``) into an embedding cache of the first
``evaluate.benchmarks`` set, and the prompts stage's own ``eval.parquet`` (every ``prompts.eval_types``,
``prompts.eval_draws`` draws each). The method is ``--method`` (default ``stable_sam``, untrained: its
weights do not change its cost).

- stage: ``evaluate_with_predictor`` on that benchmark, as the evaluate stage runs it (cache reader, GT
  decode, prompts grouped by signature and decoded ``evaluate.batch_size`` at a time, post-processing to
  the original resolution, mask IoU, Boundary IoU, RLE, stability, resumable part files, the parquet and
  JSON outputs), divided by the number of images;
- bare: the decoder forward alone for the same images' prompt tensors already in memory (one call per
  prompt signature and ``evaluate.batch_size`` chunk, as the stage batches them), per image;
- bf16: the same stage with the decoder under bf16 autocast (``evaluate.bf16``): ``bf16_speedup`` = stage
  fp32 / stage bf16 time, ``bf16_max_abs_miou_change`` the largest change of a prompt type's mIoU (points),
  ``bf16_native`` whether this CPU has native bf16 (what ``evaluate.bf16: auto`` turns it on for);
- breakdown: an instrumented run of the same stage call, exclusive seconds per image: ``load`` (reader +
  GT decode), ``prompts`` (grouping + collation), ``prompt_encoding`` (SAM's prompt encoder), ``decode``
  (the rest of the decoder), ``postprocess``, ``iou``, ``boundary_iou``, ``rle``, ``stability``, ``write``
  (part files), ``other`` (score bookkeeping, outputs, summary); ``instrumented_image_s`` is their sum.

The three run side by side, interleaved per repeat, after warm-up; times are medians over repeats.
Goal: ``ratio`` = stage / bare <= 2.0 (``paired_ratio_median``: the median of the per-repeat ratios,
steadier on a busy machine). The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Sequence

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.train_step import (  # noqa: E402
    PROJECT, PartClock, build_workload, run_cli, summarize_parts, sync, timed,
)
from pipeline.config import Params, load_params  # noqa: E402
from pipeline.modeling.methods import PromptBatch  # noqa: E402

GOAL = 2.0


def bare_inputs(predictor: Any, embeddings: Path, prompts: Path, dataset: str,
                batch_size: int) -> list[tuple[torch.Tensor, list[PromptBatch]]]:
    """Per image: its embedding ``[1, C, g, g]`` and its prompts as the stage batches them (per signature,
    ``batch_size`` at a time), collated in the model-input frame, on the predictor's device."""
    from pipeline.data import rle
    from pipeline.evaluation.evaluate import _load_prompts
    from pipeline.data.embedding_reader import iter_views
    from pipeline.inference.prompts import collate, group_by_signature

    stored = _load_prompts(prompts, dataset)
    out = []
    for row in iter_views(embeddings, "eval", datasets=[dataset]):
        hw = (int(row["height"]), int(row["width"]))
        rle.decode(row["mask_rle"], *hw)  # a row the stage could score
        ps = [p.in_input_frame(hw, predictor.img_size, predictor.mode) for p in stored[row["view_id"]]]
        batches = [collate([ps[i] for i in members[s : s + batch_size]], predictor.device)
                   for _sig, members in group_by_signature(ps) for s in range(0, len(members), batch_size)]
        out.append((row["embedding"].to(predictor.device, torch.float32)[None], batches))
    return out


@torch.inference_mode()
def bare_decode(predictor: Any, images: Sequence[tuple[torch.Tensor, list[PromptBatch]]]) -> None:
    """The decoder forward alone for every prompt batch of every image."""
    for feats, batches in images:
        for batch in batches:
            rows = next(t.shape[0] for t in (batch.boxes, batch.points, batch.mask_inputs) if t is not None)
            predictor.decoder(feats.expand(rows, -1, -1, -1), batch, multimask_output=False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.evaluation import evaluate as ev
    from pipeline.evaluation import predict
    from pipeline.inference import predictor as predictor_mod
    from pipeline.inference.predictor import Predictor, native_bf16, resolve_bf16, resolve_device
    from pipeline.modeling.methods import build_method

    params: Params = load_params(args.params)
    if args.repeats < 1 or args.warmup < 0 or args.images < 1:
        raise SystemExit(f"--repeats and --images must be >= 1, --warmup >= 0; got {args.repeats}, {args.images}, "
                         f"{args.warmup}")
    with tempfile.TemporaryDirectory(prefix="bench_eval_image_") as tmp:
        work = build_workload(Path(tmp), params, train_views=1, eval_views=args.images)
        device = resolve_device(params.evaluate.device)
        torch.manual_seed(params.seed)
        decoder = build_method(args.method, work.sam, params.plugin)
        predictor = Predictor(work.sam, decoder, postprocess=params.evaluate.postprocess, info=work.info).to(device)
        predictor_bf16 = Predictor(work.sam, decoder, postprocess=params.evaluate.postprocess, info=work.info,
                                   bf16=True).to(device)
        prompts = work.prompts / "eval.parquet"
        fingerprint = {"method": args.method, "base": work.info["checkpoint_sha256"]}

        last: dict[bool, dict[str, Any]] = {}  # each precision's latest metrics

        def stage(bf16: bool = False) -> dict[str, Any]:
            tag = "_bf16" if bf16 else ""
            last[bf16] = ev.evaluate_with_predictor(params, work.eval_dataset, args.method,
                                              predictor_bf16 if bf16 else predictor, embeddings=work.embeddings,
                                              prompts=prompts, out=Path(tmp) / f"metrics{tag}",
                                              predictions=Path(tmp) / f"predictions{tag}", fingerprint=fingerprint,
                                              progress=False)
            return last[bf16]

        def instrumented() -> dict[str, float]:
            clock = PartClock(device)
            with ExitStack() as stack:
                stack.enter_context(clock.patch(ev, "_cache_items", "load", generator=True))
                stack.enter_context(clock.patch(predictor_mod, "group_by_signature", "prompts"))
                stack.enter_context(clock.patch(predictor_mod, "collate", "prompts"))
                stack.enter_context(clock.hook(predictor.decoder, "decode"))
                stack.enter_context(clock.hook(predictor.decoder.prompt_encoder, "prompt_encoding"))
                stack.enter_context(clock.patch(predictor, "postprocess", "postprocess"))
                stack.enter_context(clock.patch(predict, "mask_iou_many", "iou"))
                stack.enter_context(clock.patch(predict, "mask_to_boundary_many", "boundary_iou"))
                stack.enter_context(clock.patch(predict, "boundary_iou_many", "boundary_iou"))
                stack.enter_context(clock.patch(predict, "_encode_rles", "rle"))
                stack.enter_context(clock.patch(ev, "stability_from_rles", "stability"))
                stack.enter_context(clock.patch(ev.PartialResults, "flush", "write"))
                with clock.time("other"):
                    stage()
            return {k: v / args.images for k, v in clock.parts.items()}

        images = bare_inputs(predictor, work.embeddings, prompts, work.eval_dataset, params.evaluate.batch_size)
        n_prompts = sum(int(next(t.shape[0] for t in (b.boxes, b.points, b.mask_inputs) if t is not None))
                        for _f, bs in images for b in bs)
        t_stage, t_bare, t_inst, parts, t_bf16 = [], [], [], [], []
        for i in range(args.warmup + args.repeats):
            ts = timed(stage, device) / args.images
            p = instrumented()
            tb = timed(lambda: bare_decode(predictor, images), device) / args.images
            t16 = timed(lambda: stage(bf16=True), device) / args.images
            if i >= args.warmup:
                t_stage.append(ts)
                t_bare.append(tb)
                t_inst.append(sum(p.values()))
                parts.append(p)
                t_bf16.append(t16)
        sync(device)
        stage_s, bare_s, bf16_s = statistics.median(t_stage), statistics.median(t_bare), statistics.median(t_bf16)
        miou_changes = [last[True][k]["miou"] - last[False][k]["miou"] for k in last[False]]
        sizes = _image_pixels(work.embeddings, work.eval_dataset)
        return {
            "benchmark": "eval_image",
            "ratio": round(stage_s / bare_s, 3),
            "goal": f"<= {GOAL}",
            "paired_ratio_median": round(statistics.median(a / b for a, b in zip(t_stage, t_bare)), 3),
            "stage_image_s": round(stage_s, 5),
            "bare_image_s": round(bare_s, 5),
            "breakdown_s": summarize_parts(parts),
            "instrumented_image_s": round(statistics.median(t_inst), 5),
            # evaluate.bf16: the same stage with the decoder under bf16 autocast (speed option, not the ratio)
            "bf16_stage_image_s": round(bf16_s, 5),
            "bf16_speedup": round(stage_s / bf16_s, 3),
            "bf16_max_abs_miou_change": round(max(abs(c) for c in miou_changes), 4),
            "bf16_native": native_bf16(device),
            "bf16_auto": resolve_bf16(params.evaluate.bf16, device),
            "method": args.method,
            "model": work.model_source,
            "images": args.images,
            "prompts_per_image": round(n_prompts / args.images, 2),
            "decoder_calls_per_image": round(sum(len(bs) for _f, bs in images) / args.images, 2),
            "mean_megapixels": round(sum(sizes) / len(sizes) / 1e6, 4),
            "eval_types": list(params.prompts.eval_types),
            "eval_draws": params.prompts.eval_draws,
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),  # the Makefile sets it
            "warmup": args.warmup,
            "repeats": args.repeats,
        }


def _image_pixels(embeddings: Path, dataset: str) -> list[int]:
    from pipeline.data.embedding_reader import iter_views

    return [int(r["height"]) * int(r["width"]) for r in iter_views(embeddings, "eval", datasets=[dataset])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=PROJECT / "params.yaml", help="params file (embedded default)")
    ap.add_argument("--method", default="stable_sam", help="method to score (pipeline.modeling.methods)")
    ap.add_argument("--images", type=int, default=4, help="eval images per pass (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed passes first (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes; times are medians (default 3)")
    return run_cli(ap, run, argv)


if __name__ == "__main__":
    sys.exit(main())
