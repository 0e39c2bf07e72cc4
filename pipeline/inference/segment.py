"""Segment users' own images with a trained method: the work behind ``python -m stages.predict``.

One image with one prompt, or a folder with a prompts file (:mod:`pipeline.inference.requests`); each
request gets a mask PNG (255 = object) and optionally an overlay, and a one-line JSON summary on stdout.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.data.images import load_image
from pipeline.inference.overlay import save_mask, save_overlay
from pipeline.inference.predictor import Predictor
from pipeline.inference.requests import Request, check_inside, make_prompt, read_requests

TINY_NOTE = ("note: this is the embedded tiny base (a small SAM trained on generated scenes, for exercising the "
             "pipeline); on real photographs use an official checkpoint: set sam.variant and sam.checkpoint_url "
             "(e.g. file:///path/sam_vit_l_0b3195.pth) and run `dvc repro` (README: Use the trained model)")


def load_predictor(method: str, plugin: Path | None, base: Path, device: str = "auto") -> Predictor:
    """The predictor of ``method``; ``plugin`` defaults to ``models/plugins/<method>.pt`` (``sam`` needs none)."""
    if plugin is None and method != "sam":
        plugin = Path("models/plugins") / f"{method}.pt"
    if plugin is not None and not Path(plugin).is_file() and method != "sam":
        raise FileNotFoundError(f"{plugin}: no plugin file for method {method!r}; run `make pipeline` "
                                f"(or `dvc repro train@{method}`), or pass --plugin")
    return Predictor.from_pretrained(base, method, plugin if plugin and Path(plugin).is_file() else None,
                                     device=device)


def segment(predictor: Predictor, requests: Sequence[Request],
            outputs: Sequence[tuple[Path | None, Path | None]]) -> list[dict[str, object]]:
    """Segment every request, writing its (mask, overlay) paths of ``outputs``; one summary dict per request."""
    results: list[dict[str, object]] = []
    current: Path | None = None
    image = np.zeros((0, 0, 3), np.uint8)
    for req, (mask_path, overlay_path) in zip(requests, outputs):
        if req.image != current:
            if not req.image.is_file():
                raise FileNotFoundError(f"{req.image}: image not found")
            image = load_image(req.image)
            predictor.set_image(image)
            current = req.image
        check_inside(req.prompt, image.shape[:2], str(req.image))
        p = req.prompt
        masks, scores, _ = predictor.predict(point_coords=p.points, point_labels=p.point_labels, box=p.box,
                                             multimask_output=False)
        mask = masks[0]
        if mask_path is not None:
            save_mask(mask, mask_path)
        if overlay_path is not None:
            save_overlay(image, mask, p, overlay_path)
        alpha = None if predictor.last_alpha1 is None else round(float(predictor.last_alpha1[0]), 4)
        results.append({"image": str(req.image), "name": req.name, "mask": str(mask_path) if mask_path else None,
                        "overlay": str(overlay_path) if overlay_path else None, "area": int(mask.sum()),
                        "score": round(float(scores[0]), 4), "alpha1": alpha})
    return results


def run_predict(*, method: str = "stable_sam", plugin: Path | None = None, base: Path = Path("models/base"),
                device: str = "auto", image: Path | None = None, box: Sequence[float] | None = None,
                points: Sequence[Sequence[float]] = (), negatives: Sequence[Sequence[float]] = (),
                out: Path | None = None, overlay: Path | None = None, images: Path | None = None,
                prompts: Path | None = None, out_dir: Path | None = None,
                overlays: bool = False) -> list[dict[str, object]]:
    """The ``predict`` command: ``image`` + one prompt -> ``out``/``overlay``, or ``images`` + a ``prompts``
    file -> ``<out_dir>/<name>.png`` (+ ``<name>_overlay.png`` with ``overlays``). Requests are read and
    checked before the model loads; prints one JSON line per request and returns the summaries."""
    if image is not None:
        requests = [Request(Path(image), make_prompt(box, list(points), list(negatives)), Path(image).stem)]
        outputs = [(out, overlay)]
    else:
        if images is None or prompts is None or out_dir is None:
            raise ValueError("batch mode needs images, prompts and out_dir")
        requests = read_requests(Path(prompts), Path(images))
        outputs = [(Path(out_dir) / f"{r.name}.png", Path(out_dir) / f"{r.name}_overlay.png" if overlays else None)
                   for r in requests]
    predictor = load_predictor(method, plugin, Path(base), device)
    if predictor.info.get("variant") == "tiny":
        print(TINY_NOTE, file=sys.stderr)
    results = segment(predictor, requests, outputs)
    for r in results:
        print(json.dumps(r))
    return results


__all__ = ["TINY_NOTE", "load_predictor", "run_predict", "segment"]
