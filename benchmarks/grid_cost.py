"""Benchmark: what SAM's own 64x64 embedding grid would cost the embedded default, against its 32x32 grid.

    python -m benchmarks.grid_cost                          # batch = train.batch_size, 3 timed repeats (~4 min here)
    python -m benchmarks.grid_cost --batch 2 --repeats 1    # a quick check

The embedded base is a convolutional encoder with stride 8, so the same weights give a 32x32 grid at 256 px
(the default) and a 64x64 grid at 512 px, SAM's grid (pipeline/modeling/tiny_encoder.py). Both models are
built at random init (values do not change the cost) and timed side by side, interleaved per repeat, each
time the median:

- ``<method>_step_s``: one decoder forward + ``logits.sum()`` backward on ``batch`` cached embeddings with a
  box prompt each (what a training step of the train stage costs, ``benchmarks/train_step.py``), for
  ``stable_sam`` (the plugins' step) and ``dt_sam`` (the whole decoder, the fidelity study's ceiling);
- ``encoder_forward_s``: the image encoder's forward on ``batch`` images, no grad (the embed stage);
- ``encoder_step_s``: its forward + backward (base pre-training, ``stages.pretrain_base``).

``ratio`` = ``stable_sam_step_s`` at 64x64 / at 32x32; ``ratios`` holds every quantity's. There is no goal:
reports/fidelity.md §11 uses these numbers to say what a 64x64 base would cost on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from pipeline.config import PluginConfig, load_params
from pipeline.modeling.backbones import build_tiny
from pipeline.modeling.methods import PromptBatch, build_method

PROJECT = Path(__file__).resolve().parent.parent
GEOMETRIES = ((256, 32), (512, 64))  # (input px, grid): the default, and SAM's grid with the same weights
METHODS = ("stable_sam", "dt_sam")


def timed(fn: Callable[[], None]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def workloads(img_size: int, grid: int, batch: int, plugin: PluginConfig) -> dict[str, Callable[[], None]]:
    """name -> a closure running one unit of that work at this geometry."""
    torch.manual_seed(0)
    sam = build_tiny(img_size, grid)
    emb = torch.randn(batch, int(sam.prompt_encoder.embed_dim), grid, grid)
    box = torch.tensor([[0.2, 0.2, 0.7, 0.6]]) * img_size
    prompts = PromptBatch(boxes=box.repeat(batch, 1))
    work: dict[str, Callable[[], None]] = {}
    for name in METHODS:
        model = build_method(name, sam, plugin)  # freezes sam; dt_sam trains its own decoder copy

        def step(model=model) -> None:
            model(emb, prompts).low_res_logits.sum().backward()
            model.zero_grad(set_to_none=True)
        work[f"{name}_step_s"] = step
    encoder = sam.image_encoder
    for p in encoder.parameters():  # build_method froze the whole SAM; pre-training trains the encoder
        p.requires_grad_(True)
    images = torch.randn(batch, 3, img_size, img_size)

    def forward() -> None:
        with torch.no_grad():
            encoder.eval()(images)

    def encoder_step() -> None:
        encoder.train()(images).sum().backward()
        encoder.zero_grad(set_to_none=True)
    work["encoder_forward_s"] = forward
    work["encoder_step_s"] = encoder_step
    return work


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=PROJECT / "params.yaml")
    ap.add_argument("--batch", type=int, default=0, help="rows per step (default: train.batch_size)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (each time is the median)")
    args = ap.parse_args(argv)

    params = load_params(args.params)
    batch = args.batch or params.train.batch_size
    work = {geo: workloads(*geo, batch, params.plugin) for geo in GEOMETRIES}
    for geo in GEOMETRIES:  # warm-up: first shapes, oneDNN primitives
        for fn in work[geo].values():
            fn()
    runs: dict[tuple[int, int], dict[str, list[float]]] = {geo: {k: [] for k in work[geo]} for geo in GEOMETRIES}
    for _ in range(args.repeats):
        for key in work[GEOMETRIES[0]]:
            for geo in GEOMETRIES:  # the two geometries back to back: a change of load hits both
                runs[geo][key].append(timed(work[geo][key]))
    med = {geo: {k: statistics.median(v) for k, v in runs[geo].items()} for geo in GEOMETRIES}
    small, large = GEOMETRIES
    result = {
        "benchmark": "grid_cost",
        "ratio": round(med[large]["stable_sam_step_s"] / med[small]["stable_sam_step_s"], 2),
        "ratios": {k: round(med[large][k] / med[small][k], 2) for k in med[small]},
        **{f"grid_{g}": {"img_size": s, **{k: round(v, 4) for k, v in med[(s, g)].items()}} for s, g in GEOMETRIES},
        "batch": batch,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "goal": "none: the cost of a 64x64 grid for the tiny base (reports/fidelity.md §11)",
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
