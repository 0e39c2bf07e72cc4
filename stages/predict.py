"""Segment your own images with a trained method (not a DVC stage: the command users run).

One image, one prompt (pixel coordinates of the image, x then y):

    python -m stages.predict --image photo.jpg --box 40 60 220 300 --out mask.png --overlay overlay.png
    python -m stages.predict --image photo.jpg --point 120 80 --point 140 200 --negative 30 30 --out mask.png

A folder and a prompts file (JSON or CSV, see pipeline/inference/requests.py), one mask (+ overlay) each:

    python -m stages.predict --images photos/ --prompts prompts.json --out-dir masks/ [--overlays]

``--method`` (default stable_sam) picks the registry method, ``--plugin`` its weights (default
``models/plugins/<method>.pt``), ``--base`` the frozen SAM (default ``models/base``, as the pipeline left it).
Errors (unreadable image, prompt outside the image, missing or mismatched plugin) print one line and exit 2.
The work is done by :func:`pipeline.inference.segment.run_predict`.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pipeline.common.cli import run_stage
from pipeline.inference.segment import run_predict


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


def main(argv: list[str] | None = None) -> int:
    ap = _parser()
    args = ap.parse_args(argv)
    if args.image is not None:
        if args.prompts is not None or args.images is not None:
            ap.error("use either --image (one image) or --images with --prompts (batch), not both")
        if args.out is None and args.overlay is None:
            ap.error("--image needs --out and/or --overlay")
    elif args.prompts is None or args.images is None or args.out_dir is None:
        ap.error("give --image with a prompt, or --images, --prompts and --out-dir")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_stage("predict", lambda: run_predict(
        method=args.method, plugin=args.plugin, base=args.base, device=args.device, image=args.image, box=args.box,
        points=args.point, negatives=args.negative, out=args.out, overlay=args.overlay, images=args.images,
        prompts=args.prompts, out_dir=args.out_dir, overlays=args.overlays))


if __name__ == "__main__":
    sys.exit(main())
