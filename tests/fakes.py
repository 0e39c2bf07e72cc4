"""Small fakes shared by the tests: a tiny random SAM saved as a base folder, a trained-looking plugin file."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.common.hashing import sha256_file
from pipeline.modeling.backbones import build_tiny, freeze
from pipeline.modeling.methods import build_method
from pipeline.modeling.plugin_file import save_plugin_file


def write_tiny_base(folder: Path, *, img: int = 64, grid: int = 16, seed: int = 0):
    """A random tiny SAM saved as the ``base`` stage writes it (``sam.pt`` + ``base.json``); returns (sam, sha256)."""
    torch.manual_seed(seed)
    sam = freeze(build_tiny(img, grid))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), folder / "sam.pt")
    sha = sha256_file(folder / "sam.pt")
    (folder / "base.json").write_text(json.dumps({"variant": "tiny", "checkpoint_sha256": sha, "img_size": img,
                                                  "grid": grid, "channels": 256}))
    return sam, sha


def write_trained_plugin(path: Path, method: str, sam, plugin_cfg, base_sha256: str, *, scale: float = 0.1,
                         seed: int = 1, params_dict: dict | None = None):
    """A plugin file whose weights moved away from the (identity) init, as training leaves them; returns the model."""
    model = build_method(method, sam, plugin_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    config = dict(params_dict or {})
    config.setdefault("plugin", {k: getattr(plugin_cfg, k) for k in plugin_cfg.__dataclass_fields__})
    save_plugin_file(Path(path), method=method, state_dict=model.plugin_state_dict(), config=config,
                     base_sha256=base_sha256)
    return model.eval()
