"""What a user asks the predictor for: one image and one prompt, from the command line or a prompts file.

A prompts file (batch mode of ``python -m stages.predict``) lists one request per entry:

- JSON: ``[{"image": "a.jpg", "box": [x0, y0, x1, y1], "points": [[x, y], ...], "negatives": [[x, y]],
  "name": "a_box"}, ...]`` (every key but ``image`` optional; at least a box or a point);
- CSV with a header: ``image,box,points,negatives,name`` where ``box`` is ``"x0 y0 x1 y1"`` and the point
  columns are ``"x y; x y"`` (empty cells allowed).

Coordinates are pixels of the original image. :func:`check_inside` refuses prompts outside the image.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pipeline.inference.prompts import Prompt


class RequestError(ValueError):
    """A prompt or prompts file that cannot be used; the message names the entry and the fix."""


@dataclass(frozen=True)
class Request:
    """One image path + one prompt (+ the output name stem)."""

    image: Path
    prompt: Prompt
    name: str


def make_prompt(box: Sequence[float] | None, points: Sequence[Sequence[float]] = (),
                negatives: Sequence[Sequence[float]] = ()) -> Prompt:
    """A box and/or positive and negative points -> :class:`Prompt` (labels 1 then 0)."""
    pts = [list(p) for p in points] + [list(p) for p in negatives]
    if box is None and not pts:
        raise RequestError("give a box or at least one point")
    if any(len(p) != 2 for p in pts):
        raise RequestError(f"every point needs 2 numbers (x y), got {pts}")
    labels = [1] * len(points) + [0] * len(negatives)
    return Prompt(box=None if box is None else np.asarray(box, np.float32),
                  points=np.asarray(pts, np.float32).reshape(-1, 2) if pts else None,
                  point_labels=np.asarray(labels, np.int64) if pts else None)


def check_inside(prompt: Prompt, hw: tuple[int, int], where: str) -> None:
    """Refuse a box or point outside a ``hw`` image (a typo in x/y order is the usual cause)."""
    h, w = hw
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box.tolist()
        if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
            raise RequestError(f"{where}: box {[x0, y0, x1, y1]} is not inside the {w}x{h} image "
                               "(need 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height; coordinates are x y)")
    if prompt.points is not None:
        for x, y in prompt.points.tolist():
            if not (0 <= x < w and 0 <= y < h):
                raise RequestError(f"{where}: point ({x}, {y}) is outside the {w}x{h} image (coordinates are x y)")


def _numbers(text: str, where: str) -> list[float]:
    try:
        return [float(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise RequestError(f"{where}: {text!r} is not a list of numbers") from None


def _points(text: str, where: str) -> list[list[float]]:
    return [_numbers(part, where) for part in text.split(";") if part.strip()]


def _from_entry(entry: dict[str, Any], folder: Path, where: str, index: int) -> Request:
    if not isinstance(entry, dict) or "image" not in entry:
        raise RequestError(f"{where}: every entry needs an 'image' key, got {entry!r}")
    unknown = set(entry) - {"image", "box", "points", "negatives", "name"}
    if unknown:
        raise RequestError(f"{where}: unknown keys {sorted(unknown)} (allowed: image, box, points, negatives, name)")
    try:
        prompt = make_prompt(entry.get("box"), entry.get("points") or (), entry.get("negatives") or ())
    except (RequestError, ValueError, TypeError) as exc:
        raise RequestError(f"{where}: {exc}") from None
    image = folder / str(entry["image"])
    name = str(entry.get("name") or f"{Path(str(entry['image'])).stem}_{index:03d}")
    return Request(image, prompt, name)


def read_requests(path: Path, images: Path) -> list[Request]:
    """Parse a JSON or CSV prompts file; images are looked up under ``images``."""
    path = Path(path)
    if not path.is_file():
        raise RequestError(f"{path}: prompts file not found")
    text = path.read_text(encoding="utf-8")
    entries: list[dict[str, Any]] = []
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RequestError(f"{path}: not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise RequestError(f"{path}: expected a JSON list of requests")
        entries = data
    elif path.suffix.lower() == ".csv":
        for i, row in enumerate(csv.DictReader(text.splitlines())):
            where = f"{path}:{i + 2}"
            if not row.get("image"):
                raise RequestError(f"{where}: the 'image' column is empty (header: image,box,points,negatives,name)")
            entry: dict[str, Any] = {"image": row["image"]}
            if (row.get("box") or "").strip():
                entry["box"] = _numbers(row["box"], where)
            for key in ("points", "negatives"):
                if (row.get(key) or "").strip():
                    entry[key] = _points(row[key], where)
            if (row.get("name") or "").strip():
                entry["name"] = row["name"].strip()
            entries.append(entry)
    else:
        raise RequestError(f"{path}: a prompts file must be .json or .csv")
    if not entries:
        raise RequestError(f"{path}: no requests in the file")
    requests = [_from_entry(e, Path(images), f"{path} entry {i}", i) for i, e in enumerate(entries)]
    names = [r.name for r in requests]
    if len(set(names)) != len(names):
        raise RequestError(f"{path}: output names repeat ({sorted({n for n in names if names.count(n) > 1})[:3]}); "
                           "give each entry a unique 'name'")
    return requests


__all__ = ["Request", "RequestError", "check_inside", "make_prompt", "read_requests"]
