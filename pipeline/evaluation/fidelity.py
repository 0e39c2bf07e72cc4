"""The fidelity study: what limits Stable-SAM's gain on a given base, measured with the pipeline's own code.

Every variant is trained by :func:`pipeline.training.train.train` and scored by
:func:`pipeline.evaluation.evaluate.evaluate_benchmark` on the HQ eval sets with the stored, identical eval
prompts (the same calls as the ``train``/``evaluate`` stages, into a scratch folder), so the numbers are
those the pipeline would produce with these params. Variants (:data:`VARIANTS`):

- the ladder of methods on the default recipe: frozen ``sam``; ``pt_sam`` (output tokens); ``dsp`` (DSP,
  α fixed); ``stable_sam`` (DSP + DRP); ``dt_sam`` (the whole decoder: the ceiling of what the cached
  embeddings allow a decoder-side method);
- ``stable_sam`` with the other ``plugin.dsp_zero_mean`` (DSP offsets free to translate the whole map, or
  not), under other budgets (steps), a cosine schedule, the old single stored prompt per view, and the
  prompt mix without coarse-mask prompts;
- the DRP's start: its gradient at step 0 (zero while DSP is the identity) and after a few steps.

Results go to ``<out>/fidelity.json`` and ``reports/fidelity.md``'s measured tables (``--report``).

    python -m stages.fidelity --params params.yaml --work models/fidelity --out metrics/fidelity.json
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from pipeline.common.atomic import atomic_write_json
from pipeline.config import Params, replace
from pipeline.evaluation import paper_numbers as paper
from pipeline.evaluation.aggregate import add_recovery, hq_benchmarks, hq_mean

log = logging.getLogger(__name__)

PROMPTS = ("gt_box", "noisy_box", "point_1", "point_3", "point_10")


@dataclass(frozen=True)
class Variant:
    """One row of the study: a method and the params it changes (dotted keys, as ``dvc exp run -S``)."""

    name: str
    method: str
    changes: Mapping[str, Any] = field(default_factory=dict)
    why: str = ""


def variants(params: Params) -> list[Variant]:
    """The study's rows for ``params`` (budgets are relative to its own ``train`` section)."""
    # budgets in the unit the params use: steps, or epochs when max_steps = 0
    steps = params.train.max_steps
    key, unit, half_n, double_n = (("train.max_steps", "steps", max(1, steps // 2), steps * 2) if steps > 0 else
                                   ("train.epochs", "epochs", params.train.epochs / 2, params.train.epochs * 2))
    return [
        Variant("sam", "sam", {}, "the frozen base"),
        Variant("pt_sam", "pt_sam", {}, "output tokens only (~1.3 K params)"),
        Variant("dsp", "dsp", {}, "DSP alone, α = (1, 0)"),
        Variant("stable_sam", "stable_sam", {}, "DSP + DRP, the default recipe"),
        Variant("dt_sam", "dt_sam", {"train.lr": params.train.lr / 10}, "the whole decoder (ceiling), lr / 10"),
        Variant("stable_sam free offsets" if params.plugin.dsp_zero_mean else "stable_sam zero-mean offsets",
                "stable_sam", {"plugin.dsp_zero_mean": not params.plugin.dsp_zero_mean},
                "DSP offsets with their per-map mean (a translation of the whole map) allowed or removed"),
        Variant(f"stable_sam {half_n:g} {unit}", "stable_sam", {key: half_n}, "half the budget"),
        Variant(f"stable_sam {double_n:g} {unit}", "stable_sam", {key: double_n}, "twice the budget"),
        Variant("stable_sam cosine", "stable_sam", {"train.lr_schedule": "cosine", "train.warmup_steps": 20},
                "cosine decay after 20 warm-up steps"),
        Variant("stable_sam lr / 3", "stable_sam", {"train.lr": params.train.lr / 3}, "a third of the learning rate"),
        Variant("stable_sam 1 prompt/view", "stable_sam", {"prompts.train_prompts_per_view": 1},
                "one stored prompt per view for every epoch (the old default)"),
        Variant("stable_sam no mask prompts", "stable_sam",
                {"prompts.train_type_probs": {"gt_box": 1.0, "noisy_box": 1.0, "points": 1.0, "coarse_mask": 0.0}},
                "the RTS mix without coarse-mask prompts"),
        Variant("stable_sam sloppy mix", "stable_sam",
                {"prompts.train_type_probs": {"gt_box": 0.1, "noisy_box": 0.45, "points": 0.45, "coarse_mask": 0.0}},
                "mostly the prompts it should fix: noisy boxes and points"),
    ]


def _slug(name: str) -> str:
    return name.replace(" ", "_").replace("/", "_per_")


def _train_prompts(params: Params, variant: Variant, work: Path, embeddings: Path, default: Path) -> Path:
    """The pipeline's training prompts, or a fresh table when the variant changes ``prompts`` params (eval
    prompts always stay the pipeline's own, so every variant is scored on the identical prompts)."""
    from pipeline.prompts.stage import make_prompts

    if not any(k.startswith("prompts.") for k in variant.changes):
        return default / "train.parquet"
    folder = work / "prompts" / _slug(variant.name)
    if not (folder / "train.parquet").is_file():
        make_prompts(params, embeddings, folder)
    return folder / "train.parquet"


def drp_gradients(params: Params, *, embeddings: Path, prompts: Path, base: Path, steps: int = 20) -> dict[str, Any]:
    """DRP's gradient norm at step 0 and after ``steps`` Adam steps on real batches of the train stage."""
    from pipeline.data.embedding_format import read_cache_meta
    from pipeline.modeling.backbones import load_base
    from pipeline.modeling.methods import build_method
    from pipeline.prompts.stage import model_frame
    from pipeline.prompts.tables import load_train_prompts
    from pipeline.training import ddp
    from pipeline.training.batches import BatchStream
    from pipeline.training.train import batch_loss

    sam, _ = load_base(base)
    torch.manual_seed(params.seed)
    model = build_method("stable_sam", sam, params.plugin).train()
    router = model.transformer.layer.router
    opt = torch.optim.Adam(model.trainable_parameters(), lr=params.train.lr)
    ctx = ddp.DistContext(0, 1, 0, torch.device("cpu"))
    stream = iter(BatchStream(params, embeddings, load_train_prompts(prompts / "train.parquet"),
                              model_frame(read_cache_meta(embeddings)), ctx, params.train.batch_size))
    norms = []
    for _ in range(steps + 1):
        opt.zero_grad(set_to_none=True)
        loss, n = batch_loss(model, next(stream), params, torch.device("cpu"))
        (loss / max(n, 1)).backward()
        norms.append(float(sum(p.grad.norm() ** 2 for p in router.parameters() if p.grad is not None) ** 0.5))
        opt.step()
    return {"drp_grad_norm_step0": norms[0], f"drp_grad_norm_step{steps}": norms[-1], "steps": steps}


def dsp_offsets_on(predictor: Any, views: Iterable[tuple[torch.Tensor, tuple[int, int], tuple[int, int], Any]]
                   ) -> dict[str, float]:
    """What the predictor's DSP does on ``views`` = (embedding ``[C, g, g]``, original (H, W), input (h, w),
    box ``[4]``), in grid cells; ``{}`` when the method has no DSP.

    ``mean_cells``: mean length of the per-cell offset Δp; ``global_cells``: mean over views of the length of
    the view's mean offset (a shift shared by every cell moves the whole map instead of sampling the object);
    ``spatial_std_cells``: mean over views of the per-axis spread of Δp across cells; ``bound_share``: share of
    offset components within 5 % of the tanh bound ``plugin.dsp_offset_range`` (saturated).
    """
    import numpy as np

    from pipeline.modeling.dsp import DeformableSampling, base_grid, cells_to_grid_units

    dsps = [m for m in predictor.decoder.modules() if isinstance(m, DeformableSampling)]
    if not dsps:
        return {}
    captured: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: Any, output: tuple[torch.Tensor, torch.Tensor]) -> None:
        grid = output[1].detach().float()  # (B, H, W, 2): cell centres + Δp, grid_sample units
        h, w = grid.shape[1:3]
        captured.append((grid - base_grid(h, w, device=grid.device, dtype=grid.dtype))
                        / cells_to_grid_units(h, w, device=grid.device, dtype=grid.dtype))

    handle = dsps[0].register_forward_hook(keep)
    try:
        for embedding, original_size, input_size, box in views:
            predictor.set_embedding(embedding, original_size, input_size)
            with torch.no_grad():
                predictor.predict(box=np.asarray(box, dtype=np.float64), multimask_output=False)
    finally:
        handle.remove()
    if not captured:
        return {}
    deltas = torch.cat(captured)  # (V, H, W, 2) in cells
    bound = dsps[0].offset_range
    return {
        "views": int(deltas.shape[0]),
        "bound_cells": float(bound),
        "mean_cells": round(float(deltas.norm(dim=-1).mean()), 3),
        "global_cells": round(float(deltas.mean(dim=(1, 2)).norm(dim=-1).mean()), 3),
        "spatial_std_cells": round(float(deltas.flatten(1, 2).std(dim=1).mean()), 3),
        "bound_share": round(float((deltas.abs() >= 0.95 * bound).float().mean()), 3),
    }


def dsp_offset_stats(base: Path, method: str, plugin: Path, embeddings: Path, max_views: int = 32) -> dict[str, float]:
    """:func:`dsp_offsets_on` for a trained plugin file on the first ``max_views`` eval views (GT-box prompts);
    ``{}`` for the frozen ``sam`` (no plugin)."""
    if method == "sam":
        return {}
    from itertools import islice

    from pipeline.data import rle
    from pipeline.data.embedding_reader import iter_views
    from pipeline.data.index import mask_box
    from pipeline.inference.predictor import Predictor

    predictor = Predictor.from_pretrained(base, method=method, plugin=plugin, device="cpu")

    def views() -> Iterator[tuple[torch.Tensor, tuple[int, int], tuple[int, int], Any]]:
        for row in islice(iter_views(embeddings, "eval"), max_views):
            h, w = int(row["height"]), int(row["width"])
            yield (row["embedding"], (h, w), (int(row["input_h"]), int(row["input_w"])),
                   mask_box(rle.decode(row["mask_rle"], h, w)))

    return dsp_offsets_on(predictor, views())


def run_variant(params: Params, variant: Variant, *, embeddings: Path, prompts: Path, base: Path,
                work: Path) -> dict[str, Any]:
    """Train (unless ``sam``) and score one variant; returns its hq_mean rows, fit and timing."""
    from pipeline.evaluation.evaluate import evaluate_benchmark
    from pipeline.training.train import train

    p = replace(params, **dict(variant.changes)) if variant.changes else params
    d = work / _slug(variant.name)
    train_prompts = _train_prompts(p, variant, work, embeddings, prompts)
    t0 = time.perf_counter()
    trained = train(p, variant.method, embeddings=embeddings, prompts=train_prompts, base=base,
                    out=d / "plugins", metrics=d / "train", plots=d / "train", resume="auto", checkpoints=d / "ckpt")
    seconds = time.perf_counter() - t0
    per_bench = {}
    for bench in hq_benchmarks(p):
        per_bench[bench] = {variant.method: evaluate_benchmark(
            p, bench, variant.method, embeddings=embeddings, prompts=prompts / "eval.parquet", base=base,
            plugins=d / "plugins", out=d / "eval", predictions=d / "pred", progress=False)}
    mean = hq_mean(per_bench, hq_benchmarks(p))
    plugin = d / "plugins" / f"{variant.method}.pt"
    offsets = dsp_offset_stats(base, variant.method, plugin, embeddings)
    return {"name": variant.name, "method": variant.method, "changes": dict(variant.changes), "why": variant.why,
            "hq_mean": mean.get(variant.method, {}), "train_seconds": round(seconds, 1),
            "steps": trained.get("steps", 0), "sanity": trained.get("sanity_iou", {}), "dsp_offsets": offsets}


def run_study(params: Params, *, embeddings: Path, prompts: Path, base: Path, work: Path, out: Path,
              only: list[str] | None = None) -> dict[str, Any]:
    """Run every variant (or those named in ``only``), add recovery ratios against ``sam``, write ``out``.

    Resumable per variant: finished rows go to ``<work>/rows.json`` as they complete, and a re-run reuses a
    row whose name, method and changes match (filling in the DSP offsets if the row predates them).
    """
    done_path = Path(work) / "rows.json"
    done_path.parent.mkdir(parents=True, exist_ok=True)
    done = {r["name"]: r for r in json.loads(done_path.read_text())} if done_path.is_file() else {}
    rows = []
    for v in variants(params):
        if only and v.name not in only and v.name != "sam":
            continue
        old = done.get(v.name)
        if old and old.get("method") == v.method and old.get("changes") == json.loads(json.dumps(dict(v.changes))):
            log.info("fidelity: %s already done (%s)", v.name, done_path)
            row = old
            if "dsp_offsets" not in row:
                plugin = Path(work) / _slug(v.name) / "plugins" / f"{v.method}.pt"
                row["dsp_offsets"] = dsp_offset_stats(base, v.method, plugin, embeddings)
        else:
            log.info("fidelity: %s (%s)", v.name, v.why)
            row = run_variant(params, v, embeddings=embeddings, prompts=prompts, base=base, work=work)
        rows.append(row)
        done[v.name] = row
        atomic_write_json(done_path, list(done.values()))
    block = {r["name"]: {k: dict(v) for k, v in r["hq_mean"].items()} for r in rows}
    add_recovery(block, "sam")
    rows = [dict(r, hq_mean=block[r["name"]]) for r in rows]
    result = {"rows": rows, "drp": drp_gradients(params, embeddings=embeddings, prompts=prompts, base=base),
              "paper_recovery": paper.PAPER_RECOVERY}
    atomic_write_json(out, result)
    return result


def markdown_table(result: Mapping[str, Any]) -> list[str]:
    """The study's main table (mIoU per prompt type, recovery ratios, fit, time)."""
    head = ["variant", *PROMPTS, "R noisy", "R 1 pt", "fit train noisy/1pt", "eval split noisy/1pt",
            "DSP Δp mean/global (cells)", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        m = r["hq_mean"]
        cells = [r["name"]] + [f"{m.get(p, {}).get('miou', float('nan')):.1f}" for p in PROMPTS]
        cells += [f"{m.get(p, {}).get('recovery', float('nan')):.2f}" for p in ("noisy_box", "point_1")]
        after = r.get("sanity", {}).get("after", {})
        for split in ("train", "eval"):
            s = after.get(split, {})
            cells.append(f"{s.get('noisy_box', float('nan')):.1f} / {s.get('point_1', float('nan')):.1f}" if s else "–")
        o = r.get("dsp_offsets") or {}
        cells.append(f"{o['mean_cells']:.2f} / {o['global_cells']:.2f}" if o else "–")
        cells.append(f"{r['train_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def recovery_plot(result: Mapping[str, Any], out_png: Path) -> Path:
    """Horizontal bars: R_noisy_box and R_point_1 of every variant, the paper's as dashed lines."""
    import numpy as np
    from matplotlib.figure import Figure

    from pipeline.evaluation.plots import save_figure

    rows = [r for r in result["rows"] if r["name"] != "sam"]
    names = [r["name"] for r in rows][::-1]
    fig = Figure(figsize=(7.5, 0.42 * len(rows) + 1.6))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))
    for k, (prompt, color) in enumerate((("noisy_box", "#1f77b4"), ("point_1", "#ff7f0e"))):
        vals = [r["hq_mean"].get(prompt, {}).get("recovery", np.nan) for r in rows][::-1]
        ax.barh(y + (k - 0.5) * 0.38, vals, height=0.38, color=color, label=f"R {prompt}")
        ax.axvline(paper.PAPER_RECOVERY[prompt], color=color, ls="--", lw=1,
                   label=f"paper R {prompt} ({paper.PAPER_RECOVERY[prompt]:.2f}, ViT-L)")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ax.set_xlabel("recovery ratio R = (method − sam) / (sam GT box − sam)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_title("What each variant wins back of the frozen base's loss to sloppy prompts")
    fig.tight_layout()
    return save_figure(fig, out_png)


def run_fidelity(params: Params, *, embeddings: Path, prompts: Path, base: Path, work: Path, out: Path, plot: Path,
                 only: list[str] | None = None) -> dict[str, Any]:
    """The fidelity study: :func:`run_study`, the recovery plot at ``plot``, the Markdown table on stdout."""
    result = run_study(params, embeddings=embeddings, prompts=prompts, base=base, work=work, out=out, only=only)
    recovery_plot(result, plot)
    print("\n".join(markdown_table(result)))
    print(f"DRP gradient norm: {result['drp']}")
    return result


__all__ = ["PROMPTS", "Variant", "drp_gradients", "dsp_offset_stats", "dsp_offsets_on", "markdown_table", "recovery_plot", "run_fidelity", "run_study", "run_variant", "variants"]
