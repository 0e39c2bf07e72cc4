"""``reports/summary.md``: profile, tables, the paper's numbers beside ours, deltas and recovery ratios,
seed spread, the alpha1 trend and the validation counts of user datasets.
"""
from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow.parquet as pq

from pipeline.config import Params
from pipeline.evaluation import paper_numbers as paper
from pipeline.evaluation.aggregate import (
    HQ_MEAN,
    COCO_PREFIX,
    POINT_COUNTS,
    COCO_METRICS,
    ReportError,
    delta,
    prompt_order,
    method_order,
    n_sets,
    points_series,
)

log = logging.getLogger(__name__)

METRIC_LABELS = {"miou": "mIoU", "mbiou": "mBIoU", "st": "ST (ours)", "alpha1": "α1",
                 "map": "mAP", "map50": "mAP50", "n": "n"}
def _paperdelta(ours: str, base: str, prompt: str) -> float | None:
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
    methods = [m for m in method_order(params, block) if any(metric in v for v in block[m].values())]
    prompts = prompt_order(params, {p for m in methods for p, v in block[m].items() if metric in v})
    rows = [[m] + [_fmt(block[m].get(p, {}).get(metric), nd) for p in prompts] for m in methods]
    return _table(["method"] + prompts, rows) if rows else []


def _cells_table(block: Mapping[str, Any], params: Params, metrics: tuple[str, ...]) -> list[str]:
    methods = method_order(params, block)
    prompts = prompt_order(params, {p for m in methods for p in block[m]})
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
    drp = [m for m in method_order(params, mean) if any("alpha1" in v for v in mean[m].values())]
    counts = [n for n in POINT_COUNTS.values() if n in paper.ALPHA1_TABLE6]
    rows = [[f"{m} (ours)"] + [_fmt(ours(m, f"point_{n}", "alpha1"), 3) for n in counts] for m in drp]
    rows.append(["Stable-SAM (paper)"] + [_fmt(paper.ALPHA1_TABLE6[n], 3) for n in counts])
    out += ["**α1 vs points, supplement Table 6**:", ""] + _table(["method"] + [f"{n} pt" for n in counts], rows)
    return out + [""]


def recovery_table(mean: Mapping[str, Any], params: Params) -> list[str]:
    """Markdown: the recovery ratio R_P of every method beside the paper's (Stable-SAM, ViT-L)."""
    base = params.report.baseline
    methods = [m for m in method_order(params, mean) if m != base
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
    datasets: Sequence[Mapping[str, Any]] | None = None,
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
        L.append("> Same data and backbone as the paper's main results; our [assume] choices "
                 "(docs/METHOD.md §7) still differ.")
    L += ["", "> **ST is our definition** (mean pairwise mask IoU of the K draws of a prompt type × 100, "
          "docs/METHOD.md §5); the paper's formula is unpublished, so its ST numbers are shown for reference only.", ""]
    if mean:
        sets = n_sets(mean)
        L += [f"## Mean over the HQ sets ({sets} present)", ""]
        deltas = ", ".join(f"{p} {_signed(delta(mean, ours, base, p))}" for p in ("noisy_box", "point_1", "gt_box"))
        pdel = ", ".join(f"{p} {_signed(_paperdelta(ours, base, p))}" for p in ("noisy_box", "point_1", "gt_box"))
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
    L += user_dataset_lines(datasets or [])
    if notes:
        L += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(L)


def read_user_indexes(params: Params, eval_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The ``<eval_dir>/<name>/index.json`` of every evaluate.coco / evaluate.folders entry (validation counts);
    a missing or unreadable one becomes a note."""
    docs: list[dict[str, Any]] = []
    notes: list[str] = []
    for entry in (*params.evaluate.coco, *params.evaluate.folders):
        path = Path(eval_dir) / str(entry["name"]) / "index.json"
        try:
            docs.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError) as exc:
            notes.append(f"no validation counts for {entry['name']}: cannot read {path} ({type(exc).__name__}); "
                         "run its index_coco / index_folder stage")
    return docs, notes


def user_dataset_lines(docs: Sequence[Mapping[str, Any]], examples: int = 5) -> list[str]:
    """Markdown: per user dataset, valid / quarantined counts by reason and the first quarantined files."""
    if not docs:
        return []
    rows = [[str(d.get("dataset")), str(d.get("format")), str(d.get("valid")), str(d.get("quarantined")),
             ", ".join(f"{n} {k}" for k, n in d.get("reasons", {}).items()) or "-"] for d in docs]
    L = ["## Your datasets: validation", "",
         "Checked like the HQ sets by the index stage (decode, sizes, empty masks); only valid ones are scored. "
         "Full lists: `metrics/eval/<dataset>/index.json`, `data/eval_index/<dataset>/quarantine.parquet`.", ""]
    L += _table(["dataset", "format", "valid", "quarantined", "reasons"], rows) + [""]
    for d in docs:
        for q in list(d.get("quarantine", []))[:examples]:
            L.append(f"- {d.get('dataset')}: `{q.get('path')}`: {q.get('reason')}")
    return L + [""]


__all__ = [
    "METRIC_LABELS", "alpha_trend", "comparability", "read_seeds", "read_user_indexes", "recovery_table",
    "render_summary", "seeds_lines", "user_dataset_lines"
]
