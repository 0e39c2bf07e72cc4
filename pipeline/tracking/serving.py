"""The form in which a trained method is logged as an MLflow model (no MLflow here).

``BoxPromptModel`` wraps a :class:`pipeline.modeling.methods.PromptableDecoder` (frozen SAM prompt
encoder + mask decoder + the method's plugin) behind a tensors-only forward, which ``torch.export``
(MLflow's ``pt2`` format) and MLflow's PyTorch flavour both accept:

    image_embeddings (B, C, g, g) float32, boxes (B, 4) float32 XYXY in the model-input frame
    -> low_res_logits (B, 1, 4g, 4g)   (single-mask output; upsample with pipeline.modeling.transforms)

    python -c "from pipeline.tracking.serving import build_serving_model; \\
m, ex = build_serving_model('stable_sam', 'models/base', 'models/plugins/stable_sam.pt'); print(m(*ex).shape)"
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn


class BoxPromptModel(nn.Module):
    """(image_embeddings ``(B, C, g, g)``, boxes ``(B, 4)``) -> low_res_logits ``(B, 1, 4g, 4g)``."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, image_embeddings: Tensor, boxes: Tensor) -> Tensor:
        from pipeline.modeling.methods import PromptBatch

        out = self.decoder(image_embeddings, PromptBatch(boxes=boxes), multimask_output=False)
        return out.low_res_logits


def example_inputs(channels: int, grid: int, img_size: int, batch: int = 2) -> tuple[Tensor, Tensor]:
    """A deterministic input example (batch > 1 so that torch.export keeps the batch dimension dynamic)."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(batch, channels, grid, grid, generator=gen)
    corners = torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.3, 0.2, 0.9, 0.8]])
    boxes = corners[torch.arange(batch) % 2] * float(img_size)
    return emb, boxes


def load_plugin_checkpoint(path: Path, method: str) -> dict[str, Tensor]:
    """The ``state_dict`` of ``models/plugins/<method>.pt`` ({"method", "state_dict"}), checked for the method."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no trained weights for {method!r}; run `dvc repro train@{method}`")
    ckpt: Any = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ValueError(f"{path}: expected a dict with 'method' and 'state_dict' (written by stages.train)")
    if ckpt.get("method", method) != method:
        raise ValueError(f"{path}: holds method {ckpt.get('method')!r}, not {method!r}")
    return ckpt["state_dict"]


def build_serving_model(method: str, base_dir: str | Path, plugin_path: str | Path | None,
                        plugin_cfg: Any = None) -> tuple[BoxPromptModel, tuple[Tensor, Tensor]]:
    """Frozen base SAM + trained plugin of ``method`` as a :class:`BoxPromptModel` (eval mode) + input example.

    ``plugin_path`` may be None only for methods without trained weights (``sam``).
    """
    from pipeline.config import load_params
    from pipeline.modeling.backbones import load_base
    from pipeline.modeling.methods import build_method

    sam, info = load_base(Path(base_dir))
    if plugin_cfg is None:
        plugin_cfg = load_params().plugin
    decoder = build_method(method, sam, plugin_cfg)
    if plugin_path is not None:
        decoder.load_plugin_state_dict(load_plugin_checkpoint(Path(plugin_path), method))
    elif decoder.num_trainable:
        raise ValueError(f"method {method!r} has trained weights: pass its models/plugins/{method}.pt")
    model = BoxPromptModel(decoder).eval()
    grid = int(sam.prompt_encoder.image_embedding_size[0])
    channels = int(sam.prompt_encoder.embed_dim)
    return model, example_inputs(channels, grid, int(info.get("img_size", sam.image_encoder.img_size)))


__all__ = ["BoxPromptModel", "build_serving_model", "example_inputs", "load_plugin_checkpoint"]
