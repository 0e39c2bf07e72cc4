"""Aggregation of the evaluate stage's outputs: per-method JSON files -> ``metrics/eval.json`` (with the
unweighted ``hq_mean`` over the HQ sets, as in the paper, and recovery ratios), ``metrics/headline.json`` and
the series the plots draw. Values in percent (0-100), ``alpha1`` as a fraction (0-1); COCO benchmarks are
keyed ``coco_<name>``.
"""
from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from pipeline.config import EVAL_PROMPT_TYPES, Params
from pipeline.data.layout import EVAL_SETS
from pipeline.evaluation import paper_numbers as paper


log = logging.getLogger(__name__)

HQ_MEAN = "hq_mean"
COCO_PREFIX = "coco_"
POINT_COUNTS: dict[str, int] = {"point_1": 1, "point_3": 3, "point_5": 5, "point_10": 10, "point_20": 20}
HQ_METRICS = ("miou", "mbiou", "st", "alpha1")
COCO_METRICS = ("map", "map50", "miou")
Results = dict[str, dict[str, dict[str, dict[str, float]]]]  # benchmark -> method -> prompt -> metric


class ReportError(ValueError):
    """Evaluation outputs that cannot be reported; the message names the file and the fix."""


def _number(value: Any, where: str) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ReportError(f"{where}: expected a number, got {value!r} (re-run the evaluate stage)")
    return None if math.isnan(value) else float(value)


def read_method_json(path: str | Path) -> dict[str, dict[str, float]]:
    """Read one ``<benchmark>/<method>.json``: ``{prompt_type: {metric: number}}`` (NaN/null dropped).

    ``alpha1`` is returned as a fraction: a file that stores it in percent (any value > 1) is rescaled.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not readable JSON ({exc}); re-run the evaluate stage for it") from None
    if not isinstance(raw, dict):
        raise ReportError(f"{path}: expected {{prompt_type: {{metric: value}}}}, got {type(raw).__name__}")
    out: dict[str, dict[str, float]] = {}
    for prompt, metrics in raw.items():
        if not isinstance(metrics, dict):
            raise ReportError(f"{path}: {prompt!r} must map metric names to numbers, got {metrics!r}")
        vals = {}
        for key, value in metrics.items():
            if value is None:
                continue
            v = _number(value, f"{path}: {prompt}.{key}")
            if v is not None:
                vals[str(key)] = v
        out[str(prompt)] = vals
    alphas = [m["alpha1"] for m in out.values() if "alpha1" in m]
    if alphas and max(alphas) > 1.0:
        for m in out.values():
            if "alpha1" in m:
                m["alpha1"] /= 100.0
    return out


def coco_key(name: str) -> str:
    """eval.json key of a COCO benchmark: ``coco_<name>`` (a name already starting with ``coco_`` is kept)."""
    return name if name.startswith(COCO_PREFIX) else COCO_PREFIX + name


def benchmark_keys(params: Params) -> dict[str, str]:
    """``{folder name under eval_dir: key in eval.json}`` for ``evaluate.benchmarks``, in that order.

    HQ sets and ``evaluate.folders`` names keep their name; ``evaluate.coco`` names become :func:`coco_key`.
    """
    coco = {str(c["name"]) for c in params.evaluate.coco}
    return {name: coco_key(name) if name in coco else name for name in params.evaluate.all_benchmarks()}


def hq_benchmarks(params: Params) -> list[str]:
    """The HQ-Seg evaluation sets among ``evaluate.benchmarks`` (the sets ``hq_mean`` averages)."""
    return [b for b in params.evaluate.benchmarks if b in EVAL_SETS]


def collect_results(params: Params, eval_dir: str | Path) -> tuple[Results, list[str]]:
    """Read every configured ``<eval_dir>/<benchmark>/<method>.json``; missing ones become notes."""
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise ReportError(f"{eval_dir}: no evaluation outputs (run the evaluate stage first: dvc repro evaluate)")
    results: Results = {}
    notes: list[str] = []
    for folder, key in benchmark_keys(params).items():
        for method in params.evaluate.methods:
            path = eval_dir / folder / f"{method}.json"
            if not path.is_file():
                notes.append(f"missing evaluation output {path} (benchmark {folder}, method {method})")
                continue
            results.setdefault(key, {})[method] = read_method_json(path)
    if not results:
        raise ReportError(
            f"{eval_dir}: none of the configured benchmarks x methods has an output "
            f"({', '.join(benchmark_keys(params))} x {', '.join(params.evaluate.methods)}); run the evaluate stage"
        )
    for sub in sorted(p.name for p in eval_dir.iterdir() if p.is_dir()):
        if sub not in benchmark_keys(params):
            notes.append(f"ignored {eval_dir / sub}: benchmark not in params (stale output?)")
    return results, notes


def hq_mean(results: Results, hq_sets: Iterable[str]) -> dict[str, dict[str, dict[str, float]]]:
    """Per method and prompt type, the unweighted mean over the HQ sets present of every metric.

    ``n`` is summed instead, and ``n_sets`` says how many sets the mean covers.
    """
    acc: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    sets_seen: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for bench in hq_sets:
        for method, prompts in results.get(bench, {}).items():
            for prompt, metrics in prompts.items():
                sets_seen[method][prompt] += 1
                for key, value in metrics.items():
                    acc[method][prompt][key].append(value)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for method, prompts in acc.items():
        for prompt, metrics in prompts.items():
            row = {k: (float(sum(v)) if k == "n" else round(float(np.mean(v)), 4)) for k, v in metrics.items()}
            row["n_sets"] = sets_seen[method][prompt]
            out.setdefault(method, {})[prompt] = row
    return out


def add_recovery(mean: dict[str, dict[str, dict[str, float]]], baseline: str) -> None:
    """Add ``recovery`` (:func:`paper_numbers.recovery`, on mIoU) to every method's sloppy-prompt rows of
    ``mean`` (the hq_mean block), against the frozen ``baseline`` (``report.baseline``, normally ``sam``)."""
    base = mean.get(baseline, {})
    gt = base.get("gt_box", {}).get("miou")
    for method, prompts in mean.items():
        for prompt in paper.RECOVERY_PROMPTS:
            r = paper.recovery(prompts.get(prompt, {}).get("miou"), base.get(prompt, {}).get("miou"), gt)
            if r is not None and prompt in prompts:
                prompts[prompt]["recovery"] = round(r, 4)


def build_eval_json(params: Params, eval_dir: str | Path) -> tuple[dict[str, Any], list[str]]:
    """``{benchmark: {method: {prompt: {...}}}}`` with ``hq_mean``, and notes on what is missing."""
    results, notes = collect_results(params, eval_dir)
    hq_sets = [b for b in hq_benchmarks(params) if b in results]
    out: dict[str, Any] = dict(results)
    if hq_sets:
        out[HQ_MEAN] = hq_mean(results, hq_sets)
        add_recovery(out[HQ_MEAN], params.report.baseline)
        counts = {m: {b for b in hq_sets if m in results[b]} for m in params.evaluate.methods}
        if len({frozenset(s) for s in counts.values() if s}) > 1:
            notes.append("hq_mean covers different HQ sets for different methods: " + "; ".join(
                f"{m}: {', '.join(sorted(s)) or 'none'}" for m, s in counts.items()))
    return out, notes


def headline_metrics(eval_json: Mapping[str, Any], params: Params, seeds: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The small JSON for ``dvc metrics show`` / ``dvc exp show``: the claim first, then the detail.

    DVC shows a metrics file's keys as columns in file order, and a terminal (or ``less -S``, DVC's pager)
    shows the leftmost ones, so the file opens with :func:`lead_metrics` (short flat keys: the recovery
    ratios and the GT-box change of ``report.ours``). The detail that follows mirrors eval.json's paths
    (``hq_mean.stable_sam.noisy_box.miou``), so a dotted key such as ``tracking.promote_metric`` means the
    same in both files: hq_mean mIoU of the headline prompts, deltas, seed spread, COCO mAP.
    Written in this order (not key-sorted) by the report stage.
    """
    out: dict[str, Any] = lead_metrics(eval_json, params, seeds)
    mean = eval_json.get(HQ_MEAN, {})
    for method in params.evaluate.methods:
        for prompt in params.report.headline_prompts:
            row = mean.get(method, {}).get(prompt, {})
            if row.get("miou") is not None:
                cell = {"miou": round(row["miou"], 3)}
                if method != params.report.baseline and row.get("recovery") is not None:
                    cell["recovery"] = round(row["recovery"], 3)
                out.setdefault(HQ_MEAN, {}).setdefault(method, {})[prompt] = cell
    base, ours = params.report.baseline, params.report.ours
    for prompt in params.report.headline_prompts:
        d = delta(mean, ours, base, prompt)
        if d is not None:
            out.setdefault("delta", {}).setdefault(f"{ours}_minus_{base}", {})[prompt] = {"miou": round(d, 3)}
    for method, block in (seeds or {}).get("methods", {}).items():
        for prompt in paper.RECOVERY_PROMPTS[:2]:
            for metric in ("delta", "recovery"):
                c = block.get(prompt, {}).get(metric)
                if c is not None:
                    out.setdefault("seeds", {}).setdefault(method, {}).setdefault(prompt, {})[metric] = {
                        "mean": round(c["mean"], 3), "std": round(c["std"], 3)}
    for key, methods in eval_json.items():
        if key.startswith(COCO_PREFIX):
            for method, prompts in methods.items():
                for prompt, m in prompts.items():
                    if "map" in m:
                        out.setdefault(key, {}).setdefault(method, {})[prompt] = {"map": round(m["map"], 3)}
    return out


def lead_metrics(eval_json: Mapping[str, Any], params: Params,
                 seeds: Mapping[str, Any] | None = None) -> dict[str, float]:
    """The leading columns of ``dvc exp show``, for ``report.ours`` on the HQ mean.

    ``R_<prompt>`` for the paper's two recovery prompts (noisy_box, point_1) and ``d_gt_box`` (ours − baseline
    GT-box mIoU): the mean over training seeds when the seeds stage covered ``ours`` (that run is seed 0),
    with ``R_<prompt>_sd`` (sample std, from two seeds on); otherwise this run's values. Missing values are left out.
    """
    ours, base = params.report.ours, params.report.baseline
    lead: dict[str, float] = {}
    block = (seeds or {}).get("methods", {}).get(ours)
    if block:
        for prompt in paper.RECOVERY_PROMPTS[:2]:
            cell = block.get(prompt, {}).get("recovery")
            if cell is not None:
                lead[f"R_{prompt}"] = round(cell["mean"], 3)
                if cell.get("n", 2) > 1:  # one seed has no spread to show
                    lead[f"R_{prompt}_sd"] = round(cell["std"], 3)
        gt = block.get("gt_box", {}).get("delta")
        if gt is not None:
            lead["d_gt_box"] = round(gt["mean"], 3)
        return lead
    mean = eval_json.get(HQ_MEAN, {})
    for prompt in paper.RECOVERY_PROMPTS[:2]:
        r = mean.get(ours, {}).get(prompt, {}).get("recovery")
        if r is not None:
            lead[f"R_{prompt}"] = round(r, 3)
    d = delta(mean, ours, base, "gt_box")
    if d is not None:
        lead["d_gt_box"] = round(d, 3)
    return lead


def delta(mean: Mapping[str, Any], ours: str, base: str, prompt: str, metric: str = "miou") -> float | None:
    a = mean.get(ours, {}).get(prompt, {}).get(metric)
    b = mean.get(base, {}).get(prompt, {}).get(metric)
    return None if a is None or b is None else a - b


def prompt_order(params: Params, present: Iterable[str]) -> list[str]:
    present = set(present)
    order = [p for p in params.prompts.eval_types if p in present]
    order += [p for p in EVAL_PROMPT_TYPES if p in present and p not in order]
    return order + sorted(present - set(order))


def method_order(params: Params, present: Iterable[str]) -> list[str]:
    present = set(present)
    return [m for m in params.evaluate.methods if m in present] + sorted(present - set(params.evaluate.methods))


def points_series(mean: Mapping[str, Any], metric: str) -> dict[str, dict[int, float]]:
    """``{method: {number of points: value}}`` of ``metric`` over the point prompt types present."""
    series: dict[str, dict[int, float]] = {}
    for method, prompts in mean.items():
        pts = {n: prompts[p][metric] for p, n in POINT_COUNTS.items() if metric in prompts.get(p, {})}
        if pts:
            series[method] = pts
    return series


def n_sets(mean: Mapping[str, Any]) -> int:
    return max((int(m.get("n_sets", 0)) for p in mean.values() for m in p.values()), default=0)


__all__ = [
    "COCO_METRICS", "COCO_PREFIX", "HQ_MEAN", "HQ_METRICS", "POINT_COUNTS", "ReportError", "Results",
    "add_recovery", "benchmark_keys", "build_eval_json", "coco_key", "collect_results", "delta",
    "headline_metrics", "hq_benchmarks", "hq_mean", "lead_metrics", "method_order", "n_sets", "points_series", "prompt_order",
    "read_method_json"
]
