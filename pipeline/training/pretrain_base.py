"""Pre-training of the embedded-default base model (the small SAM that stands in for Meta's checkpoints).

The default profile cannot download SAM, and a random frozen decoder would make every later number
meaningless, so this module trains the whole small SAM (``build_tiny``: conv encoder + SAM's unchanged
prompt encoder and mask decoder) the way SAM was trained before Stable-SAM came along: CLEAN prompts only
(tight GT boxes and 1-10 positive points), on scenes from the embedded generator's training distribution.
Following SAM (Kirillov et al. 2023, §3 and appendix A): a single point is ambiguous, so it supervises the
three multi-mask outputs with the minimum loss only; boxes and several points supervise the single-mask
output token; an MSE loss trains the IoU head. Loss: focal-free BCE + Dice on the 4g x 4g logits.
A GT-box-only warm-up comes first (an easier curriculum: the box pins the location down).

Two phases. The first trains on whole objects (``base_pretrain.steps``). The second
(``base_pretrain.parts_steps``, from the first one's weights, at ``parts_lr``) makes a share ``part_p`` of the
targets a PART of the object (:func:`part_of`), as SA-1B annotates wholes, parts and sub-parts: a prompt
that covers a piece of an object becomes a valid prompt for that piece. That is what real SAM brings to
HQ sets and what Stable-SAM corrects (a box that cuts an object, one click on it); a base trained on whole
objects only already answers a sloppy prompt with the whole object, leaving a plugin nothing to learn.

The result, ``assets/tiny_sam.pt``, is committed (about 21 MB) with its sha256 in the registry;
regenerate it with one command (deterministic by seed on the CPU, about two hours on two cores; the first
phase's weights are kept as ``<out stem>-phase1.pt`` and reused when its report matches):

    python -m stages.pretrain_base --params params.yaml --out assets/tiny_sam.pt
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from tqdm import tqdm

from pipeline.common.atomic import atomic_write_json, atomic_write_torch
from pipeline.common.cli import StageError
from pipeline.common.hashing import sha256_file
from pipeline.common.torch_files import load_error_reason
from pipeline.config import BasePretrainConfig, GenerateConfig, Params, PromptsConfig
from pipeline.data.synthetic import generate_sample
from pipeline.inference.prompts import Prompt, collate
from pipeline.evaluation.metrics import mask_iou_pairs
from pipeline.modeling.backbones import build_tiny
from pipeline.modeling.methods import PromptableDecoder, sam_decoder
from pipeline.modeling.transforms import PIXEL_MEAN, PIXEL_STD, mask_to_input_frame, preprocess
from pipeline.prompts.boxes import noisy_box
from pipeline.prompts.coarse import coarse_mask, coarse_mask_logits

POOL_SEED_TAG = 7777  # keeps the pre-training pool disjoint from the generated dataset's seeds
HOLDOUT_SEED_TAG = 8888


@dataclass
class Pool:
    """Pre-rendered scenes: images ``uint8 [N, 3, S, S]`` (padded input frame, not normalised),
    targets ``float32 [N, 4g, 4g]`` (soft GT in the padded input frame), full-res targets for points."""

    images: torch.Tensor
    targets: torch.Tensor
    hi_targets: torch.Tensor  # bool [N, S, S]: GT in the padded input frame, for sampling points


def build_pool(n: int, seed_tag: int, cfg: BasePretrainConfig, gen: GenerateConfig, style: str | None = None,
               parts: bool = True) -> Pool:
    """Render ``n`` generator scenes into the model-input frame; with ``parts``, a share ``cfg.part_p`` of the
    targets is a part of the object (:func:`part_of`) and a share ``cfg.group_p`` the object with its touching
    neighbours (:func:`group_of`) instead of the whole."""
    s, lo = cfg.img_size, 4 * cfg.grid
    images = torch.zeros(n, 3, s, s, dtype=torch.uint8)
    targets = torch.zeros(n, lo, lo)
    hi = torch.zeros(n, s, s, dtype=torch.bool)
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    for i in tqdm(range(n), desc=f"render pool ({n})", unit="img"):
        rng = np.random.default_rng([cfg.seed, seed_tag, i])
        st = style or ("thin" if rng.random() < cfg.thin_fraction else "salient")
        sample = generate_sample(rng, st, gen.min_side, gen.max_side, gen.max_distractors)
        target = sample.target
        if parts and cfg.part_p > 0 and rng.random() < cfg.part_p:
            target = part_of(target, rng)
        elif parts and cfg.group_p > 0 and rng.random() < cfg.group_p / (1.0 - cfg.part_p):
            target = group_of(target, [m for _, m in sample.instances])
        x, (h, w) = preprocess(sample.image, s)
        raw = (x * std + mean).round().clamp(0, 255)
        raw[:, h:, :] = 0
        raw[:, :, w:] = 0
        images[i] = raw.to(torch.uint8)
        targets[i] = mask_to_input_frame(target, s, lo)
        hi[i] = mask_to_input_frame(target, s, s) > 0.5
    return Pool(images, targets, hi)


def part_of(mask: np.ndarray, rng: np.random.Generator, tries: int = 8) -> np.ndarray:
    """A part of a bool ``[H, W]`` object mask: the object cut by a random window spanning 35-75 % of its
    bounding box on each axis, keeping at least 15 % of its pixels (the whole mask if no draw does).

    SAM's SA-1B annotates wholes, parts and sub-parts, so a prompt that covers a piece of an object is a valid
    prompt for that piece; this is what misleads SAM when a sloppy box cuts an object (Stable-SAM, §1)."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 32:
        return mask
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    for _ in range(tries):
        bh = max(1, int(round((y1 - y0) * rng.uniform(0.35, 0.75))))
        bw = max(1, int(round((x1 - x0) * rng.uniform(0.35, 0.75))))
        top = int(rng.integers(y0, y1 - bh + 1))
        left = int(rng.integers(x0, x1 - bw + 1))
        part = np.zeros_like(mask)
        part[top:top + bh, left:left + bw] = mask[top:top + bh, left:left + bw]
        if part.sum() >= max(16, 0.15 * len(xs)):
            return part
    return mask


def group_of(mask: np.ndarray, instances: Sequence[np.ndarray]) -> np.ndarray:
    """The object ``mask`` (bool ``[H, W]``) united with every instance mask that touches it (within one
    pixel); the object alone when nothing touches it.

    SA-1B also annotates groups (a box around two touching objects is a prompt for both), so real SAM answers a
    box that reaches over a neighbour with the neighbour included: the margin of a sloppy box misleads it."""
    grown = mask.copy()
    grown[1:] |= mask[:-1]
    grown[:-1] |= mask[1:]
    grown[:, 1:] |= mask[:, :-1]
    grown[:, :-1] |= mask[:, 1:]
    out = mask.copy()
    for other in instances:
        if (other & grown & ~mask).any():
            out |= other
    return out


def normalise(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, S, S]`` -> SAM-normalised float (padding stays 0 after normalisation, as in SAM)."""
    mean = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)
    x = (images.float() - mean) / std
    pad = images.sum(1, keepdim=True) == 0
    return x.masked_fill(pad, 0.0)


def decode_all(decoder: PromptableDecoder, emb: torch.Tensor, prompts: Sequence[Prompt]) -> tuple[torch.Tensor, torch.Tensor]:
    """B embeddings, one model-input-frame prompt each (one signature, so no padding) through the project's
    decoder call -> (all 4 masks ``[B, 4, 4g, 4g]``, IoU predictions ``[B, 4]``)."""
    out = decoder(emb, collate(prompts, emb.device), multimask_output=None)
    return out.low_res_logits, out.iou_pred


def box_prompts(hi: torch.Tensor) -> list[Prompt]:
    """Tight XYXY GT-box prompts of bool masks ``[B, S, S]`` (model-input frame)."""
    out = []
    for b in range(hi.shape[0]):
        ys, xs = torch.nonzero(hi[b], as_tuple=True)
        box = [0.0, 0.0, 0.0, 0.0] if not len(xs) else [xs.min(), ys.min(), xs.max(), ys.max()]
        out.append(Prompt(box=np.asarray([float(v) for v in box], np.float32), prompt_type="gt_box"))
    return out


def point_prompts(hi: torch.Tensor, k: int, gen: torch.Generator) -> list[Prompt]:
    """``k`` positive points uniformly inside each mask ``[B, S, S]`` (pixel centres, model-input frame)."""
    out = []
    for b in range(hi.shape[0]):
        ys, xs = torch.nonzero(hi[b], as_tuple=True)
        if not len(xs):
            ys, xs = torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long)
        idx = torch.randint(len(xs), (k,), generator=gen)
        pts = torch.stack([xs[idx].float() + 0.5, ys[idx].float() + 0.5], 1).numpy()
        out.append(Prompt(points=pts, prompt_type=f"point_{k}"))
    return out


def mask_prompts(targets: torch.Tensor, band: float, logits: tuple[float, float], gen: torch.Generator) -> list[Prompt]:
    """Coarse-mask prompts (HQ-SAM's boundary-band noise on the ``[B, 4g, 4g]`` soft GT), as SAM's dense
    mask input with the (background, foreground) values ``logits`` that the plugins' training mix feeds."""
    seed = int(torch.randint(1 << 31, (1,), generator=gen))
    out = []
    for b in range(targets.shape[0]):
        coarse = coarse_mask(targets[b].numpy(), band, np.random.default_rng([seed, b]))
        out.append(Prompt(mask_input=coarse_mask_logits(coarse, *logits), prompt_type="coarse_mask"))
    return out


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample BCE + Dice: logits/target ``[B, H, W]`` -> ``[B]``."""
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2))
    p = logits.sigmoid()
    dice = 1 - (2 * (p * target).sum((1, 2)) + 1) / (p.sum((1, 2)) + target.sum((1, 2)) + 1)
    return bce + dice


def hard_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` vs ``target > 0.5``: ``[B, H, W]`` -> ``[B]`` (empty union -> 1)."""
    return torch.from_numpy(mask_iou_pairs(logits.detach() > 0, target > 0.5)).float()


@torch.inference_mode()
def quick_eval(sam: Sam, pool: Pool, batch: int = 16) -> dict[str, float]:
    """mIoU (low-res, input frame) of the single-mask output for GT box, noisy box (docs/METHOD.md §3: noise 0.4,
    IoU >= 0.5), one and three points."""
    sam.eval()
    gen = torch.Generator().manual_seed(123)
    rng = np.random.default_rng(123)
    side = pool.images.shape[-1]
    scores: dict[str, list[float]] = {"gt_box": [], "noisy_box": [], "point_1": [], "point_3": []}
    for start in range(0, pool.images.shape[0], batch):
        sl = slice(start, start + batch)
        emb = sam.image_encoder(normalise(pool.images[sl]))
        hi = pool.hi_targets[sl]
        boxes = box_prompts(hi)
        noisy = [Prompt(box=noisy_box(b.box, (side, side), 0.4, 0.5, rng).box, prompt_type="noisy_box") for b in boxes]
        for name, prompts in (("gt_box", boxes), ("noisy_box", noisy), ("point_1", point_prompts(hi, 1, gen)),
                              ("point_3", point_prompts(hi, 3, gen))):
            masks, _ = decode_all(sam_decoder(sam), emb, prompts)
            scores[name] += hard_iou(masks[:, 0], pool.targets[sl]).tolist()
    sam.train()
    return {k: 100 * float(np.mean(v)) for k, v in scores.items()}


def phase_configs(cfg: BasePretrainConfig) -> list[BasePretrainConfig]:
    """The pre-training phases: whole objects for ``steps``; then, when ``parts_steps`` > 0, part targets
    (``part_p``) for ``parts_steps`` at ``parts_lr`` on ``parts_images`` scenes. Keys a phase does not use
    are zeroed, so changing the second phase never invalidates the first one's finished weights."""
    first = dataclasses.replace(cfg, part_p=0.0, group_p=0.0, parts_steps=0, parts_lr=0.0, parts_images=0)
    if not cfg.parts_steps:
        return [first]
    second = dataclasses.replace(cfg, steps=cfg.parts_steps, lr=cfg.parts_lr, images=cfg.parts_images,
                                 parts_steps=0, parts_lr=0.0, parts_images=0)
    return [first, second]




def finished_report(out: Path, cfg: BasePretrainConfig) -> dict | None:
    """The report of a finished run of ``cfg`` at ``out`` (weights + ``.json`` with the same config and
    steps, no resume state left), else None."""
    report_path = Path(out).with_suffix(".json")
    if not (Path(out).is_file() and report_path.is_file()) or Path(out).with_suffix(".train-state.pt").is_file():
        return None
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return None
    return report if report.get("steps") == cfg.steps and report.get("config") == dataclasses.asdict(cfg) else None


def pretrain(cfg: BasePretrainConfig, gen_cfg: GenerateConfig, prompts_cfg: PromptsConfig, out: Path, *, resume: bool = True,
             holdout: int = 96, log_every: int = 50, eval_every: int = 250, stop_after: int | None = None,
             init: Path | None = None) -> dict:
    """Train the tiny SAM on clean prompts; writes ``out`` (state dict) and ``out.json`` (quality).

    Starts from random weights, or from the state dict at ``init`` (a later phase). Every ``eval_every``
    steps it scores the held-out scenes (whole objects) and saves ``out`` plus a resumable
    ``out.train-state.pt``; ``stop_after`` (tests) checkpoints at that step and returns, like a killed run.
    """
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    out = Path(out)
    state_path = out.with_suffix(".train-state.pt")
    pool = build_pool(cfg.images, POOL_SEED_TAG, cfg, gen_cfg)
    held = build_pool(holdout, HOLDOUT_SEED_TAG, cfg, gen_cfg, parts=False)  # scored on whole objects
    sam = build_tiny(cfg.img_size, cfg.grid)
    init_sha = None
    if init is not None:
        sam.load_state_dict(torch.load(init, map_location="cpu", weights_only=True))
        init_sha = sha256_file(init)
    run_id = {**dataclasses.asdict(cfg), "init_sha256": init_sha}  # what a resume state must match
    sam.train()
    decoder = sam_decoder(sam)
    params = [p for p in sam.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    warmup = min(200, cfg.steps // 10)

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        t = (step - warmup) / max(1, cfg.steps - warmup)
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))

    step, history = 0, []
    gen = torch.Generator().manual_seed(cfg.seed)
    if resume and state_path.is_file():
        try:
            st = torch.load(state_path, map_location="cpu", weights_only=True)
            sam.load_state_dict(st["model"])
            opt.load_state_dict(st["optim"])
            gen.set_state(st["gen"])
            torch.set_rng_state(st["torch_rng"])
            step, history = int(st["step"]), json.loads(st["history"])
            saved = json.loads(st.get("config", "null"))
        except Exception as exc:  # noqa: BLE001 - any unreadable or foreign state file gets the same advice
            raise StageError(f"{state_path}: unreadable pre-training state ({load_error_reason(exc)}); delete it to "
                             "start pre-training over, or run without resume") from None
        if saved != run_id:
            raise StageError(f"{state_path}: a resume state of another pre-training run (config or initial weights "
                             "differ); delete it to start this run over, or restore the params it was made with")
        print(f"resumed pre-training at step {step}")
    box_only_steps = int(0.25 * cfg.steps)
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="pretrain tiny SAM", unit="step")
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        idx = torch.randint(pool.images.shape[0], (cfg.batch_size,), generator=gen)
        images, targets, hi = pool.images[idx], pool.targets[idx], pool.hi_targets[idx]
        if torch.rand(1, generator=gen).item() < 0.5:  # horizontal flip of the whole batch
            images, targets, hi = images.flip(-1), targets.flip(-1), hi.flip(-1)
            # re-pad: flipping moves the right padding to the left; keep SAM's bottom/right padding
            images, targets, hi = _repad(images, targets, hi)
        emb = sam.image_encoder(normalise(images))
        # One prompt kind per batch (so one signature: no padding tokens). SAM's recipe: a box or several
        # points supervise the single-mask output; one point is ambiguous and supervises the best of the
        # three multimask outputs; a coarse mask (as the plugins' training mix feeds it) the single output.
        draw = torch.rand(2, generator=gen).tolist()
        if step < box_only_steps or draw[0] < 0.5 * (1 - cfg.mask_prompt_p):
            prompts, single = box_prompts(hi), True
        elif draw[0] < 1 - cfg.mask_prompt_p:
            k = int(torch.randint(1, 11, (1,), generator=gen))
            prompts, single = point_prompts(hi, k, gen), k > 1
        else:
            prompts, single = mask_prompts(targets, prompts_cfg.coarse_mask_band,
                                           tuple(prompts_cfg.coarse_mask_logits), gen), True  # type: ignore[arg-type]
        masks, iou_pred = decode_all(decoder, emb, prompts)
        losses = torch.stack([seg_loss(masks[:, k], targets) for k in range(4)], 1)  # [B, 4]
        multi_best = losses[:, 1:].argmin(1) + 1
        chosen = torch.zeros_like(multi_best) if single else multi_best
        seg = losses.gather(1, chosen[:, None])[:, 0].mean()
        with torch.no_grad():
            true_iou = torch.stack([hard_iou(masks[:, k], targets) for k in range(4)], 1)
        iou_loss = F.mse_loss(iou_pred, true_iou)
        loss = seg + iou_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update()
        if step % log_every == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}", prompt=prompts[0].prompt_type)
            history.append({"step": step, "loss": float(loss.item()), "seconds": time.time() - t0})
        if step % eval_every == 0 or step == cfg.steps:
            quality = quick_eval(sam, held)
            history.append({"step": step, **quality})
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.1f}" for k, v in quality.items()))
            _save(sam, opt, gen, step, history, out, state_path, run_id)
        if stop_after is not None and step == stop_after:
            _save(sam, opt, gen, step, history, out, state_path, run_id)
            bar.close()
            return {"stopped_at": step}
    bar.close()
    quality = quick_eval(sam, held)
    report = {"steps": step, "holdout_images": holdout, "holdout_miou_lowres": quality, "history": history,
              "config": dataclasses.asdict(cfg), "init_sha256": init_sha}
    atomic_write_json(out.with_suffix(".json"), report)
    state_path.unlink(missing_ok=True)  # finished: a later run reuses the report instead of resuming
    return report


def _repad(images: torch.Tensor, targets: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """After a horizontal flip, shift each image left so its padding is on the right again."""
    s, lo = images.shape[-1], targets.shape[-1]
    for b in range(images.shape[0]):
        cols = (images[b].sum((0, 1)) > 0).nonzero()
        if len(cols) == 0:
            continue
        shift = int(cols.min())
        if shift:
            images[b] = torch.roll(images[b], -shift, dims=-1)
            hi[b] = torch.roll(hi[b], -shift, dims=-1)
            targets[b] = torch.roll(targets[b], -round(shift * lo / s), dims=-1)
    return images, targets, hi


def _save(sam: Sam, opt: torch.optim.Optimizer, gen: torch.Generator, step: int, history: list, out: Path,
          state_path: Path, config: dict) -> None:
    atomic_write_torch(out, sam.state_dict())  # in-memory save: the same weights give the same bytes
    atomic_write_torch(state_path, {"model": sam.state_dict(), "optim": opt.state_dict(), "gen": gen.get_state(),
                                    "torch_rng": torch.get_rng_state(), "step": step,
                                    "history": json.dumps(history), "config": json.dumps(config)})


def run_pretrain_base(params: Params, out: Path, *, steps: int | None = None, resume: bool = True,
                      threads: int = 0) -> dict:
    """Regenerate the tiny base at ``out`` (``steps`` overrides ``base_pretrain.steps``); prints its sha256."""
    from pipeline.config import replace  # noqa: PLC0415

    if threads:
        torch.set_num_threads(threads)
    if steps:
        params = replace(params, **{"base_pretrain.steps": steps})
    out = Path(out)
    phases = phase_configs(params.base_pretrain)
    init: Path | None = None
    for k, cfg in enumerate(phases, 1):
        dest = out if k == len(phases) else out.with_name(f"{out.stem}-phase{k}{out.suffix}")
        report = finished_report(dest, cfg) if resume else None
        if report is not None:
            print(f"phase {k}/{len(phases)}: reusing {dest} (finished, same config)")
        else:
            print(f"phase {k}/{len(phases)}: {cfg.steps} steps -> {dest}")
            report = pretrain(cfg, params.generate, params.prompts, dest, resume=resume, init=init)
        init = dest
    print(json.dumps(report["holdout_miou_lowres"], indent=2))
    print(f"{out}: sha256 {sha256_file(out)} (put it in pipeline/modeling/backbones.py TINY_SHA256)")
    return report
