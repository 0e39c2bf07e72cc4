"""The `report` stage: aggregate the evaluate stage's outputs into metrics, plots and a summary.

Reads ``<eval_dir>/<benchmark>/<method>.json`` (written by the evaluate stage) for the benchmarks and
methods named in params (``evaluate.benchmarks`` x ``evaluate.methods``; stale files of other names are
ignored, missing ones are listed in the summary), and writes:

- ``metrics/eval.json``: ``{benchmark: {method: {prompt_type: {metric: value}}}}`` plus ``hq_mean`` (the
  unweighted mean over the HQ sets present, as in the paper; ``n`` is summed, ``n_sets`` counts them);
  COCO benchmarks are keyed ``coco_<name>`` (a name that already starts with ``coco_`` is kept). Values in percent (0-100), ``alpha1`` as a fraction (0-1).
- ``metrics/headline.json``: the few numbers ``dvc metrics show`` / ``dvc exp show`` should display
  (``hq_mean.<method>.<prompt>.miou`` for ``report.headline_prompts`` and the ours-minus-baseline deltas).
- plots (PNG + CSV for ``dvc plots``): mIoU vs points, alpha1 vs points, per-dataset mIoU bars, and an
  overlay gallery per ``report.gallery_prompts`` prompt type.
- ``reports/summary.md``: profile, tables, the paper's numbers beside ours, deltas, alpha1 trend.

    python -m stages.report --params params.yaml --eval-dir metrics/eval --predictions data/predictions \
        --prompts data/prompts/eval.parquet --index data/index/index.parquet --root data/hqseg44k \
        --metrics metrics/eval.json --plots plots/eval --report reports/summary.md
"""
from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow.parquet as pq

from pipeline.common.atomic import atomic_write_json, atomic_write_text
from pipeline.config import EVAL_PROMPT_TYPES, Params
from pipeline.data import rle
from pipeline.data.images import DecodeError, load_image, load_mask
from pipeline.data.layout import EVAL_SETS
from pipeline.evaluation import paper_numbers as paper
from pipeline.evaluation import plots
from pipeline.evaluation.metrics import mask_iou

log = logging.getLogger(__name__)

HQ_MEAN = "hq_mean"
COCO_PREFIX = "coco_"
POINT_COUNTS: dict[str, int] = {"point_1": 1, "point_3": 3, "point_5": 5, "point_10": 10, "point_20": 20}
HQ_METRICS = ("miou", "mbiou", "st", "alpha1")
COCO_METRICS = ("map", "map50", "miou")
METRIC_LABELS = {"miou": "mIoU", "mbiou": "mBIoU", "st": "ST (ours)", "alpha1": "α1",
                 "map": "mAP", "map50": "mAP50", "n": "n"}
# Files of plots_dir this stage owns; any of them not produced by a run is removed (no stale figures).
_OWNED_PLOT_FILES = ("miou_vs_points", "alpha1_vs_points", "miou_per_dataset")

Results = dict[str, dict[str, dict[str, dict[str, float]]]]  # benchmark -> method -> prompt -> metric


class ReportError(ValueError):
    """Evaluation outputs that cannot be reported; the message names the file and the fix."""


@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote, and the notes (skips, missing inputs) it put in the summary."""

    metrics_path: Path
    headline_path: Path
    report_md: Path
    plots: tuple[Path, ...]
    notes: tuple[str, ...]


# ------------------------------------------------------------------------------------------ loading
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
    return {name: coco_key(name) if name in coco else name for name in params.evaluate.benchmarks}


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
    """The small JSON for ``dvc metrics show``: hq_mean mIoU of the headline prompts, deltas, COCO mAP.

    Keys mirror eval.json's paths (``hq_mean.stable_sam.noisy_box.miou``), so a dotted key such as
    ``tracking.promote_metric`` means the same in both files.
    """
    out: dict[str, Any] = {}
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
        d = _delta(mean, ours, base, prompt)
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


def _delta(mean: Mapping[str, Any], ours: str, base: str, prompt: str, metric: str = "miou") -> float | None:
    a = mean.get(ours, {}).get(prompt, {}).get(metric)
    b = mean.get(base, {}).get(prompt, {}).get(metric)
    return None if a is None or b is None else a - b


# -------------------------------------------------------------------------------------------- plots
def _prompt_order(params: Params, present: Iterable[str]) -> list[str]:
    present = set(present)
    order = [p for p in params.prompts.eval_types if p in present]
    order += [p for p in EVAL_PROMPT_TYPES if p in present and p not in order]
    return order + sorted(present - set(order))


def _method_order(params: Params, present: Iterable[str]) -> list[str]:
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


def _series_csv(path: Path, series: Mapping[str, Mapping[int, float]], methods: list[str]) -> Path:
    xs = sorted({x for s in series.values() for x in s})
    rows = [[x] + [series[m].get(x) for m in methods] for x in xs]
    return plots.write_csv(path, ["points"] + methods, rows)


def write_plots(eval_json: Mapping[str, Any], params: Params, plots_dir: str | Path) -> list[Path]:
    """mIoU vs points, alpha1 vs points (DRP methods only) and per-dataset bars: PNG + CSV each."""
    plots_dir = Path(plots_dir)
    methods_all = _method_order(params, {m for b in eval_json.values() for m in b})
    colors = plots.method_colors(methods_all)
    written: list[Path] = []
    mean = eval_json.get(HQ_MEAN, {})
    miou = points_series(mean, "miou")
    if miou:
        methods = _method_order(params, miou)
        written.append(plots.line_plot(
            {m: miou[m] for m in methods}, plots_dir / "miou_vs_points.png", colors=colors,
            title=f"mIoU vs number of positive points (mean of {_n_sets(mean)} HQ sets)",
            xlabel="positive points", ylabel="mIoU (%)"))
        written.append(_series_csv(plots_dir / "miou_vs_points.csv", miou, methods))
    alpha = points_series(mean, "alpha1")
    if alpha:
        methods = _method_order(params, alpha)
        written.append(plots.line_plot(
            {m: alpha[m] for m in methods}, plots_dir / "alpha1_vs_points.png", colors=colors,
            reference={"paper Table 6 (Stable-SAM, ViT-L, HQSeg-44K)": paper.ALPHA1_TABLE6},
            title="DRP weight α1 of the deformed features vs points", xlabel="positive points",
            ylabel="mean α1"))
        written.append(_series_csv(plots_dir / "alpha1_vs_points.csv", alpha, methods))
    bench = [b for b in eval_json if b != HQ_MEAN and not b.startswith(COCO_PREFIX)]
    if bench:
        groups = bench + ([HQ_MEAN] if HQ_MEAN in eval_json else [])
        prompts = _prompt_order(params, {p for b in groups for m in eval_json[b].values() for p in m})
        values = {p: {b: {m: eval_json[b][m][p]["miou"] for m in eval_json[b]
                          if "miou" in eval_json[b][m].get(p, {})} for b in groups} for p in prompts}
        written.append(plots.grouped_bars(values, plots_dir / "miou_per_dataset.png", colors=colors,
                                          title="mIoU per dataset and prompt type", ylabel="mIoU (%)"))
        rows = [[f"{b}/{p}", b, p] + [values[p][b].get(m) for m in methods_all] for p in prompts for b in groups]
        written.append(plots.write_csv(plots_dir / "miou_per_dataset.csv", ["case", "benchmark", "prompt_type"]
                                       + methods_all, rows))
    return written


def _n_sets(mean: Mapping[str, Any]) -> int:
    return max((int(m.get("n_sets", 0)) for p in mean.values() for m in p.values()), default=0)


# ------------------------------------------------------------------------------------------ gallery
@dataclass(frozen=True)
class GalleryInputs:
    """Where the gallery reads from (any of them missing -> no gallery, with a note)."""

    predictions_dir: Path | None
    prompts: Path | None
    index: Path | None
    root: Path | None


def _read_filtered(path: Path, columns: list[str], prompt_types: Iterable[str], draw: int) -> list[dict[str, Any]]:
    """Rows of ``path`` with the given prompt types and draw (filtered while scanning: predictions are big)."""
    try:
        table = pq.read_table(path, columns=columns,
                              filters=[("prompt_type", "in", list(prompt_types)), ("draw", "=", draw)])
    except Exception as exc:  # pyarrow raises several types for a bad/incomplete file
        raise ReportError(f"{path}: not a readable parquet with columns {columns} ({exc})") from None
    return table.to_pylist()


def select_gallery_views(candidates: Mapping[str, list[str]], n: int) -> list[tuple[str, str]]:
    """Pick ``n`` (benchmark, view_id): round robin over benchmarks, sorted view ids (not cherry-picked)."""
    queues = {b: sorted(v) for b, v in candidates.items() if v}
    picked: list[tuple[str, str]] = []
    i = 0
    while len(picked) < n and any(i < len(q) for q in queues.values()):
        for b, q in queues.items():
            if i < len(q) and len(picked) < n:
                picked.append((b, q[i]))
        i += 1
    return picked


def gallery_rows(
    params: Params, inputs: GalleryInputs, benchmarks: list[str], notes: list[str]
) -> dict[str, list[plots.GalleryRow]]:
    """``{prompt_type: rows}`` for the gallery: image + prompt, baseline mask, ours mask, GT per row.

    Every row's panel titles carry the IoU of that mask with the GT (computed here from the masks).
    Problems (missing inputs, an undecodable image) are appended to ``notes`` and the image skipped.
    """
    cfg = params.report
    n_images = params.evaluate.gallery_images
    methods = (cfg.baseline, cfg.ours)
    prompt_types = list(cfg.gallery_prompts)
    if n_images == 0 or not prompt_types:
        return {}
    missing = [f"{k} ({v or 'not given'})" for k, v in vars(inputs).items() if v is None or not Path(v).exists()]
    if missing:
        notes.append(f"gallery skipped: missing input(s): {', '.join(missing)}")
        return {}
    try:
        index_rows = {r["sample_id"]: r for r in pq.read_table(
            inputs.index, columns=["sample_id", "image_path", "mask_path"]).to_pylist()}
        prompt_rows = {(r["view_id"], r["prompt_type"]): r for r in _read_filtered(
            inputs.prompts, ["view_id", "prompt_type", "draw", "box", "points", "point_labels"], prompt_types,
            cfg.gallery_draw)}
    except Exception as exc:  # a gallery is optional: a broken index/prompts file skips it, with the reason
        notes.append(f"gallery skipped: cannot read {inputs.index} / {inputs.prompts}: {exc}")
        return {}
    preds: dict[tuple[str, str, str], str] = {}
    candidates: dict[str, list[str]] = {}
    for bench in benchmarks:
        per_method = []
        for method in methods:
            path = inputs.predictions_dir / bench / f"{method}.parquet"
            try:
                if not path.is_file():
                    raise ReportError(f"{path}: not found (evaluate {method} on {bench})")
                rows = _read_filtered(path, ["view_id", "prompt_type", "draw", "pred_rle"], prompt_types, cfg.gallery_draw)
            except ReportError as exc:
                notes.append(f"gallery: {bench} not shown: {exc}")
                per_method = []
                break
            for r in rows:
                preds[(method, r["view_id"], r["prompt_type"])] = r["pred_rle"]
            per_method.append({(r["view_id"], r["prompt_type"]) for r in rows})
        if not per_method:
            continue
        keys = set.intersection(*per_method) & set(prompt_rows)
        views = {v for v, _ in keys if all((v, p) in keys for p in prompt_types)}
        originals = {v for v in views if v.endswith("#0") and v.rsplit("#", 1)[0] in index_rows}
        if len(originals) < len(views):
            notes.append(f"gallery: {len(views) - len(originals)} {bench} view(s) are not original images; not shown")
        candidates[bench] = sorted(originals)
    picked = select_gallery_views(candidates, sum(len(v) for v in candidates.values()))  # skips refill
    out: dict[str, list[plots.GalleryRow]] = {p: [] for p in prompt_types}
    shown = 0
    for bench, view_id in picked:
        if shown == n_images:
            break
        sample = index_rows[view_id.rsplit("#", 1)[0]]
        try:
            image = load_image(inputs.root / sample["image_path"])
            gt = load_mask(inputs.root / sample["mask_path"], params.index.mask_threshold)
            rows = {p: _gallery_row(params, bench, view_id, image, gt, prompt_rows[(view_id, p)], preds) for p in prompt_types}
        except (DecodeError, OSError, ValueError) as exc:
            notes.append(f"gallery: skipped {view_id}: {exc}")
            continue
        for p, row in rows.items():
            out[p].append(row)
        shown += 1
    if shown < n_images:
        notes.append(f"gallery: {shown} of the {n_images} requested images available (evaluate.gallery_images)")
    return {p: rows for p, rows in out.items() if rows}


def _gallery_row(
    params: Params, bench: str, view_id: str, image: np.ndarray, gt: np.ndarray,
    prompt: Mapping[str, Any], preds: Mapping[tuple[str, str, str], str],
) -> plots.GalleryRow:
    h, w = gt.shape
    if image.shape[:2] != (h, w):
        raise ValueError(f"image {image.shape[:2]} and mask {(h, w)} sizes differ")
    box = None if prompt.get("box") is None else [float(v) for v in prompt["box"]]
    points = labels = None
    if prompt.get("points"):
        points = np.asarray(prompt["points"], dtype=np.float64).reshape(-1, 2)
        raw = prompt.get("point_labels")
        labels = np.ones(len(points), int) if raw is None else np.asarray(raw, dtype=int).reshape(-1)
    kind = prompt["prompt_type"].replace("_", " ")
    panels = [plots.GalleryPanel(f"image + {kind}", image, None, box=box, points=points, labels=labels)]
    colors = plots.method_colors(params.evaluate.methods)
    for method, name in ((params.report.baseline, "frozen " + paper.label(params.report.baseline)),
                         (params.report.ours, paper.label(params.report.ours))):
        mask = rle.decode(preds[(method, view_id, prompt["prompt_type"])], h, w)
        panels.append(plots.GalleryPanel(f"{name}: IoU {100 * mask_iou(mask, gt):.1f}", image, mask,
                                         colors.get(method, "#1f77b4"), box=box, points=points, labels=labels))
    panels.append(plots.GalleryPanel("ground truth", image, gt, plots.GT_COLOR))
    return plots.GalleryRow(f"{bench}\n{view_id.split('/', 1)[-1]}", panels)


# ------------------------------------------------------------------------------------------ summary
def _paper_delta(ours: str, base: str, prompt: str) -> float | None:
    a, b = paper.lookup(paper.HQ_MIOU, ours, prompt), paper.lookup(paper.HQ_MIOU, base, prompt)
    return None if a is None or b is None else a - b


def _fmt(v: float | None, nd: int = 1) -> str:
    return "—" if v is None else f"{v:.{nd}f}"


def _signed(v: float | None) -> str:
    return "—" if v is None else f"{v:+.1f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"] + [
        "| " + " | ".join(r) + " |" for r in rows]


def comparability(params: Params) -> tuple[bool, list[str]]:
    """(whether the setting matches the paper's, the differences) for the summary's warning."""
    diffs = []
    if params.data.source != "hqseg44k":
        diffs.append(f"generated stand-in data (data.source: {params.data.source}), not HQSeg-44K")
    if params.sam.variant != "vit_l":
        diffs.append(f"SAM variant `{params.sam.variant}` (the paper: ViT-L)")
    if params.data.max_images_per_set:
        diffs.append(f"at most {params.data.max_images_per_set} images per set (data.max_images_per_set)")
    if params.prompts.eval_draws != 20:
        diffs.append(f"{params.prompts.eval_draws} draws per random prompt type (the paper: 20)")
    same_setting = params.data.source == "hqseg44k" and params.sam.variant == "vit_l"
    return same_setting, diffs


def _profile_lines(params: Params, index: Path | None) -> list[str]:
    lines = [f"- data.source: `{params.data.source}`; sam.variant: `{params.sam.variant}`; "
             f"eval post-processing: `{params.evaluate.postprocess}`; draws per random prompt type: "
             f"{params.prompts.eval_draws}"]
    if index is not None and Path(index).is_file():
        t = pq.read_table(index, columns=["dataset", "split"]).to_pylist()
        train = sum(r["split"] == "train" for r in t)
        per = defaultdict(int)
        for r in t:
            if r["split"] == "eval":
                per[r["dataset"]] += 1
        lines.append(f"- images: {train} training; evaluation " + ", ".join(f"{d} {n}" for d, n in sorted(per.items())))
    else:
        lines.append("- images: index not available; see the `n` columns below")
    return lines


def _metric_table(block: Mapping[str, Any], params: Params, metric: str, nd: int = 1) -> list[str]:
    methods = [m for m in _method_order(params, block) if any(metric in v for v in block[m].values())]
    prompts = _prompt_order(params, {p for m in methods for p, v in block[m].items() if metric in v})
    rows = [[m] + [_fmt(block[m].get(p, {}).get(metric), nd) for p in prompts] for m in methods]
    return _table(["method"] + prompts, rows) if rows else []


def _cells_table(block: Mapping[str, Any], params: Params, metrics: tuple[str, ...]) -> list[str]:
    methods = _method_order(params, block)
    prompts = _prompt_order(params, {p for m in methods for p in block[m]})
    rows = [[m] + [" / ".join(_fmt(block[m].get(p, {}).get(k)) for k in metrics) for p in prompts] for m in methods]
    return _table(["method"] + prompts, rows)


def _paper_tables(mean: Mapping[str, Any], params: Params) -> list[str]:
    def ours(method: str, prompt: str, metric: str = "miou") -> float | None:
        return mean.get(method, {}).get(prompt, {}).get(metric)

    out = [f"Paper: {paper.SOURCE}. Setting: {paper.SETTING}.", ""]
    methods = list(paper.HQ_MIOU)
    header = ["prompt"] + [f"{paper.label(m)} {w}" for m in methods for w in ("ours", "paper")]
    rows = [[p] + [c for m in methods for c in (_fmt(ours(m, p)), _fmt(paper.lookup(paper.HQ_MIOU, m, p)))]
            for p in ("gt_box", "noisy_box", "point_1", "point_3")]
    out += ["**mIoU, four prompt types** (README chart / supplement):", ""] + _table(header, rows) + [""]
    header = ["method"] + [f"{k} {w}" for k in ("mIoU", "mBIoU", "ST") for w in ("ours", "paper")]
    rows = [[paper.label(m)] + [c for k in ("miou", "mbiou", "st")
                                for c in (_fmt(ours(m, "noisy_box", k)), _fmt(paper.NOISY_BOX_TABLE3[m][k]))]
            for m in paper.NOISY_BOX_TABLE3]
    out += ["**Noisy box, supplement Table 3** (ST: the paper's unpublished formula vs ours — not comparable):", ""]
    out += _table(header, rows) + [""]
    counts = sorted({n for m in paper.POINTS_TABLE5 for n in paper.points_table5(m)})
    header = ["method"] + [f"{n} pt {w}" for n in counts for w in ("ours", "paper")]
    rows = [[paper.label(m)] + [c for n in counts for c in (_fmt(ours(m, f"point_{n}")), _fmt(paper.points_table5(m).get(n)))]
            for m in paper.POINTS_TABLE5]
    out += ["**mIoU vs points, supplement Table 5** (only the columns whose point count is certain):", ""]
    out += _table(header, rows) + [""]
    drp = [m for m in _method_order(params, mean) if any("alpha1" in v for v in mean[m].values())]
    counts = [n for n in POINT_COUNTS.values() if n in paper.ALPHA1_TABLE6]
    rows = [[f"{m} (ours)"] + [_fmt(ours(m, f"point_{n}", "alpha1"), 3) for n in counts] for m in drp]
    rows.append(["Stable-SAM (paper)"] + [_fmt(paper.ALPHA1_TABLE6[n], 3) for n in counts])
    out += ["**α1 vs points, supplement Table 6**:", ""] + _table(["method"] + [f"{n} pt" for n in counts], rows)
    return out + [""]


def recovery_table(mean: Mapping[str, Any], params: Params) -> list[str]:
    """Markdown: the recovery ratio R_P of every method beside the paper's (Stable-SAM, ViT-L)."""
    base = params.report.baseline
    methods = [m for m in _method_order(params, mean) if m != base
               and any("recovery" in mean[m].get(p, {}) for p in paper.RECOVERY_PROMPTS)]
    if not methods:
        return []
    header = ["method"] + [f"R {p}" for p in paper.RECOVERY_PROMPTS]
    rows = [[m] + [_fmt(mean[m].get(p, {}).get("recovery"), 2) for p in paper.RECOVERY_PROMPTS] for m in methods]
    rows.append(["Stable-SAM (paper, ViT-L)"] + [_fmt(paper.PAPER_RECOVERY[p], 2) for p in paper.RECOVERY_PROMPTS])
    gt = mean.get(base, {}).get("gt_box", {}).get("miou")
    return [f"**Recovery ratio** R_P = (method_P − {base}_P) / ({base}_gt_box − {base}_P): the share of what a "
            f"sloppy prompt costs the frozen {base} that a method wins back (1 = all of it; {base} GT box: "
            f"{_fmt(gt)} mIoU). A single run; seed spread: `metrics/seeds.json` when present.", ""] + _table(header, rows)


def seeds_lines(seeds: Mapping[str, Any], prompts: Sequence[str] = ("gt_box", *paper.RECOVERY_PROMPTS)) -> list[str]:
    """Markdown for the summary: per method, mean ± std over seeds of Δ mIoU and the recovery ratio."""
    if not seeds or not seeds.get("methods"):
        return []
    n = len(seeds.get("seeds", []))
    base = seeds.get("baseline", "sam")
    L = [f"**Over {n} training seeds** ({', '.join(map(str, seeds.get('seeds', [])))}; mean ± sample std; "
         f"Δ = method − {base}, mIoU points):", ""]
    header = ["method"] + [f"Δ {p}" for p in prompts] + [f"R {p}" for p in paper.RECOVERY_PROMPTS]
    rows = []
    for method, block in seeds["methods"].items():
        def cell(prompt: str, metric: str, nd: int) -> str:
            c = block.get(prompt, {}).get(metric)
            return "–" if c is None else f"{c['mean']:+.{nd}f} ± {c['std']:.{nd}f}" if metric == "delta" \
                else f"{c['mean']:.{nd}f} ± {c['std']:.{nd}f}"
        rows.append([method] + [cell(p, "delta", 1) for p in prompts]
                    + [cell(p, "recovery", 2) for p in paper.RECOVERY_PROMPTS])
    L += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]
    alpha = []
    for method, block in seeds["methods"].items():
        a1, a10 = block.get("point_1", {}).get("alpha1"), block.get("point_10", {}).get("alpha1")
        if a1 and a10:
            alpha.append(f"- `{method}` mean α1: 1 point {a1['mean']:.3f} ± {a1['std']:.3f}, 10 points "
                         f"{a10['mean']:.3f} ± {a10['std']:.3f} (paper: 0.614 → 0.371).")
    return L + [""] + alpha


def read_seeds(path: Path | None) -> dict[str, Any]:
    """``metrics/seeds.json`` (stage ``seeds``), or {} when not given or absent."""
    if path is None or not Path(path).is_file():
        return {}
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path}: not valid JSON ({exc}); re-run the seeds stage") from None


def alpha_trend(mean: Mapping[str, Any]) -> list[str]:
    """One sentence per DRP method: does mean alpha1 fall as the number of points grows?"""
    lines = []
    for method, pts in points_series(mean, "alpha1").items():
        xs = sorted(pts)
        vals = [pts[x] for x in xs]
        seq = ", ".join(f"{x} pt {pts[x]:.3f}" for x in xs)
        if len(vals) < 2:
            verdict = "only one point count evaluated; no trend"
        elif all(b < a for a, b in zip(vals, vals[1:])):
            verdict = "**falls** monotonically as points increase (as in the paper's Table 6)"
        elif vals[-1] < vals[0]:
            verdict = "falls overall but **not monotonically**"
        else:
            verdict = "does **not** fall as points increase (the paper's Table 6 has it falling 0.614 → 0.359)"
        lines.append(f"- α1 of `{method}` {verdict}: {seq}.")
    return lines or ["- No method with DRP (α1) was evaluated."]


def render_summary(
    eval_json: Mapping[str, Any], params: Params, *, index: Path | None, plot_files: list[Path],
    gallery_files: list[Path], report_md: Path, notes: list[str], seeds: Mapping[str, Any] | None = None,
) -> str:
    """The Markdown of reports/summary.md (PNG links relative to ``report_md``'s folder)."""
    same, diffs = comparability(params)
    base, ours = params.report.baseline, params.report.ours
    mean = eval_json.get(HQ_MEAN, {})
    L = ["# Stable-SAM evaluation report", "", "## Profile", ""] + _profile_lines(params, index) + [""]
    if not same:
        L.append("> **These numbers are NOT comparable with the paper's**: different model and data — "
                 + "; ".join(diffs) + ". They test that the pipeline works and how the methods rank, nothing more.")
    elif diffs:
        L.append("> Same data and backbone as the paper's main results, but: " + "; ".join(diffs) + ".")
    else:
        L.append("> Same data and backbone as the paper's main results; our [assume] choices (docs/SPEC.md) still differ.")
    L += ["", "> **ST is our definition** (mean pairwise mask IoU of the K draws of a prompt type × 100, SPEC §5); "
          "the paper's formula is unpublished, so its ST numbers are shown for reference only.", ""]
    if mean:
        sets = _n_sets(mean)
        L += [f"## Mean over the HQ sets ({sets} present)", ""]
        deltas = ", ".join(f"{p} {_signed(_delta(mean, ours, base, p))}" for p in ("noisy_box", "point_1", "gt_box"))
        pdel = ", ".join(f"{p} {_signed(_paper_delta(ours, base, p))}" for p in ("noisy_box", "point_1", "gt_box"))
        L += [f"**Deltas** ({ours} − {base}, mIoU points): {deltas} (paper: {pdel}).", ""]
        L += recovery_table(mean, params) + [""]
        L += seeds_lines(seeds or {}) + [""]
        L += alpha_trend(mean) + [""]
        for metric, nd in (("miou", 1), ("mbiou", 1), ("st", 1), ("alpha1", 3)):
            t = _metric_table(mean, params, metric, nd)
            if t:
                L += [f"**{METRIC_LABELS[metric]}**", ""] + t + [""]
        L += ["## The paper's numbers beside ours", ""] + _paper_tables(mean, params)
    else:
        L += ["No HQ set was evaluated: no mean, no comparison with the paper.", ""]
    per_set = [b for b in eval_json if b != HQ_MEAN and not b.startswith(COCO_PREFIX)]
    if per_set:
        L += ["## Per dataset (mIoU / mBIoU)", ""]
        for b in per_set:
            L += [f"### {b}", ""] + _cells_table(eval_json[b], params, ("miou", "mbiou")) + [""]
    coco = [b for b in eval_json if b.startswith(COCO_PREFIX)]
    if coco:
        L += ["## COCO benchmarks (mAP / mAP50 / mIoU)", ""]
        for b in coco:
            L += [f"### {b}", ""] + _cells_table(eval_json[b], params, COCO_METRICS) + [""]
    rel = lambda p: Path(os.path.relpath(p, report_md.parent)).as_posix()  # noqa: E731
    pngs = [p for p in plot_files if p.suffix == ".png"] + gallery_files
    if pngs:
        L += ["## Plots", ""]
        for p in pngs:
            L += [f"![{p.stem}]({rel(p)})", ""]
    if gallery_files:
        L += [f"Gallery: columns = image with the prompt, frozen {paper.label(base)}, {paper.label(ours)}, ground "
              "truth; IoU in each title. Images are the first by sorted name, round robin over the sets "
              "(not chosen by result).", ""]
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(L)


# ---------------------------------------------------------------------------------------------- top
def build_report(
    params: Params,
    eval_dir: str | Path,
    predictions_dir: str | Path | None,
    prompts: str | Path | None,
    index: str | Path | None,
    root: str | Path | None,
    out_metrics: str | Path,
    plots_dir: str | Path,
    report_md: str | Path,
    *,
    out_headline: str | Path | None = None,
    seeds_json: str | Path | None = None,
) -> ReportResult:
    """Write eval.json, headline.json (default: next to eval.json), the plots and the summary.

    ``predictions_dir``/``prompts``/``index``/``root`` only feed the gallery and the image counts;
    any of them may be ``None`` or missing (the summary then says what was skipped).
    """
    out_metrics, plots_dir, report_md = Path(out_metrics), Path(plots_dir), Path(report_md)
    out_headline = Path(out_headline) if out_headline else out_metrics.with_name("headline.json")
    opt = lambda p: None if p is None else Path(p)  # noqa: E731
    eval_json, notes = build_eval_json(params, eval_dir)
    for n in notes:
        log.warning(n)
    plots_dir.mkdir(parents=True, exist_ok=True)
    plot_files = write_plots(eval_json, params, plots_dir)
    hq = [b for b in hq_benchmarks(params) if b in eval_json]
    gallery_files: list[Path] = []
    g_notes: list[str] = []
    rows = gallery_rows(params, GalleryInputs(opt(predictions_dir), opt(prompts), opt(index), opt(root)), hq, g_notes)
    for prompt_type, prompt_rows in rows.items():
        title = (f"{prompt_type.replace('_', ' ')} (draw {params.report.gallery_draw}): frozen "
                 f"{paper.label(params.report.baseline)} vs {paper.label(params.report.ours)}")
        gallery_files.append(plots.gallery(prompt_rows, plots_dir / f"gallery_{prompt_type}.png", title=title,
                                           max_side=params.report.gallery_max_side))
    for n in g_notes:
        log.warning(n)
    _remove_stale(plots_dir, plot_files + gallery_files)
    atomic_write_json(out_metrics, eval_json)
    seeds = read_seeds(opt(seeds_json))
    atomic_write_json(out_headline, headline_metrics(eval_json, params, seeds))
    md = render_summary(eval_json, params, index=opt(index), plot_files=plot_files, gallery_files=gallery_files,
                        report_md=report_md, notes=notes + g_notes, seeds=seeds)
    atomic_write_text(report_md, md)
    return ReportResult(out_metrics, out_headline, report_md, tuple(plot_files + gallery_files), tuple(notes + g_notes))


def _remove_stale(plots_dir: Path, written: list[Path]) -> None:
    """Delete this stage's own figure/CSV names that the current run did not produce."""
    keep = {p.resolve() for p in written}
    for p in plots_dir.iterdir():
        owned = p.stem in _OWNED_PLOT_FILES or p.stem.startswith("gallery_")
        if owned and p.suffix in (".png", ".csv") and p.resolve() not in keep:
            p.unlink()


__all__ = [
    "HQ_MEAN", "GalleryInputs", "ReportError", "ReportResult", "alpha_trend", "build_eval_json", "build_report",
    "collect_results", "comparability", "gallery_rows", "headline_metrics", "hq_mean", "read_method_json",
    "render_summary", "select_gallery_views", "write_plots",
]
