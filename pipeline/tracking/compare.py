"""Compare headline metrics across MLflow runs: a markdown table, a PNG bar chart and a JSON dump.

Two modes: ``runs`` (the newest pipeline parent runs of the experiment) and ``aliases`` (the registered
model's ``champion`` vs ``challenger``, i.e. the runs that produced those versions). Metrics are dotted
paths into ``metrics/eval.json`` (``tracking.headline_metrics`` by default); a run without one shows "—".

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


@dataclass
class Comparison:
    metrics: list[str]
    rows: list[Row]
    title: str


def gather(tracker, metrics: Sequence[str], *, mode: Mode = "runs", last: int = 5,
           registered_model: str = "") -> Comparison:
    """Rows of headline ``metrics`` from ``tracker`` (a :class:`pipeline.tracking.mlflow_adapter.Tracker`)."""
    metrics = list(metrics)
    rows: list[Row] = []
    if mode == "runs":
        runs = tracker.search_runs("tags.`stable_sam.kind` = 'pipeline' and attributes.status = 'FINISHED'",
                                   max_results=last)
        for run in runs:
            tags = run.tags or {}
            rows.append(Row(run.name, run.run_id, {m: (run.metrics or {}).get(m) for m in metrics},
                            {"commit": tags.get("git.commit", "")[:8], "exp": tags.get("dvc.exp_name", ""),
                             "version": tags.get("registered.version", "")}))
        title = f"last {len(rows)} pipeline runs of experiment {tracker.experiment_name!r}"
    elif mode == "aliases":
        for alias in ("champion", "challenger"):
            version = tracker.version_by_alias(registered_model, alias)
            if version is None or not version.run_id:
                continue
            run = tracker.get_run(version.run_id)
            rows.append(Row(f"{alias} (v{version.version})", run.run_id,
                            {m: (run.metrics or {}).get(m) for m in metrics},
                            {"commit": version.tags.get("git.commit", "")[:8], "version": version.version}))
        title = f"{registered_model!r}: champion vs challenger"
    else:
        raise ValueError(f"mode must be 'runs' or 'aliases', got {mode!r}")
    return Comparison(metrics, rows, title)


def _fmt(value: Optional[float]) -> str:
    return "—" if value is None or not math.isfinite(value) else f"{value:.4g}"


def to_markdown(comp: Comparison) -> str:
    """A GitHub-markdown table: one row per run, one column per metric."""
    if not comp.rows:
        return f"# {comp.title}\n\nNo runs to compare.\n"
    header = ["run", "run id", "commit"] + comp.metrics
    lines = [f"# {comp.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in comp.rows:
        cells = [row.label, row.run_id[:8], row.info.get("commit", "")] + [_fmt(row.values.get(m)) for m in comp.metrics]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(comp: Comparison, path: Path) -> None:
    """Grouped bars (groups = metrics, one bar per run) written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix, labels = _split_common(comp.metrics)
    n_runs, n_metrics = max(len(comp.rows), 1), max(len(comp.metrics), 1)
    width = 0.8 / n_runs
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * n_metrics * max(1.0, n_runs / 2)), 4.5))
    for i, row in enumerate(comp.rows):
        xs = [j + (i - (n_runs - 1) / 2) * width for j in range(len(comp.metrics))]
        ys = [row.values.get(m) for m in comp.metrics]
        ok = [y is not None and math.isfinite(y) for y in ys]
        bars = ax.bar(xs, [y if good else 0.0 for y, good in zip(ys, ok)], width=width, label=row.label)
        ax.bar_label(bars, labels=[_fmt(y) if good else "n/a" for y, good in zip(ys, ok)], fontsize=6)
    ax.set_xticks(range(len(comp.metrics)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_title(comp.title + (f"\n{prefix}" if prefix else ""), fontsize=9)
    if comp.rows:
        ax.legend(fontsize=7)
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
    bar_chart(comp, paths["png"])
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
                  registered_model=cfg.registered_model)
    paths = write(comp, Path(out))
    print(to_markdown(comp))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


__all__ = ["Comparison", "Row", "bar_chart", "gather", "run_compare", "to_markdown", "write"]
