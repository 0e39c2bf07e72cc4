"""The method registry as plain data (no torch): which methods exist and what each one trains.

Read by the config (to validate method names without importing torch) and by
:mod:`pipeline.modeling.methods` (to build them). docs/METHOD.md §2.6.
"""
from __future__ import annotations

METHODS: tuple[str, ...] = (
    "sam", "dsp", "stable_sam", "dt_sam", "pt_sam", "spatial_attention", "stable_sam_ft_decoder",
)
UNSUPPORTED: dict[str, str] = {
    "hq_sam": "HQ-SAM fuses ViT intermediate features, which the embedding cache does not store",
    "lora": "LoRA adapters live in the image encoder's FFNs and cannot run on cached embeddings",
    "adaptformer": "AdaptFormer adapters live in the image encoder's FFNs and cannot run on cached embeddings",
}
PLUGIN_METHODS: tuple[str, ...] = ("dsp", "stable_sam", "spatial_attention", "stable_sam_ft_decoder")
OWN_DECODER: tuple[str, ...] = ("dt_sam", "pt_sam", "stable_sam_ft_decoder")  # a trainable copy of the decoder
DECODER_TRAINABLE: tuple[str, ...] = ("dt_sam", "stable_sam_ft_decoder")  # the whole copy trains (pt_sam: tokens)
ROUTED_METHODS: tuple[str, ...] = ("stable_sam", "spatial_attention", "stable_sam_ft_decoder")  # have DRP (α)
PATCHED_LAYER = 1  # docs/METHOD.md §2.1: the plugins sit in the second two-way block

__all__ = ["DECODER_TRAINABLE", "METHODS", "OWN_DECODER", "PATCHED_LAYER", "PLUGIN_METHODS", "ROUTED_METHODS",
           "UNSUPPORTED"]
