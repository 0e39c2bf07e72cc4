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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from pipeline.common.atomic import atomic_write_json, atomic_write_text
from pipeline.config import Params
from pipeline.evaluation import paper_numbers as paper
from pipeline.evaluation import plots
from pipeline.evaluation.aggregate import (
    HQ_MEAN,
    COCO_PREFIX,
    hq_benchmarks,
    build_eval_json,
    headline_metrics,
    prompt_order,
    method_order,
    n_sets,
    points_series,
)
from pipeline.evaluation.gallery import GalleryInputs, gallery_rows
from pipeline.evaluation.summary_md import read_seeds, render_summary, read_user_indexes

log = logging.getLogger(__name__)

# Files of plots_dir this stage owns; any of them not produced by a run is removed (no stale figures).
_OWNED_PLOT_FILES = ("miou_vs_points", "alpha1_vs_points", "miou_per_dataset")

@dataclass(frozen=True)
class ReportResult:
    """What :func:`build_report` wrote, and the notes (skips, missing inputs) it put in the summary."""

    metrics_path: Path
    headline_path: Path
    report_md: Path
    plots: tuple[Path, ...]
    notes: tuple[str, ...]


def _series_csv(path: Path, series: Mapping[str, Mapping[int, float]], methods: list[str]) -> Path:
    xs = sorted({x for s in series.values() for x in s})
    rows = [[x] + [series[m].get(x) for m in methods] for x in xs]
    return plots.write_csv(path, ["points"] + methods, rows)


def write_plots(eval_json: Mapping[str, Any], params: Params, plots_dir: str | Path) -> list[Path]:
    """mIoU vs points, alpha1 vs points (DRP methods only) and per-dataset bars: PNG + CSV each."""
    plots_dir = Path(plots_dir)
    methods_all = method_order(params, {m for b in eval_json.values() for m in b})
    colors = plots.method_colors(methods_all)
    written: list[Path] = []
    mean = eval_json.get(HQ_MEAN, {})
    miou = points_series(mean, "miou")
    if miou:
        methods = method_order(params, miou)
        written.append(plots.line_plot(
            {m: miou[m] for m in methods}, plots_dir / "miou_vs_points.png", colors=colors,
            title=f"mIoU vs number of positive points (mean of {n_sets(mean)} HQ sets)",
            xlabel="positive points", ylabel="mIoU (%)"))
        written.append(_series_csv(plots_dir / "miou_vs_points.csv", miou, methods))
    alpha = points_series(mean, "alpha1")
    if alpha:
        methods = method_order(params, alpha)
        written.append(plots.line_plot(
            {m: alpha[m] for m in methods}, plots_dir / "alpha1_vs_points.png", colors=colors,
            reference={"paper Table 6 (Stable-SAM, ViT-L, HQSeg-44K)": paper.ALPHA1_TABLE6},
            title="DRP weight α1 of the deformed features vs points", xlabel="positive points",
            ylabel="mean α1"))
        written.append(_series_csv(plots_dir / "alpha1_vs_points.csv", alpha, methods))
    bench = [b for b in eval_json if b != HQ_MEAN and not b.startswith(COCO_PREFIX)]
    if bench:
        groups = bench + ([HQ_MEAN] if HQ_MEAN in eval_json else [])
        prompts = prompt_order(params, {p for b in groups for m in eval_json[b].values() for p in m})
        values = {p: {b: {m: eval_json[b][m][p]["miou"] for m in eval_json[b]
                          if "miou" in eval_json[b][m].get(p, {})} for b in groups} for p in prompts}
        written.append(plots.grouped_bars(values, plots_dir / "miou_per_dataset.png", colors=colors,
                                          title="mIoU per dataset and prompt type", ylabel="mIoU (%)"))
        rows = [[f"{b}/{p}", b, p] + [values[p][b].get(m) for m in methods_all] for p in prompts for b in groups]
        written.append(plots.write_csv(plots_dir / "miou_per_dataset.csv", ["case", "benchmark", "prompt_type"]
                                       + methods_all, rows))
    return written


def write_headline(path: str | Path, eval_json: Mapping[str, Any], params: Params,
                   seeds: Mapping[str, Any] | None = None) -> None:
    """``metrics/headline.json`` in the order :func:`headline_metrics` builds it (not key-sorted): DVC shows
    a metrics file's keys as columns in file order, so the claim leads ``dvc exp show``."""
    atomic_write_text(path, json.dumps(headline_metrics(eval_json, params, seeds), indent=2) + "\n")


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
    write_headline(out_headline, eval_json, params, seeds)
    datasets, d_notes = read_user_indexes(params, eval_dir)
    md = render_summary(eval_json, params, index=opt(index), plot_files=plot_files, gallery_files=gallery_files,
                        report_md=report_md, notes=notes + g_notes + d_notes, seeds=seeds, datasets=datasets)
    atomic_write_text(report_md, md)
    return ReportResult(out_metrics, out_headline, report_md, tuple(plot_files + gallery_files), tuple(notes + g_notes))


def _remove_stale(plots_dir: Path, written: list[Path]) -> None:
    """Delete this stage's own figure/CSV names that the current run did not produce."""
    keep = {p.resolve() for p in written}
    for p in plots_dir.iterdir():
        owned = p.stem in _OWNED_PLOT_FILES or p.stem.startswith("gallery_")
        if owned and p.suffix in (".png", ".csv") and p.resolve() not in keep:
            p.unlink()


def run_report(params: Params, *args: Any, **kwargs: Any) -> ReportResult:
    """The ``report`` stage: :func:`build_report` (same arguments), then one line naming what it wrote."""
    result = build_report(params, *args, **kwargs)
    print(f"wrote {result.metrics_path}, {result.headline_path}, {result.report_md} and {len(result.plots)} plot "
          f"files" + (f" ({len(result.notes)} notes in the summary)" if result.notes else ""))
    return result


__all__ = ["ReportResult", "build_report", "run_report", "write_headline", "write_plots"]
