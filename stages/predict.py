"""Segment your own images with a trained method (not a DVC stage: the command users run).

One image, one prompt (pixel coordinates of the image, x then y):

    python -m stages.predict --image photo.jpg --box 40 60 220 300 --out mask.png --overlay overlay.png
    python -m stages.predict --image photo.jpg --point 120 80 --point 140 200 --negative 30 30 --out mask.png

A folder and a prompts file (JSON or CSV, see pipeline/inference/requests.py), one mask (+ overlay) each:

    python -m stages.predict --images photos/ --prompts prompts.json --out-dir masks/ [--overlays]

``--method`` (default stable_sam) picks the registry method, ``--plugin`` its weights (default
``models/plugins/<method>.pt``), ``--base`` the frozen SAM (default ``models/base``, as the pipeline left it).
Errors (unreadable image, prompt outside the image, missing or mismatched plugin) print one line and exit 2.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from pipeline.config import ConfigError
from pipeline.data.images import DecodeError, load_image
from pipeline.inference.overlay import save_mask, save_overlay
from pipeline.inference.predictor import Predictor
from pipeline.inference.requests import Request, RequestError, check_inside, make_prompt, read_requests
from pipeline.modeling.plugin_file import PluginFileError

TINY_NOTE = ("note: this is the embedded tiny base (a small SAM trained on generated scenes, for exercising the "
             "pipeline); on real photographs use an official checkpoint: set sam.variant and sam.checkpoint_url "
             "(e.g. file:///path/sam_vit_l_0b3195.pth) and run `dvc repro` (README: Use the trained model)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m stages.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    one = ap.add_argument_group("one image")
    one.add_argument("--image", type=Path, help="an image file (jpg, png, ...)")
    one.add_argument("--box", type=float, nargs=4, metavar=("X0", "Y0", "X1", "Y1"), help="box prompt, pixels")
    one.add_argument("--point", type=float, nargs=2, action="append", default=[], metavar=("X", "Y"),
                     help="a positive point (repeatable)")
    one.add_argument("--negative", type=float, nargs=2, action="append", default=[], metavar=("X", "Y"),
                     help="a negative (background) point (repeatable)")
    one.add_argument("--out", type=Path, help="mask PNG to write (255 = object)")
    one.add_argument("--overlay", type=Path, help="overlay PNG to write (image + prompt + mask)")
    many = ap.add_argument_group("batch")
    many.add_argument("--images", type=Path, help="folder the prompts file's image names refer to")
    many.add_argument("--prompts", type=Path, help="prompts file, .json or .csv")
    many.add_argument("--out-dir", type=Path, help="folder for <name>.png masks (and <name>_overlay.png)")
    many.add_argument("--overlays", action="store_true", help="also write an overlay per request")
    model = ap.add_argument_group("model")
    model.add_argument("--method", default="stable_sam", help="registry method (default stable_sam)")
    model.add_argument("--plugin", type=Path, default=None, help="plugin file (default models/plugins/<method>.pt)")
    model.add_argument("--base", type=Path, default=Path("models/base"), help="base model folder (default models/base)")
    model.add_argument("--device", default="auto", help="auto | cpu | cuda")
    return ap


def _requests(args: argparse.Namespace, ap: argparse.ArgumentParser) -> tuple[list[Request], Path]:
    if args.image is not None:
        if args.prompts is not None or args.images is not None:
            ap.error("use either --image (one image) or --images with --prompts (batch), not both")
        if args.out is None and args.overlay is None:
            ap.error("--image needs --out and/or --overlay")
        return [Request(args.image, make_prompt(args.box, args.point, args.negative), args.image.stem)], Path(".")
    if args.prompts is None or args.images is None or args.out_dir is None:
        ap.error("give --image with a prompt, or --images, --prompts and --out-dir")
    return read_requests(args.prompts, args.images), args.out_dir


def _load(args: argparse.Namespace) -> Predictor:
    plugin = args.plugin
    if plugin is None and args.method != "sam":
        plugin = Path("models/plugins") / f"{args.method}.pt"
    if plugin is not None and not Path(plugin).is_file() and args.method != "sam":
        raise FileNotFoundError(f"{plugin}: no plugin file for method {args.method!r}; run `make pipeline` "
                                f"(or `dvc repro train@{args.method}`), or pass --plugin")
    return Predictor.from_pretrained(args.base, args.method, plugin if plugin and Path(plugin).is_file() else None,
                                     device=args.device)


def run(args: argparse.Namespace, requests: Sequence[Request], out_dir: Path) -> list[dict[str, object]]:
    """Segment every request; returns one summary dict per request."""
    predictor = _load(args)
    if predictor.info.get("variant") == "tiny":
        print(TINY_NOTE, file=sys.stderr)
    results = []
    current: Path | None = None
    image = np.zeros((0, 0, 3), np.uint8)
    for req in requests:
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
        if args.image is not None:
            mask_path, overlay_path = args.out, args.overlay
        else:
            mask_path = out_dir / f"{req.name}.png"
            overlay_path = out_dir / f"{req.name}_overlay.png" if args.overlays else None
        if mask_path is not None:
            save_mask(mask, mask_path)
        if overlay_path is not None:
            save_overlay(image, mask, p, overlay_path)
        alpha = None if predictor.last_alpha1 is None else round(float(predictor.last_alpha1[0]), 4)
        results.append({"image": str(req.image), "name": req.name, "mask": str(mask_path) if mask_path else None,
                        "overlay": str(overlay_path) if overlay_path else None, "area": int(mask.sum()),
                        "score": round(float(scores[0]), 4), "alpha1": alpha})
    return results


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        requests, out_dir = _requests(args, ap)
        results = run(args, requests, out_dir)
    except (RequestError, PluginFileError, ConfigError, DecodeError, FileNotFoundError, ValueError) as exc:
        print(f"predict: error: {exc}", file=sys.stderr)
        return 2
    for r in results:
        print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
