"""Benchmark: one step of the ``train`` stage vs the bare decoder forward + backward on the same batch.

    python -m benchmarks.train_step                              # embedded default: tiny base, 256 px, 32x32 grid
    python -m benchmarks.train_step --repeats 1 --warmup 0 --batch 2 --train-views 4   # a quick check

The inputs are written with the production writers into a temp dir: generated scenes of the embedded
default (``pipeline.data.synthetic``, ``params.generate`` sizes) as GT masks of an embedding cache
(``tests.fakes.write_cache`` -> ``embedding_format.write_shard``; random fp16 embeddings, whose values do
not change the decoder's cost), and the prompts stage's own ``train.parquet`` (``make_prompts``). The
model is the embedded default's base (``assets/tiny_sam.pt``; random init at ``base_pretrain``'s geometry
when it is missing) with ``--method``'s plugin (default ``stable_sam``).

- stage step: one iteration of the train stage's loop as ``pipeline.training.train`` runs it: the next
  batch of :class:`BatchStream` (reader, GT decode, soft target, stored prompt), lr, ``batch_loss`` (prompt
  grouping + collation, decoder forward, point-sampled BCE + Dice), the DDP reductions (no-ops in one
  process), backward and the Adam step;
- bare step: the decoder forward + ``logits.sum()`` backward for the same batch's embeddings and prompt
  tensors already in memory (same model, batch size and tokens);
- breakdown: a third, instrumented run of the same step code (``stage_step`` with a clock, hooks on the
  decoder and its prompt encoder, the train module's ``collate``/``group_by_signature``/``mask_loss``
  wrapped) in exclusive seconds: ``batch_assembly``, ``prompt_encoding`` (grouping + collation + SAM's
  prompt encoder), ``forward`` (the rest of the decoder), ``loss``, ``backward``, ``optimizer``, ``other``
  (stacking, sums, reductions); ``instrumented_step_s`` is their sum.

The three run side by side on the identical batch sequence (streams with the same seed), interleaved
per repeat, after warm-up; every time is a median over repeats. Goal: ``ratio`` = stage / bare <= 1.3
(``paired_ratio_median``: the median of the per-repeat ratios, steadier on a busy machine).
The last line printed is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import Params, load_params, replace  # noqa: E402
from pipeline.modeling.methods import PromptableDecoder, PromptBatch  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
BASE_ASSET = PROJECT / "assets" / "tiny_sam.pt"
TRAIN_DATASET = "DUTS-TR"
GOAL = 1.3
_MISSING = object()


# ------------------------------------------------------------------------------------------ inputs
@dataclass(frozen=True)
class Workload:
    """A synthetic embedded-default workload in a temp dir: cache, prompt tables and the frozen base."""

    embeddings: Path
    prompts: Path  # the prompts stage's output folder (train.parquet, eval.parquet)
    sam: Any  # segment_anything Sam, frozen
    info: dict[str, Any]  # as load_base returns it
    eval_dataset: str
    model_source: str


def load_embedded_base(params: Params) -> tuple[Any, dict[str, Any], str]:
    """The embedded default's frozen base (``assets/tiny_sam.pt``) at ``base_pretrain``'s geometry, or a
    random-init tiny SAM of that geometry when the asset is missing; returns (sam, info, description)."""
    from pipeline.common.hashing import sha256_file
    from pipeline.modeling.backbones import build_sam

    img, grid = params.base_pretrain.img_size, params.base_pretrain.grid
    if BASE_ASSET.is_file():
        sam, sha, source = build_sam("tiny", BASE_ASSET, img_size=img, grid=grid), sha256_file(BASE_ASSET), str(BASE_ASSET.relative_to(PROJECT))
    else:
        torch.manual_seed(0)
        sam, sha, source = build_sam("tiny", img_size=img, grid=grid), "0" * 64, "random-init tiny SAM"
    info = {"variant": "tiny", "checkpoint_sha256": sha, "img_size": img, "grid": grid,
            "channels": int(sam.prompt_encoder.embed_dim)}
    return sam, info, f"{source} ({img} px, {grid}x{grid} grid)"


def _scenes(params: Params, n: int, rng: np.random.Generator) -> Iterator[Any]:
    from pipeline.data.synthetic import generate_sample

    g = params.generate
    for k in range(n):
        yield generate_sample(rng, "thin" if k % 2 else "salient", g.min_side, g.max_side, g.max_distractors)


def build_workload(root: Path, params: Params, *, train_views: int, eval_views: int, seed: int = 0) -> Workload:
    """Write the cache (``train_views`` train views with random embeddings; ``eval_views`` eval views of the
    first ``evaluate.benchmarks`` set, embedded by the base's own encoder so predicted masks look real) and
    the prompts stage's tables under ``root``."""
    from pipeline.data.embedding_format import CacheMeta
    from pipeline.modeling.transforms import preprocess
    from pipeline.prompts.stage import make_prompts
    from tests.fakes import FakeShard, view_columns, write_cache

    if train_views < 1 or eval_views < 1:
        raise ValueError(f"need at least one train and one eval view, got {train_views} and {eval_views}")
    sam, info, source = load_embedded_base(params)
    meta = CacheMeta.from_info(info)
    rng = np.random.default_rng(seed)
    shard_rows, shards = params.embed.shard_rows, []
    train = [(f"{TRAIN_DATASET}/b{k:05d}#0", *s.target.shape, s.target) for k, s in enumerate(_scenes(params, train_views, rng))]
    for start in range(0, len(train), shard_rows):
        views = train[start : start + shard_rows]
        emb = (rng.standard_normal((len(views), *meta.shape), dtype=np.float32) * 0.5).astype(np.float16)
        shards.append(FakeShard(TRAIN_DATASET, "train", view_columns(views, "train", meta.img_size), emb))
    eval_dataset = params.evaluate.benchmarks[0]
    views, embs = [], []
    with torch.inference_mode():
        for k, s in enumerate(_scenes(params, eval_views, rng)):
            x, _ = preprocess(s.image, meta.img_size)
            embs.append(sam.image_encoder(x[None])[0].numpy().astype(np.float16))
            views.append((f"{eval_dataset}/e{k:05d}#0", *s.target.shape, s.target))
    shards.append(FakeShard(eval_dataset, "eval", view_columns(views, "eval", meta.img_size), np.stack(embs)))
    embeddings, prompts = Path(root) / "embeddings", Path(root) / "prompts"
    write_cache(embeddings, meta, shards, row_group_size=params.embed.row_group_size)
    make_prompts(params, embeddings, prompts)
    return Workload(embeddings, prompts, sam, info, eval_dataset, source)


# ------------------------------------------------------------------------------------------ timing
def sync(device: torch.device) -> None:
    """Wait for queued GPU work (a no-op on the CPU), so wall-clock times are complete."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PartClock:
    """Exclusive wall-clock seconds per named part: a part started inside another is not counted in the outer
    one. Parts are entered with :meth:`time`, around a module's forward with :meth:`hook`, or around a module
    attribute (a function) with :meth:`patch`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.parts: dict[str, float] = {}
        self._stack: list[tuple[str, float]] = []

    def start(self, part: str) -> None:
        sync(self.device)
        self._stack.append((part, time.perf_counter()))

    def stop(self) -> None:
        sync(self.device)
        part, t0 = self._stack.pop()
        dt = time.perf_counter() - t0
        self.parts[part] = self.parts.get(part, 0.0) + dt
        if self._stack:  # exclusive times: take it out of the enclosing part
            outer = self._stack[-1][0]
            self.parts[outer] = self.parts.get(outer, 0.0) - dt

    @contextmanager
    def time(self, part: str) -> Iterator[None]:
        self.start(part)
        try:
            yield
        finally:
            self.stop()

    @contextmanager
    def hook(self, module: torch.nn.Module, part: str) -> Iterator[None]:
        """While active, ``module``'s forward calls count as ``part``."""
        handles = [module.register_forward_pre_hook(lambda *_: self.start(part)),
                   module.register_forward_hook(lambda *_: self.stop())]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def patch(self, owner: Any, name: str, part: str, generator: bool = False) -> Iterator[None]:
        """While active, ``owner.name`` (a function, method or generator function) counts as ``part``; for a
        ``generator`` only the time spent producing each item counts."""
        original = getattr(owner, name)
        own = vars(owner).get(name, _MISSING)  # the raw attribute (a staticmethod stays one)

        def timed_call(*args: Any, **kwargs: Any) -> Any:
            with self.time(part):
                return original(*args, **kwargs)

        def timed_gen(*args: Any, **kwargs: Any) -> Iterator[Any]:
            it = iter(original(*args, **kwargs))
            while True:
                with self.time(part):
                    try:
                        item = next(it)
                    except StopIteration:
                        return
                yield item

        setattr(owner, name, timed_gen if generator else timed_call)
        try:
            yield
        finally:
            if own is not _MISSING:
                setattr(owner, name, own)
            else:  # an instance attribute shadowing a method: drop it
                delattr(owner, name)

    def total(self) -> float:
        return sum(self.parts.values())


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one ``fn()`` call (GPU work included)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def summarize_parts(runs: Sequence[dict[str, float]], digits: int = 5) -> dict[str, float]:
    """Median seconds of each part over ``runs`` (parts missing from a run count as 0)."""
    keys = list(dict.fromkeys(k for r in runs for k in r))
    return {k: round(statistics.median(r.get(k, 0.0) for r in runs), digits) for k in keys}


# ------------------------------------------------------------------------------------------ steps
def stage_step(model: PromptableDecoder, opt: torch.optim.Optimizer, batches: Iterator[list[Any]], params: Params,
               ctx: Any, step: int, total_steps: int, clock: PartClock | None = None) -> float:
    """One iteration of the train stage's loop (``pipeline.training.train._train``) without its progress bar
    and checkpoint bookkeeping; returns the step's mean loss. With a ``clock``, its parts are timed."""
    from pipeline.training import ddp
    from pipeline.training.train import batch_loss, learning_rate

    part = clock.time if clock is not None else (lambda _name: nullcontext())
    cfg = params.train
    with part("batch_assembly"):
        samples = next(batches)
    with part("optimizer"):
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step, total_steps)
        opt.zero_grad(set_to_none=True)
    with part("other"):
        loss_sum, count = batch_loss(model, samples, params, ctx.device)
        global_loss, global_count, _skipped = ddp.all_reduce_sum(
            [loss_sum.item(), count, sum(s.prompt is None for s in samples)], ctx)
    if global_count > 0:
        if count > 0:
            with part("backward"):
                (loss_sum * (ctx.world_size / global_count)).backward()
        with part("optimizer"):
            ddp.all_reduce_gradients(model.trainable_parameters(), ctx)
            opt.step()
    return global_loss / max(global_count, 1)


def instrumented_step(model: PromptableDecoder, opt: torch.optim.Optimizer, batches: Iterator[list[Any]],
                      params: Params, ctx: Any, step: int, total_steps: int) -> dict[str, float]:
    """:func:`stage_step` with its parts timed: batch assembly, prompt encoding (grouping + collation in
    ``batch_loss`` and SAM's prompt encoder in the forward), forward (the rest of the decoder), loss
    (``mask_loss``), backward, optimizer; ``other`` = what is left (stacking, sums, reductions)."""
    from pipeline.training import train

    clock = PartClock(ctx.device)
    with ExitStack() as stack:
        stack.enter_context(clock.hook(model, "forward"))
        stack.enter_context(clock.hook(model.prompt_encoder, "prompt_encoding"))
        for name in ("collate", "group_by_signature"):
            stack.enter_context(clock.patch(train, name, "prompt_encoding"))
        stack.enter_context(clock.patch(train, "mask_loss", "loss"))
        stage_step(model, opt, batches, params, ctx, step, total_steps, clock)
    return clock.parts


def in_memory_batch(samples: Sequence[Any], device: torch.device) -> list[tuple[torch.Tensor, PromptBatch]]:
    """A batch's (embeddings, prompt tensors) per prompt signature, on ``device``: the bare step's inputs."""
    from pipeline.inference.prompts import collate, group_by_signature

    valid = [s for s in samples if s.prompt is not None]
    out = []
    for _sig, idx in group_by_signature([s.prompt for s in valid]):
        members = [valid[i] for i in idx]
        out.append((torch.stack([s.embedding for s in members]).to(device), collate([s.prompt for s in members], device)))
    return out


def bare_step(model: PromptableDecoder, groups: Sequence[tuple[torch.Tensor, PromptBatch]], params: Params,
              device: torch.device) -> None:
    """The decoder forward + backward alone: every group's forward, ``sum(logits)`` backward."""
    from pipeline.training.train import _autocast

    for p in model.trainable_parameters():
        p.grad = None
    total = torch.zeros((), device=device)
    for emb, prompts in groups:
        with _autocast(device, params.train.bf16):
            out = model(emb, prompts, multimask_output=params.train.multimask_output)
        total = total + out.low_res_logits.float().sum()
    total.backward()


# ------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.data.embedding_format import read_cache_meta
    from pipeline.modeling.methods import build_method
    from pipeline.prompts.stage import model_frame
    from pipeline.prompts.tables import load_train_prompts
    from pipeline.training import ddp
    from pipeline.training.batches import BatchStream

    params = load_params(args.params)
    if args.batch:
        params = replace(params, **{"train.batch_size": args.batch})
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit(f"--repeats must be >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    with tempfile.TemporaryDirectory(prefix="bench_train_step_") as tmp:
        work = build_workload(Path(tmp), params, train_views=max(args.train_views, params.train.batch_size),
                              eval_views=1)
        ctx = ddp.init_distributed(params.train.device)
        device = ctx.device
        frame = model_frame(read_cache_meta(work.embeddings))
        table = load_train_prompts(work.prompts / "train.parquet")
        torch.manual_seed(params.seed)
        model = build_method(args.method, work.sam, params.plugin).to(device)
        model.train()
        if model.num_trainable == 0:
            raise SystemExit(f"method {args.method!r} has nothing to train; pick a plugin method")
        cfg = params.train
        opt = torch.optim.Adam(model.trainable_parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                               weight_decay=cfg.weight_decay)
        stream = lambda: iter(BatchStream(params, work.embeddings, table, frame, ctx, cfg.batch_size))  # noqa: E731
        full, inst, bare = stream(), stream(), stream()  # same seed -> the same batch sequence
        total_steps = args.warmup + args.repeats
        t_stage, t_bare, t_inst, parts = [], [], [], []
        for i in range(total_steps):
            ts = timed(lambda: stage_step(model, opt, full, params, ctx, i, total_steps), device)
            p = instrumented_step(model, opt, inst, params, ctx, i, total_steps)
            groups = in_memory_batch(next(bare), device)
            tb = timed(lambda: bare_step(model, groups, params, device), device)
            if i >= args.warmup:
                t_stage.append(ts)
                t_bare.append(tb)
                t_inst.append(sum(p.values()))
                parts.append(p)
        stage_s, bare_s = statistics.median(t_stage), statistics.median(t_bare)
        result: dict[str, Any] = {
            "benchmark": "train_step",
            "ratio": round(stage_s / bare_s, 3),
            "goal": f"<= {GOAL}",
            "paired_ratio_median": round(statistics.median(a / b for a, b in zip(t_stage, t_bare)), 3),
            "stage_step_s": round(stage_s, 5),
            "bare_step_s": round(bare_s, 5),
            "breakdown_s": summarize_parts(parts),
            "instrumented_step_s": round(statistics.median(t_inst), 5),
            "method": args.method,
            "model": work.model_source,
            "batch_size": cfg.batch_size,
            "loss_points": cfg.loss_points,
            "train_views": max(args.train_views, cfg.batch_size),
            "batches_per_epoch": BatchStream(params, work.embeddings, table, frame, ctx, cfg.batch_size).batches_per_epoch(),
            "device": str(device),
            "torch_threads": torch.get_num_threads(),
            "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),  # the Makefile sets it
            "warmup": args.warmup,
            "repeats": args.repeats,
        }
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=Path, default=PROJECT / "params.yaml", help="params file (embedded default)")
    ap.add_argument("--method", default="stable_sam", help="trainable method (pipeline.modeling.methods)")
    ap.add_argument("--batch", type=int, default=0, help="batch size (default: train.batch_size)")
    ap.add_argument("--train-views", type=int, default=240,
                    help="training views in the cache (default 240, ~the embedded default's; at least one batch)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    ap.add_argument("--repeats", type=int, default=15,
                    help="timed steps; times are medians (default 15: with 5, the ratio of medians ranged 1.05-1.36 "
                         "over three runs on one busy 2-core host, with 15 it was 1.13-1.14)")
    return run_cli(ap, run, argv)


def run_cli(ap: argparse.ArgumentParser, bench: Any, argv: list[str] | None) -> int:
    """Add ``--threads``, parse ``argv``, run ``bench(args)`` and print its result as the last JSON line."""
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default 0: torch's own choice)")
    args = ap.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(json.dumps(bench(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
