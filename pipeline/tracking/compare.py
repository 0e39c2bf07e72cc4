"""Compare headline metrics across MLflow runs: a markdown table, a PNG bar chart and a JSON dump.

Two modes: ``runs`` (the newest pipeline parent runs of the experiment) and ``aliases`` (the registered
model's ``champion`` vs ``challenger``, i.e. the runs that produced those versions). Metrics are dotted
paths into ``metrics/eval.json`` (``tracking.headline_metrics`` by default); a run without one shows "—".

The differences that decide promotion are ~1 mIoU, so the chart draws one panel per metric with its own
zoomed axis (not from 0), each run's change against a reference run (the champion; in ``runs`` mode the
oldest run shown), the promotion metric marked with its threshold (reference + ``tracking.promote_margin``),
and runs labelled with the params that differ between them.

    python -m stages.compare --params params.yaml --out reports/compare [--mode aliases] [--last 5]
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

from pipeline.common.atomic import atomic_path, atomic_write_json, atomic_write_text
from pipeline.config import Params

Mode = Literal["runs", "aliases"]


@dataclass
class Row:
    label: str
    run_id: str
    values: dict[str, Optional[float]] = field(default_factory=dict)
    info: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class Comparison:
    metrics: list[str]
    rows: list[Row]
    title: str
    reference: int = 0  # index of the row the deltas are taken against
    promote_metric: str = ""
    promote_margin: float = 0.0
    differing: list[str] = field(default_factory=list)  # param keys whose values differ between the rows


def differing_params(rows: Sequence[Row]) -> list[str]:
    """Param keys (sorted) whose value is not the same in every row (a key missing from a row counts)."""
    keys = sorted({k for r in rows for k in r.params})
    return [k for k in keys if len({r.params.get(k) for r in rows}) > 1]


def params_label(row: Row, keys: Sequence[str], limit: int = 3) -> str:
    """``lr=0.0003, steps=400`` for the first ``limit`` differing keys (last dotted part), ``+n`` for the rest."""
    parts = [f"{k.rsplit('.', 1)[-1]}={row.params.get(k, '—')}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"+{len(keys) - limit}")
    return ", ".join(parts)


def delta(comp: Comparison, row: Row, metric: str) -> Optional[float]:
    """``row``'s value minus the reference row's (None when either is missing)."""
    if not comp.rows:
        return None
    ref, value = comp.rows[comp.reference].values.get(metric), row.values.get(metric)
    if ref is None or value is None or not (math.isfinite(ref) and math.isfinite(value)):
        return None
    return value - ref


def gather(tracker, metrics: Sequence[str], *, mode: Mode = "runs", last: int = 5,
           registered_model: str = "", promote_metric: str = "", promote_margin: float = 0.0) -> Comparison:
    """Rows of headline ``metrics`` from ``tracker`` (a :class:`pipeline.tracking.mlflow_adapter.Tracker`);
    ``promote_metric`` (a dotted metric) is marked in the chart with its threshold ``promote_margin``."""
    metrics = list(metrics)
    rows: list[Row] = []
    if mode == "runs":
        runs = tracker.search_runs("tags.`stable_sam.kind` = 'pipeline' and attributes.status = 'FINISHED'",
                                   max_results=last)
        for run in runs:
            tags = run.tags or {}
            rows.append(Row(run.name, run.run_id, {m: (run.metrics or {}).get(m) for m in metrics},
                            {"commit": tags.get("git.commit", "")[:8], "exp": tags.get("dvc.exp_name", ""),
                             "version": tags.get("registered.version", "")}, dict(run.params or {})))
        title = f"last {len(rows)} pipeline runs of experiment {tracker.experiment_name!r}"
        reference = len(rows) - 1  # newest first: changes are shown against the oldest run shown
    elif mode == "aliases":
        for alias in ("champion", "challenger"):
            version = tracker.version_by_alias(registered_model, alias)
            if version is None or not version.run_id:
                continue
            run = tracker.get_run(version.run_id)
            rows.append(Row(f"{alias} (v{version.version})", run.run_id,
                            {m: (run.metrics or {}).get(m) for m in metrics},
                            {"commit": version.tags.get("git.commit", "")[:8], "version": version.version},
                            _parent_params(tracker, run)))
        title = f"{registered_model!r}: champion vs challenger"
        reference = 0  # the champion
    else:
        raise ValueError(f"mode must be 'runs' or 'aliases', got {mode!r}")
    return Comparison(metrics, rows, title, max(reference, 0), promote_metric, promote_margin, differing_params(rows))


def _parent_params(tracker, run) -> dict[str, str]:
    """The pipeline params of a model version's run (logged on its parent pipeline run)."""
    parent = (run.tags or {}).get("mlflow.parentRunId")
    return dict(run.params or {}) if not parent else dict(tracker.get_run(parent).params or {})


def _fmt(value: Optional[float]) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4g}"


def to_markdown(comp: Comparison) -> str:
    """A GitHub-markdown table: one row per run, one column per metric."""
    if not comp.rows:
        return f"# {comp.title}\n\nNo runs to compare.\n"
    header = ["run", "run id", "commit", "params that differ"] + [
        f"**{m}** (promotion)" if m == comp.promote_metric else m for m in comp.metrics]
    lines = [f"# {comp.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(comp.rows):
        values = []
        for m in comp.metrics:
            d = delta(comp, row, m)
            shown = _fmt(row.values.get(m))
            values.append(shown if i == comp.reference or d is None else f"{shown} ({d:+.2f})")
        cells = [row.label + (" (reference)" if i == comp.reference and len(comp.rows) > 1 else ""),
                 row.run_id[:8], row.info.get("commit", ""), params_label(row, comp.differing) or "—"] + values
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def zoomed_limits(lo: float, hi: float) -> tuple[float, float]:
    """y-limits around ``[lo, hi]`` with a margin of 35 % of the spread (at least 0.5): ~1-point differences
    fill the panel instead of vanishing on an axis that starts at 0."""
    pad = max(0.5, 0.35 * (hi - lo))
    return lo - pad, hi + pad


def delta_chart(comp: Comparison, path: Path) -> None:
    """One panel per metric (own zoomed axis), a dot per run labelled with its value and its change against
    the reference run (grey line); the promotion metric's panel is marked and shows its threshold. PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix, labels = _split_common(comp.metrics)
    n = max(len(comp.metrics), 1)
    cols = min(n, 3)
    rows_n = math.ceil(n / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.4 * rows_n + 0.8), squeeze=False)
    names = [r.label + (f"\n{params_label(r, comp.differing)}" if comp.differing else "") for r in comp.rows]
    colors = [f"C{i}" for i in range(len(comp.rows))]
    for k, ax in enumerate(axes.flat):
        if k >= len(comp.metrics):
            ax.axis("off")
            continue
        metric = comp.metrics[k]
        ys = [r.values.get(metric) for r in comp.rows]
        good = [y for y in ys if y is not None and math.isfinite(y)]
        xs = list(range(len(comp.rows)))
        ref = comp.rows[comp.reference].values.get(metric) if comp.rows else None
        if ref is not None and math.isfinite(ref):  # dots on a zoomed axis (bars would need a 0 baseline)
            ax.axhline(ref, color="0.6", lw=0.8)
        for i, (row, y) in enumerate(zip(comp.rows, ys)):
            if y is None or not math.isfinite(y):
                ax.annotate("n/a", (i, ref if ref is not None and math.isfinite(ref) else 0.0), ha="center", fontsize=7)
                continue
            d = delta(comp, row, metric)
            ax.plot([i], [y], "o", color=colors[i], ms=9)
            text = _fmt(y) if i == comp.reference or d is None else f"{_fmt(y)} ({d:+.2f})"
            ax.annotate(text, (i, y), textcoords="offset points", xytext=(0, 8), ha="center", fontsize=7)
        ax.set_xlim(-0.6, len(comp.rows) - 0.4)
        promoted = metric == comp.promote_metric
        if good:
            lo, hi = min(good), max(good)
            if promoted and ref is not None and math.isfinite(ref):
                hi = max(hi, ref + comp.promote_margin)
                ax.axhline(ref + comp.promote_margin, color="crimson", ls="--", lw=1,
                           label=f"promote if ≥ {ref + comp.promote_margin:.4g}")
                ax.legend(fontsize=6, loc="lower right")
            ax.set_ylim(*zoomed_limits(lo, hi))
        ax.set_xticks(xs)
        ax.set_xticklabels(names, fontsize=6)
        ax.set_title(("★ promotion metric\n" if promoted else "") + labels[k].replace("\n", "."), fontsize=8,
                     color="crimson" if promoted else "black", fontweight="bold" if promoted else "normal")
        if promoted:
            for side in ax.spines.values():
                side.set_edgecolor("crimson")
    fig.suptitle(comp.title + (f" — {prefix}" if prefix else "") +
                 ("\nchanges vs " + comp.rows[comp.reference].label if len(comp.rows) > 1 else ""), fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def _split_common(metrics: Sequence[str]) -> tuple[str, list[str]]:
    """Common leading dotted parts (shown once) and the remaining per-metric labels, one part per line."""
    parts = [m.split(".") for m in metrics]
    n = 0
    while parts and all(len(p) > n + 1 and p[n] == parts[0][n] for p in parts):
        n += 1
    return ".".join(parts[0][:n]) if parts else "", ["\n".join(p[n:]) for p in parts]


def write(comp: Comparison, out_dir: Path) -> dict[str, Path]:
    """``compare.md``, ``compare.png`` and ``compare.json`` in ``out_dir``."""
    out_dir = Path(out_dir)
    paths = {"markdown": out_dir / "compare.md", "png": out_dir / "compare.png", "json": out_dir / "compare.json"}
    atomic_write_text(paths["markdown"], to_markdown(comp))
    delta_chart(comp, paths["png"])
    atomic_write_json(paths["json"], asdict(comp))
    return paths


def run_compare(params: Params, params_dir: Path, out: Path, *, experiment: str | None = None, mode: Mode = "runs",
                last: int = 5, metrics: Sequence[str] | None = None) -> dict[str, Path]:
    """The ``compare`` command: gather runs from ``params.tracking``'s store, write ``out``, print the table.

    ``params_dir`` is the folder of the params file (a relative tracking URI is resolved against it).
    """
    from pipeline.tracking.mlflow_adapter import Tracker, resolve_tracking_uri  # noqa: PLC0415 (mlflow is slow)

    cfg = params.tracking
    tracker = Tracker(resolve_tracking_uri(cfg.tracking_uri, Path(params_dir)), experiment or cfg.experiment)
    comp = gather(tracker, list(metrics or cfg.headline_metrics), mode=mode, last=last,
                  registered_model=cfg.registered_model, promote_metric=cfg.promote_metric,
                  promote_margin=cfg.promote_margin)
    paths = write(comp, Path(out))
    print(to_markdown(comp))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


__all__ = ["Comparison", "Row", "delta_chart", "delta", "differing_params", "gather", "params_label", "run_compare",
           "to_markdown", "write", "zoomed_limits"]
