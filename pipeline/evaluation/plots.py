"""Report figures: line plots, per-dataset bars and the overlay gallery (PNG) plus their CSV data.

Pure drawing: every function takes plain numbers/arrays and writes one file atomically. Matplotlib is
used through its object API on the Agg canvas (no pyplot, no display, no global state), so figures
render offline and from any thread.

    python -c "from pipeline.evaluation.plots import line_plot; \
line_plot({'sam': {1: 40, 3: 70}}, 'x.png', title='t', xlabel='points', ylabel='mIoU')"
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from pipeline.common.atomic import atomic_path, atomic_write_text

GT_COLOR = "#2ca02c"  # green is kept for the ground truth: no method gets it
_PALETTE = ("#1f77b4", "#d62728", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """A fixed colour per method, in the given order (same colours in every figure)."""
    return {m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(methods)}


def save_figure(fig: Figure, path: str | Path, *, dpi: int = 110) -> Path:
    """Render ``fig`` to a PNG at ``path`` atomically."""
    path = Path(path)
    FigureCanvasAgg(fig)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    return path


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> Path:
    """Write a CSV (header + rows; ``None`` -> empty cell; floats rounded to 4 decimals) atomically."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(["" if v is None else round(v, 4) if isinstance(v, float) else v for v in row])
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def line_plot(
    series: Mapping[str, Mapping[float, float]],
    out_png: str | Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    colors: Mapping[str, str] | None = None,
    reference: Mapping[str, Mapping[float, float]] | None = None,
    log_x: bool = True,
) -> Path:
    """One line per series (``{name: {x: y}}``); ``reference`` series are drawn dashed and grey-ish.

    The x axis is logarithmic by default so that 1, 3, 5, 10, 20 points are evenly readable.
    """
    colors = dict(colors or method_colors(list(series)))
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    xs_all: set[float] = set()
    for name, pts in series.items():
        xs = sorted(pts)
        xs_all.update(xs)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=name, color=colors.get(name))
    for name, pts in (reference or {}).items():
        xs = sorted(pts)
        xs_all.update(xs)
        ax.plot(xs, [pts[x] for x in xs], linestyle="--", marker="x", color="#555555", alpha=0.8, label=name)
    if log_x and xs_all and min(xs_all) > 0:
        ax.set_xscale("log")
    if xs_all:
        ax.set_xticks(sorted(xs_all))
        ax.set_xticklabels([f"{x:g}" for x in sorted(xs_all)])
        ax.minorticks_off()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if series or reference:
        ax.legend(fontsize=8)
    return save_figure(fig, out_png)


def grouped_bars(
    values: Mapping[str, Mapping[str, Mapping[str, float]]],
    out_png: str | Path,
    *,
    title: str,
    ylabel: str,
    colors: Mapping[str, str] | None = None,
    ncols: int = 4,
) -> Path:
    """One panel per key of ``values`` (``{panel: {group: {bar: value}}}``): grouped bars, value on top.

    In the report: panel = prompt type, group = dataset, bar = method.
    """
    panels = list(values)
    bars = list(dict.fromkeys(b for p in panels for g in values[p].values() for b in g))
    colors = dict(colors or method_colors(bars))
    ncols = max(1, min(ncols, len(panels)))
    nrows = max(1, -(-len(panels) // ncols))
    fig = Figure(figsize=(4.2 * ncols, 3.4 * nrows))
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        groups = list(values[panel])
        width = 0.8 / max(1, len(bars))
        for j, bar in enumerate(bars):
            xs = [k + (j - (len(bars) - 1) / 2) * width for k in range(len(groups))]
            ys = [values[panel][g].get(bar, np.nan) for g in groups]
            ax.bar(xs, ys, width=width, color=colors.get(bar), label=bar)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(panel)
        ax.set_ylabel(ylabel)
        ax.grid(True, axis="y", alpha=0.3)
    if panels:
        handles, labels = fig.axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper center", ncol=len(bars), bbox_to_anchor=(0.5, 1.02), fontsize=9)
    fig.suptitle(title, y=1.07)
    fig.tight_layout()
    return save_figure(fig, out_png)


# ------------------------------------------------------------------------------------------ gallery
@dataclass(frozen=True)
class GalleryPanel:
    """One picture of the gallery: an image with an optional mask overlay and prompt drawn on it.

    ``image`` uint8 [H, W, 3]; ``mask`` bool [H, W] | None; ``box`` [x0, y0, x1, y1] pixels | None;
    ``points`` float [N, 2] (x, y) | None with ``labels`` int [N] (1 positive, 0 negative, -1 padding).
    """

    title: str
    image: np.ndarray
    mask: np.ndarray | None = None
    color: str = "#1f77b4"
    box: Sequence[float] | None = None
    points: np.ndarray | None = None
    labels: np.ndarray | None = None


@dataclass(frozen=True)
class GalleryRow:
    """One gallery row (one image): a caption and its panels, left to right."""

    caption: str
    panels: list[GalleryPanel] = field(default_factory=list)


def _hex_rgb(color: str) -> np.ndarray:
    color = color.lstrip("#")
    return np.array([int(color[i : i + 2], 16) for i in (0, 2, 4)], dtype=np.float32)


def _boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of ``mask`` within ``width`` px of its outside (bool [H, W])."""
    inner = np.pad(mask, width, constant_values=False)
    eroded = inner.copy()
    for _ in range(width):
        e = eroded[1:-1, 1:-1] & eroded[:-2, 1:-1] & eroded[2:, 1:-1] & eroded[1:-1, :-2] & eroded[1:-1, 2:]
        eroded[1:-1, 1:-1] = e
    return mask & ~eroded[width:-width, width:-width]


def overlay(image: np.ndarray, mask: np.ndarray | None, color: str, *, alpha: float = 0.45) -> np.ndarray:
    """``image`` uint8 [H, W, 3] with ``mask`` tinted in ``color`` and outlined -> uint8 [H, W, 3]."""
    if mask is None:
        return image
    if mask.shape != image.shape[:2]:
        raise ValueError(f"overlay: mask {mask.shape} does not match image {image.shape[:2]}")
    out = image.astype(np.float32)
    rgb = _hex_rgb(color)
    out[mask] = out[mask] * (1 - alpha) + rgb * alpha
    out[_boundary(mask, max(1, round(max(mask.shape) / 200)))] = rgb
    return np.clip(out, 0, 255).astype(np.uint8)


def _fit(panel: GalleryPanel, max_side: int) -> GalleryPanel:
    """Downscale a panel (image, mask, prompt coordinates) so its long side is at most ``max_side``."""
    h, w = panel.image.shape[:2]
    s = min(1.0, max_side / max(h, w))
    if s >= 1.0:
        return panel
    size = (max(1, round(w * s)), max(1, round(h * s)))
    image = np.asarray(Image.fromarray(panel.image).resize(size, Image.Resampling.BILINEAR))
    mask = None
    if panel.mask is not None:
        mask = np.asarray(Image.fromarray(panel.mask.astype(np.uint8) * 255).resize(size, Image.Resampling.NEAREST)) > 127
    box = None if panel.box is None else [float(v) * s for v in panel.box]
    points = None if panel.points is None else np.asarray(panel.points, dtype=np.float64) * s
    return GalleryPanel(panel.title, image, mask, panel.color, box, points, panel.labels)


def gallery(rows: Sequence[GalleryRow], out_png: str | Path, *, title: str, max_side: int = 320) -> Path:
    """A grid of overlay panels, one row per :class:`GalleryRow`; prompts drawn (box / +- points)."""
    if not rows:
        raise ValueError("gallery: no rows to draw")
    ncols = max(len(r.panels) for r in rows)
    fig = Figure(figsize=(3.2 * ncols, 3.1 * len(rows)))
    for i, row in enumerate(rows):
        for j, raw in enumerate(row.panels):
            p = _fit(raw, max_side)
            ax = fig.add_subplot(len(rows), ncols, i * ncols + j + 1)
            ax.imshow(overlay(p.image, p.mask, p.color), interpolation="nearest")
            if p.box is not None:
                x0, y0, x1, y1 = p.box
                ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="#ffd700", linewidth=2))
            if p.points is not None and len(p.points):
                labels = np.ones(len(p.points), int) if p.labels is None else np.asarray(p.labels)
                for lab, marker, color in ((1, "*", "#ffd700"), (0, "X", "#ff2020")):
                    sel = labels == lab
                    if sel.any():
                        ax.scatter(p.points[sel, 0], p.points[sel, 1], marker=marker, s=140, c=color,
                                   edgecolors="black", linewidths=0.8, zorder=3)
            ax.set_title(p.title, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(row.caption, fontsize=8)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return save_figure(fig, out_png, dpi=90)


__all__ = [
    "GT_COLOR", "GalleryPanel", "GalleryRow", "gallery", "grouped_bars", "line_plot", "method_colors",
    "overlay", "save_figure", "write_csv",
]
