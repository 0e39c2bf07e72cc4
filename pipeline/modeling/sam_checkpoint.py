"""Stage ``base``: fetch, verify and install the frozen SAM the rest of the pipeline builds on.

Official variants (``vit_b``/``vit_l``/``vit_h``) are downloaded from Meta's URL (or ``sam.checkpoint_url``,
e.g. a mirror or a ``file://`` path) into ``sam.cache_dir`` with resume and a progress bar, checked against
the registry's byte size and sha256, loaded with ``torch.load(weights_only=True)`` into the registry's
architecture (strict keys and shapes), then placed at ``<out>/sam.pt`` with ``<out>/base.json``. The
embedded ``tiny`` variant goes through the same verified path from the committed asset.

    python -m stages.base --params params.yaml --out models/base
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from pipeline import PROJECT_ROOT
from pipeline.common.atomic import atomic_path, atomic_write_json
from pipeline.common.http import download_file
from pipeline.config import Params
from pipeline.modeling.backbones import PROMPT_EMBED_DIM, build_sam, get_spec, verify_checkpoint


def _link_or_copy(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def portable_source(url: str) -> str:
    """``url``, or for a ``file://`` URL inside the project (the embedded asset) its project-relative path:
    ``base.json`` must not depend on where the clone lives, or every clone would re-run the stages after it."""
    if url.startswith("file://"):
        path = Path(unquote(url[len("file://"):]))
        if path.is_relative_to(PROJECT_ROOT):
            return path.relative_to(PROJECT_ROOT).as_posix()
    return url


def prepare_base(params: Params, out_dir: Path) -> dict[str, Any]:
    """Install the verified base checkpoint into ``out_dir``; returns the ``base.json`` info."""
    cfg = params.sam
    spec = get_spec(cfg.variant)
    url = cfg.checkpoint_url or spec.url
    sha = cfg.checkpoint_sha256 or spec.sha256
    size = spec.size_bytes if not cfg.checkpoint_url else 0  # a custom URL may serve another build
    name = url.rstrip("/").rsplit("/", 1)[-1] or f"sam_{cfg.variant}.pth"
    if url.startswith("file://") and cfg.variant == "tiny":
        local = Path(url[len("file://"):])
    else:
        local = Path(cfg.cache_dir) / name
        download_file(url, local, expected_sha256=sha or None, expected_size=size or None, desc=name)
    digest = verify_checkpoint(local, sha, size)
    sam = build_sam(cfg.variant, local)  # strict load: official key names and shapes
    img_size = int(sam.image_encoder.img_size)
    grid = int(sam.prompt_encoder.image_embedding_size[0])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _link_or_copy(local, out_dir / "sam.pt")
    info = {
        "variant": cfg.variant, "checkpoint_sha256": digest, "source_url": portable_source(url), "img_size": img_size,
        "grid": grid, "channels": PROMPT_EMBED_DIM,
        "parameters": int(sum(p.numel() for p in sam.parameters())),
    }
    atomic_write_json(out_dir / "base.json", info)
    return info


def run_base(params: Params, out_dir: Path) -> dict[str, Any]:
    """The ``base`` stage: :func:`prepare_base` into ``out_dir``; prints ``base.json``."""
    info = prepare_base(params, Path(out_dir))
    print(json.dumps(info, indent=2))
    return info
