"""Stage ``train``: train one method's plugin on cached frozen-SAM embeddings (docs/METHOD.md §3).

Adam over ``method.trainable_parameters()`` only (SAM stays frozen and is checksummed before/after);
total batch ``train.batch_size`` split over DDP ranks; ``train.max_steps`` or ``train.epochs`` worth of
steps; single-mask output unless ``train.multimask_output`` (then the best of the 3 masks, as SAM);
loss = point-sampled BCE + Dice (pipeline.training.loss). Each sample's prompt comes from
``data/prompts/train.parquet`` (draw ``epoch mod n``), its loss points from a generator seeded by
(seed, epoch, view_id), and batches from the embedding reader's ``(seed, epoch)`` order, so the run
is a pure function of the params: a resumed run ends with the same weights as an uninterrupted one
(CPU), and with ``train.ddp_partition: rows`` N ranks see the same global batches as one process.

Single process by default; DDP when launched by torchrun (see pipeline.training.ddp). Checkpoints every
``train.checkpoint_every`` steps to ``<out>/<method>.ckpt``; ``--resume`` continues from it.

    python -m stages.train --params params.yaml --method stable_sam --embeddings data/embeddings \\
        --prompts data/prompts/train.parquet --base models/base --out models/plugins \\
        --metrics metrics/train --plots plots/train [--resume]
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from pipeline.common.hashing import sha256_file
from pipeline.common.atomic import atomic_path, atomic_write_json, atomic_write_text
from pipeline.config import Params
from pipeline.common.cli import StageError
from pipeline.data.embedding_format import StaleCacheError, read_cache_meta
from pipeline.inference.predictor import Predictor
from pipeline.inference.prompts import collate, group_by_signature
from pipeline.modeling.backbones import load_base
from pipeline.modeling.methods import PromptableDecoder, build_method
from pipeline.modeling.plugin_file import save_plugin_file
from pipeline.prompts.seeding import int_seed
from pipeline.prompts.stage import model_frame
from pipeline.prompts.tables import load_train_prompts, read_meta
from pipeline.training import ddp
from pipeline.training.batches import BatchStream, Sample
from pipeline.training.checkpointing import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from pipeline.training.loss import mask_loss
from pipeline.training.sanity import SANITY_TYPES, sanity_iou, sanity_views

log = logging.getLogger(__name__)

# Keys that may change between a checkpoint and its resumption without changing the result.
RESUME_FREE_KEYS = {"checkpoint_every", "max_steps", "epochs", "device", "num_workers", "methods"}


# ------------------------------------------------------------------------------------------- steps
def _generators(seed: int, samples: Sequence[Sample]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int_seed(seed, "loss", s.epoch, s.view_id)) for s in samples]


def _autocast(device: torch.device, bf16: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def forward_samples(model: PromptableDecoder, samples: Sequence[Sample], device: torch.device,
                    multimask_output: bool, bf16: bool = False) -> Iterator[tuple[list[Sample], torch.Tensor]]:
    """The training forward: samples with a prompt, grouped by prompt signature (never padded, as in
    :meth:`pipeline.inference.Predictor.predict_prompts`) -> (group members, low-res logits ``[n, M, 4g, 4g]``)."""
    valid = [s for s in samples if s.prompt is not None]
    for _sig, idx in group_by_signature([s.prompt for s in valid]):  # type: ignore[misc]
        members = [valid[i] for i in idx]
        prompts = collate([s.prompt for s in members], device)  # type: ignore[misc]
        emb = torch.stack([s.embedding for s in members]).to(device, non_blocking=True)
        with _autocast(device, bf16):
            out = model(emb, prompts, multimask_output=multimask_output)
        yield members, out.low_res_logits.float()


def batch_loss(model: PromptableDecoder, samples: Sequence[Sample], params: Params, device: torch.device) -> tuple[torch.Tensor, int]:
    """Sum of per-sample losses over the valid samples of a batch, and their count."""
    cfg = params.train
    total = torch.zeros((), device=device)
    count = 0
    for members, logits in forward_samples(model, samples, device, cfg.multimask_output, cfg.bf16):
        targets = torch.stack([s.target for s in members])[:, None].to(device, non_blocking=True)
        per_mask = []
        for m in range(logits.shape[1]):  # 1 (single-mask) or 3 (multimask: keep the best, as SAM)
            terms = mask_loss(logits[:, m : m + 1], targets, num_points=cfg.loss_points, oversample=cfg.oversample_ratio,
                              importance=cfg.importance_sample_ratio, generators=_generators(params.seed, members))
            per_mask.append(terms.total)
        per_sample = torch.stack(per_mask, dim=1).min(dim=1).values
        total = total + per_sample.sum()
        count += len(members)
    return total, count


# ------------------------------------------------------------------------------------------ checks
def frozen_checksum(module: torch.nn.Module, exclude: Iterable[torch.Tensor] = ()) -> str:
    """sha256 over every tensor of ``module``'s state dict except ``exclude`` (trainable ones)."""
    skip = {id(t) for t in exclude}
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict(keep_vars=True).items()):
        if id(t) in skip:
            continue
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ outputs
def _write_loss_outputs(history: list[list[float]], csv_path: Path, png_path: Path, method: str) -> None:
    lines = ["step,loss,lr"] + [f"{int(s)},{loss:.6f},{lr:.6g}" for s, loss, lr in history]
    atomic_write_text(csv_path, "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if history:
        steps = np.array([h[0] for h in history])
        losses = np.array([h[1] for h in history])
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1 :], smooth, lw=1.5, label=f"mean of {k}")
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"{method}: nothing to train", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("BCE + Dice")
    ax.set_title(f"{method} training loss")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    diffs = []
    for section in ("prompts", "plugin", "train", "sam"):
        a, b = saved.get(section, {}), current.get(section, {})
        for key in sorted(set(a) | set(b)):
            if section == "train" and key in RESUME_FREE_KEYS:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{section}.{key}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}")
    if saved.get("seed") != current.get("seed"):
        diffs.append(f"seed: checkpoint {saved.get('seed')!r} vs now {current.get('seed')!r}")
    for key in ("base_sha256", "prompts_sha256"):  # the data the run was trained on
        if saved.get("inputs", {}).get(key) != current.get("inputs", {}).get(key):
            diffs.append(f"{key}: checkpoint {saved.get('inputs', {}).get(key)!r} vs now {current['inputs'].get(key)!r}")
    return diffs


def learning_rate(cfg: Any, step: int, total_steps: int) -> float:
    """lr of optimiser step ``step`` (0-based): linear warm-up over ``train.warmup_steps``, then constant or
    cosine to 0 at ``total_steps`` (``train.lr_schedule``)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_schedule == "cosine":
        t = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))
    return cfg.lr


def param_groups(model: torch.nn.Module, cfg: Any) -> list[dict[str, Any]]:
    """Adam's parameter groups: the DRP's (``router``) at ``train.drp_lr_scale`` x lr, every other trainable
    parameter at lr (first group, the one the loss history logs). Each group carries its ``lr_scale``."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rest = [p for n, p in named if ".router." not in n]
    router = [p for n, p in named if ".router." in n]
    groups = [{"params": rest, "lr_scale": 1.0}] if rest else []
    if router:
        groups.append({"params": router, "lr_scale": float(cfg.drp_lr_scale)})
    return groups


def _total_steps(params: Params, per_epoch: int) -> int:
    if params.train.max_steps > 0:
        return params.train.max_steps
    return max(1, math.ceil(params.train.epochs * per_epoch))


# --------------------------------------------------------------------------------------------- train
def train(
    params: Params,
    method: str,
    *,
    embeddings: Path,
    prompts: Path,
    base: Path,
    out: Path,
    metrics: Path,
    plots: Path,
    resume: bool | str = False,
    stop_after: int | None = None,
    checkpoints: Path | None = None,
) -> dict[str, Any]:
    """Train ``method``; write ``<out>/<method>.pt``, ``<metrics>/<method>.json``, ``<plots>/<method>_loss.{csv,png}``.

    ``resume`` continues from ``<checkpoints>/<method>.ckpt`` (``checkpoints`` defaults to ``out``) when it
    exists; a checkpoint of a changed run is an error, or with ``resume="auto"`` is set aside (logged) and
    training starts over, which is what ``dvc repro`` wants after ``dvc exp run -S train.lr=...``. ``stop_after`` (tests) simulates
    an interruption: the run checkpoints at that step and returns ``{"stopped_at": step}`` without
    writing the final outputs. Returns the metrics dict (``final_loss`` = mean loss of the last 10 steps,
    ``sanity_iou`` = mIoU of SANITY_TYPES prompts on training and eval views, before/after:
    pipeline.training.sanity).
    """
    embeddings, prompts, base, out, metrics, plots = map(Path, (embeddings, prompts, base, out, metrics, plots))
    cfg = params.train
    ctx = ddp.init_distributed(cfg.device)
    try:
        return _train(params, method, ctx, embeddings=embeddings, prompts=prompts, base=base, out=out,
                      metrics=metrics, plots=plots, resume=resume, stop_after=stop_after,
                      checkpoints=Path(checkpoints) if checkpoints is not None else out)
    finally:
        ddp.shutdown(ctx)


def _train(params: Params, method: str, ctx: ddp.DistContext, *, embeddings: Path, prompts: Path, base: Path,
           out: Path, metrics: Path, plots: Path, resume: bool | str, stop_after: int | None,
           checkpoints: Path) -> dict[str, Any]:
    cfg = params.train
    device = ctx.device
    sam, info = load_base(base)
    cache = read_cache_meta(embeddings)
    if cache.get("checkpoint_sha256") != info.get("checkpoint_sha256"):
        raise StaleCacheError(f"{embeddings}: embeddings were made by checkpoint {str(cache.get('checkpoint_sha256'))[:12]}"
                           f"..., the base in {base} is {str(info.get('checkpoint_sha256'))[:12]}...; "
                           "re-run `dvc repro embed`")
    frame = model_frame(cache)
    torch.manual_seed(params.seed)  # identical plugin init everywhere (also broadcast below)
    model = build_method(method, sam, params.plugin)
    trainable = model.trainable_parameters()
    n_trainable = int(model.num_trainable)
    config = {**params.to_dict(), "method": method,
              "inputs": {"base_sha256": str(info.get("checkpoint_sha256")),
                         "prompts_sha256": sha256_file(prompts) if Path(prompts).is_file() else None}}
    plugin_path = out / f"{method}.pt"
    metrics_path = metrics / f"{method}.json"
    if n_trainable == 0:  # `sam`: nothing to train; publish an empty plugin so evaluation is uniform
        result = {"method": method, "trainable_params": 0, "steps": 0, "samples": 0, "seconds": 0.0,
                  "samples_per_s": 0.0, "final_loss": None, "world_size": ctx.world_size, "device": str(device)}
        if ctx.is_main:
            save_plugin_file(plugin_path, method=method, state_dict={}, config=config,
                        base_sha256=str(info["checkpoint_sha256"]), extra={"trainable_params": 0, "steps": 0})
            atomic_write_json(metrics_path, result)
            _write_loss_outputs([], plots / f"{method}_loss.csv", plots / f"{method}_loss.png", method)
        log.info("%s has no trainable parameters: wrote an empty plugin file", method)
        return result

    if cfg.batch_size % ctx.world_size:
        raise ValueError(f"train.batch_size={cfg.batch_size} is not divisible by the {ctx.world_size} DDP ranks")
    local_batch = cfg.batch_size // ctx.world_size
    table = load_train_prompts(prompts)
    pmeta = read_meta(prompts)
    if pmeta and (pmeta.get("img_size"), pmeta.get("grid")) != (frame.img_size, frame.grid):
        raise StageError(f"{prompts}: made for img_size/grid {pmeta.get('img_size')}/{pmeta.get('grid')}, the cache "
                           f"has {frame.img_size}/{frame.grid}; re-run `dvc repro prompts`")

    model.to(device)
    model.train()
    ddp.broadcast_parameters(trainable, ctx)
    frozen_before = frozen_checksum(sam, exclude=trainable) if ctx.is_main else ""
    opt = torch.optim.Adam(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                           weight_decay=cfg.weight_decay)

    stream = BatchStream(params, embeddings, table, frame, ctx, local_batch)
    per_epoch = stream.batches_per_epoch(0)
    total_steps = _total_steps(params, per_epoch)
    ckpt_path = checkpoints / f"{method}.ckpt"
    step, history, seconds_before, skipped = 0, [], 0.0, 0
    views = sanity_views(embeddings, cfg.sanity_views) if ctx.is_main else []
    checker = Predictor(sam, model, postprocess=frame.mode)
    sanity_before: dict[str, Any] = {}
    ckpt = load_checkpoint(ckpt_path) if resume and ckpt_path.is_file() else None
    diffs: list[str] = []
    if ckpt is not None:
        diffs = _config_differences(ckpt["config"], config)
        if ckpt.get("method") != method:
            diffs.append(f"method: checkpoint {ckpt.get('method')!r} vs now {method!r}")
        if ckpt.get("world_size") != ctx.world_size:
            diffs.append(f"world size: checkpoint {ckpt.get('world_size')} vs now {ctx.world_size}")
        if diffs and resume != "auto":
            raise ValueError(f"{ckpt_path}: cannot resume, the run changed: " + "; ".join(diffs)
                             + ". Restore those params, or run without --resume to start over.")
    if ckpt is not None and diffs:
        log.info("%s belongs to another run (%s): starting %s over", ckpt_path, "; ".join(diffs), method)
    elif ckpt is not None:
        model.load_plugin_state_dict(ckpt["plugin"])
        opt.load_state_dict(ckpt["optimizer"])
        step, history = int(ckpt["step"]), [list(h) for h in ckpt["history"]]
        seconds_before, skipped = float(ckpt["seconds"]), int(ckpt.get("skipped", 0))
        sanity_before = dict(ckpt.get("sanity_before", {}))
        pos = ckpt["reader"][ctx.rank]
        stream.epoch, stream.batch = int(pos["epoch"]), int(pos["batch"])
        restore_rng(ckpt["rng"][ctx.rank])
        log.info("resumed %s from %s at step %d/%d", method, ckpt_path, step, total_steps)
    elif resume:
        log.info("no checkpoint at %s: starting %s from scratch", ckpt_path, method)
    if not sanity_before and ctx.is_main:
        sanity_before = sanity_iou(checker, views, params)

    def checkpoint(elapsed: float) -> None:
        positions = ddp.all_gather_object(stream.position(), ctx)
        rngs = ddp.all_gather_object(capture_rng(), ctx)
        if ctx.is_main:
            save_checkpoint(ckpt_path, {
                "method": method, "step": step, "plugin": model.plugin_state_dict(), "optimizer": opt.state_dict(),
                "rng": rngs, "reader": positions, "history": history, "config": config, "seconds": elapsed,
                "skipped": skipped, "sanity_before": sanity_before, "world_size": ctx.world_size,
            })

    log.info("%s: %d trainable parameters, %d steps of %d (%d per rank, %d rank(s)), %d batches per epoch, on %s",
             method, n_trainable, total_steps, cfg.batch_size, local_batch, ctx.world_size, per_epoch, device)
    t0 = time.perf_counter()
    bar = tqdm(total=total_steps, initial=step, desc=f"train {method}", unit="step", disable=not ctx.is_main)
    batches = iter(stream)
    while step < total_steps:
        samples = next(batches)
        for group in opt.param_groups:
            group["lr"] = learning_rate(cfg, step, total_steps) * group["lr_scale"]
        opt.zero_grad(set_to_none=True)
        loss_sum, count = batch_loss(model, samples, params, device)
        # Normalise by the GLOBAL number of valid samples: with gradients averaged over ranks, the update
        # equals one process's mean over the whole batch even when ranks skipped different samples.
        global_loss, global_count, global_skipped = ddp.all_reduce_sum(
            [loss_sum.item(), count, sum(s.prompt is None for s in samples)], ctx)
        skipped += int(global_skipped)
        if global_count > 0:  # else: a batch of skipped samples only; no update on any rank
            if count > 0:
                (loss_sum * (ctx.world_size / global_count)).backward()
            ddp.all_reduce_gradients(trainable, ctx)
            opt.step()
        step += 1
        loss = global_loss / max(global_count, 1)
        history.append([step, loss, opt.param_groups[0]["lr"]])
        elapsed = seconds_before + time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.4f}", samples_per_s=f"{step * cfg.batch_size / max(elapsed, 1e-9):.1f}")
        if step % cfg.checkpoint_every == 0 or step == total_steps or step == stop_after:
            checkpoint(elapsed)
        if stop_after is not None and step == stop_after and step < total_steps:
            bar.close()
            return {"stopped_at": step}
    bar.close()
    seconds = seconds_before + time.perf_counter() - t0

    result: dict[str, Any] = {"method": method, "trainable_params": n_trainable, "steps": step,
                              "samples": step * cfg.batch_size, "seconds": round(seconds, 3),
                              "samples_per_s": round(step * cfg.batch_size / max(seconds, 1e-9), 3),
                              "final_loss": float(np.mean([h[1] for h in history[-10:]])),
                              "last_loss": history[-1][1], "world_size": ctx.world_size, "device": str(device),
                              "skipped_samples_without_prompt": skipped, "batches_per_epoch": per_epoch,
                              "epochs": round(step / max(per_epoch, 1), 4)}
    if ctx.is_main:
        frozen_after = frozen_checksum(sam, exclude=trainable)
        if frozen_after != frozen_before:
            raise RuntimeError("SAM's frozen weights changed during training (checksum mismatch): a bug; "
                               "the plugin file was NOT written")
        result["sam_frozen_sha256"] = frozen_after
        result["sanity_iou"] = {"before": sanity_before, "after": sanity_iou(checker, views, params)}
        after = result["sanity_iou"]["after"]
        for split in ("train", "eval"):
            for kind in SANITY_TYPES:
                b, a = sanity_before.get(split, {}).get(kind), after.get(split, {}).get(kind)
                if a is not None and b is not None:
                    log.info("sanity %-5s %-9s mIoU on %d views: before %.1f -> after %.1f", split, kind,
                             after["views"][split], b, a)
        if skipped:
            log.warning("%d training samples had no stored prompt (quarantined or stale prompts) and were skipped",
                        skipped)
        save_plugin_file(out / f"{method}.pt", method=method, state_dict=model.plugin_state_dict(), config=config,
                    base_sha256=str(info["checkpoint_sha256"]),
                    extra={"trainable_params": n_trainable, "steps": step})
        atomic_write_json(metrics_path, result)
        _write_loss_outputs(history, plots / f"{method}_loss.csv", plots / f"{method}_loss.png", method)
    ddp.barrier(ctx)
    return result


def run_train(params: Params, method: str, *, embeddings: Path, prompts: Path, base: Path, out: Path, metrics: Path,
              plots: Path, resume: bool | str = False, checkpoints: Path | None = None) -> dict[str, Any]:
    """The ``train`` stage: :func:`train` one method; rank 0 prints the metrics (DDP ranks share the work)."""
    result = train(params, method, embeddings=embeddings, prompts=prompts, base=base, out=out, metrics=metrics,
                   plots=plots, resume=resume, checkpoints=checkpoints)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2, sort_keys=True))
    return result
