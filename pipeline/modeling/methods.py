"""Registry of promptable decoders: Stable-SAM, its ablations and the baselines (docs/METHOD.md §2.6).

Every method is a :class:`PromptableDecoder` over a frozen SAM's prompt encoder and mask decoder, run on
cached image embeddings, with the same forward/checkpoint interface for training and evaluation:

| method                  | trainable                                   | α (x' = α1·plugin(x_p) + α2·x_p) |
|-------------------------|---------------------------------------------|-----------------------------------|
| ``sam``                 | nothing                                     | — (vanilla decoder)               |
| ``dsp``                 | DSP                                         | fixed (1, 0)                      |
| ``stable_sam``          | DSP + DRP (~78 K at C = 256)                | DRP                               |
| ``dt_sam``              | the whole mask decoder (own copy)           | —                                 |
| ``pt_sam``              | output tokens: iou_token + mask_tokens (own copy) | —                           |
| ``spatial_attention``   | spatial-attention map + DRP (DSP replaced)  | DRP                               |
| ``stable_sam_ft_decoder`` | DSP + DRP + the mask decoder (own copy)   | DRP                               |

Not supported here, by design: ``hq_sam`` (its HQ output token fuses ViT *intermediate* features, which
the embedding cache does not store) and ``lora`` / ``adaptformer`` (their adapters sit in the image
encoder's FFNs, so they cannot run on cached embeddings; they need an encoder-in-the-loop path).

    python -m pipeline.modeling.methods          # prints every method's trainable-parameter count
"""
from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Mapping, Optional

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam
from torch import Tensor, nn

from pipeline.config import PluginConfig
from pipeline.modeling.decoder import decode_with_alpha
from pipeline.modeling.drp import DynamicRouting
from pipeline.modeling.dsp import DeformableSampling
from pipeline.modeling.patched_transformer import Alpha, PatchedAttentionBlock, PatchedTwoWayTransformer
from pipeline.modeling.spatial_attention import SpatialAttention
from pipeline.modeling.specs import DECODER_TRAINABLE, METHODS, OWN_DECODER, PATCHED_LAYER, PLUGIN_METHODS, UNSUPPORTED

@dataclass
class PromptBatch:
    """One prompt per row, in the model-input frame (after ``to_input_coords``).

    boxes ``(B, 4)`` XYXY; points ``(B, N, 2)`` xy with point_labels ``(B, N)`` in {1 fg, 0 bg, -1 padding};
    mask_inputs ``(B, 1, 4g, 4g)`` logits-like dense mask prompt. A ``-1`` point is SAM's not-a-point token
    (its coordinates are ignored); note that, as in SAM, every token (padding too) takes part in attention.
    """

    boxes: Optional[Tensor] = None
    points: Optional[Tensor] = None
    point_labels: Optional[Tensor] = None
    mask_inputs: Optional[Tensor] = None

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                              for f in fields(self)})

    def select(self, index: Tensor | slice | list[int]) -> "PromptBatch":
        """The rows ``index`` of every present field."""
        return PromptBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                              for f in fields(self)})

    def validate(self, batch: int, grid: tuple[int, int]) -> None:
        """Raise ``ValueError`` naming the field unless the shapes fit ``batch`` rows and a ``grid`` decoder."""
        if (self.points is None) != (self.point_labels is None):
            raise ValueError("PromptBatch: points and point_labels must be given together")
        if self.boxes is not None and tuple(self.boxes.shape) != (batch, 4):
            raise ValueError(f"PromptBatch.boxes must be ({batch}, 4), got {tuple(self.boxes.shape)}")
        if self.points is not None:
            if self.points.dim() != 3 or self.points.shape[0] != batch or self.points.shape[2] != 2:
                raise ValueError(f"PromptBatch.points must be ({batch}, N, 2), got {tuple(self.points.shape)}")
            if tuple(self.point_labels.shape) != tuple(self.points.shape[:2]):
                raise ValueError(f"PromptBatch.point_labels must be {tuple(self.points.shape[:2])}, "
                                 f"got {tuple(self.point_labels.shape)}")
            bad = ~((self.point_labels == -1) | (self.point_labels == 0) | (self.point_labels == 1))
            if bool(bad.any()):
                raise ValueError("PromptBatch.point_labels must be 1 (fg), 0 (bg) or -1 (padding)")
        if self.mask_inputs is not None:
            want = (batch, 1, 4 * grid[0], 4 * grid[1])
            if tuple(self.mask_inputs.shape) != want:
                raise ValueError(f"PromptBatch.mask_inputs must be {want}, got {tuple(self.mask_inputs.shape)}")


@dataclass
class DecoderOutput:
    low_res_logits: Tensor  # (B, M, 4g, 4g), M = 3 (multimask) or 1
    iou_pred: Tensor  # (B, M)
    alpha: Optional[Tensor] = None  # (B, 2) for methods with DRP, else None


class PromptableDecoder(nn.Module):
    """A frozen SAM prompt encoder + (frozen or own) mask decoder, optionally with patched layer 2."""

    def __init__(
        self,
        *,
        name: str,
        prompt_encoder: PromptEncoder,
        mask_decoder: MaskDecoder,
        transformer: Optional[PatchedTwoWayTransformer],
        img_size: int,
        decoder_trainable: bool,
    ) -> None:
        super().__init__()
        self.name = name
        self.img_size = img_size
        self.decoder_trainable = decoder_trainable
        self.prompt_encoder = prompt_encoder  # shared with `sam`, always frozen
        self.mask_decoder = mask_decoder  # shared and frozen, or this method's own copy
        self.transformer = transformer  # patched transformer holding the plugins, or None
        self.has_router = transformer is not None and transformer.layer.router is not None
        self._pe_cache: tuple[tuple, Tensor] | None = None  # (key, dense PE (1, C, g, g)): see dense_pe()

    def dense_pe(self) -> Tensor:
        """SAM's dense positional encoding ``(1, C, g, g)``, computed once per device (it depends only on the
        frozen Gaussian matrix; recomputing it cost a sin/cos over the grid on every call). Recomputed when
        that buffer moves or is overwritten, and kept apart for inference mode (whose tensors autograd refuses).
        """
        gauss = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        key = (gauss.device, gauss.data_ptr(), gauss._version, torch.is_inference_mode_enabled())
        if self._pe_cache is None or self._pe_cache[0] != key:
            with torch.no_grad():
                self._pe_cache = (key, self.prompt_encoder.get_dense_pe())
        return self._pe_cache[1]

    def __getstate__(self) -> dict:
        """Copies and pickles leave the PE cache behind (it may hold an inference-mode tensor)."""
        state = super().__getstate__()
        state["_pe_cache"] = None
        return state

    # ---------------------------------------------------------------------------------------------
    def forward(self, image_embeddings: Tensor, prompts: PromptBatch,
                multimask_output: Optional[bool] = False) -> DecoderOutput:
        """image_embeddings ``(B, C, g, g)`` (one per prompt row; expand one to decode many prompts) ->
        :class:`DecoderOutput` with low_res_logits ``(B, M, 4g, 4g)``, iou_pred ``(B, M)``, alpha ``(B, 2) | None``;
        M = 1 (single mask), 3 (``multimask_output``) or 4 (``None``: every output, SAM-style pre-training)."""
        if image_embeddings.dim() != 4:
            raise ValueError(f"image_embeddings must be (B, C, g, g), got {tuple(image_embeddings.shape)}")
        b = image_embeddings.shape[0]
        grid = tuple(self.prompt_encoder.image_embedding_size)
        if tuple(image_embeddings.shape[-2:]) != grid:
            raise ValueError(f"image_embeddings grid {tuple(image_embeddings.shape[-2:])} does not match the "
                             f"SAM prompt encoder's {grid}: embeddings from another SAM variant?")
        prompts.validate(b, grid)
        points = None if prompts.points is None else (prompts.points, prompts.point_labels)
        sparse, dense = self.prompt_encoder(points=points, boxes=prompts.boxes, masks=prompts.mask_inputs)
        if sparse.shape[0] != b:  # no prompt at all: SAM's encoder returns a batch of 1
            sparse, dense = sparse.expand(b, -1, -1), dense.expand(b, -1, -1, -1)
        image_pe = self.dense_pe()
        image_embeddings = image_embeddings.to(dense.dtype)
        res = decode_with_alpha(self.mask_decoder, image_embeddings, image_pe, sparse, dense, multimask_output,
                                transformer=self.transformer)
        return DecoderOutput(res.low_res_logits, res.iou_pred, res.alpha if self.has_router else None)

    def set_force_alpha(self, alpha: Optional[Alpha]) -> None:
        """Force α = (α1, α2) in the patched layer (``None`` restores the method's own α)."""
        if self.transformer is None:
            raise ValueError(f"method {self.name!r} has no patched layer, so no α to force")
        self.transformer.layer.force_alpha = None if alpha is None else (float(alpha[0]), float(alpha[1]))

    def train(self, mode: bool = True) -> "PromptableDecoder":
        """Train mode for the trainable parts only; frozen SAM modules stay in eval mode."""
        super().train(mode)
        self.prompt_encoder.eval()
        if not self.decoder_trainable:
            self.mask_decoder.eval()
        return self

    # ---------------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        """The optimiser's parameters (each shared tensor once)."""
        return [p for p in self.parameters() if p.requires_grad]

    @property
    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())

    def plugin_state_dict(self) -> "OrderedDict[str, Tensor]":
        """Only the trainable tensors (detached copies), never the frozen SAM weights."""
        return OrderedDict((n, p.detach().clone()) for n, p in self.named_parameters() if p.requires_grad)

    def load_plugin_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Strictly load a :meth:`plugin_state_dict`; a mismatch raises ``ValueError`` saying what differs."""
        own = OrderedDict((n, p) for n, p in self.named_parameters() if p.requires_grad)
        missing = [k for k in own if k not in state_dict]
        unexpected = [k for k in state_dict if k not in own]
        shapes = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(p.shape)}"
                  for k, p in own.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(p.shape)]
        if missing or unexpected or shapes:
            raise ValueError(
                f"plugin checkpoint does not fit method {self.name!r}: missing {missing[:5]} ({len(missing)}), "
                f"unexpected {unexpected[:5]} ({len(unexpected)}), shape mismatches {shapes[:5]}. "
                "Load it with the method and the `plugin` params (and SAM variant) it was trained with."
            )
        with torch.no_grad():
            for k, p in own.items():
                p.copy_(state_dict[k].to(device=p.device, dtype=p.dtype))


# -------------------------------------------------------------------------------------------------
def _plugin_transformer(name: str, decoder: MaskDecoder, plugin: PluginConfig) -> PatchedTwoWayTransformer:
    channels = decoder.transformer_dim
    if name == "spatial_attention":
        sampler: nn.Module = SpatialAttention(channels=channels)
    else:
        sampler = DeformableSampling(channels=channels, offset_range=plugin.dsp_offset_range, zero_mean=plugin.dsp_zero_mean)
    router = None
    if name != "dsp":
        router = DynamicRouting(channels=channels, hidden=plugin.drp_hidden, norm=plugin.drp_norm,
                                init_alpha1=plugin.drp_init_alpha1)
    block = PatchedAttentionBlock(
        decoder.transformer.layers[PATCHED_LAYER],
        sampler=sampler,
        router=router,
        fixed_alpha=(1.0, 0.0) if router is None else None,
        token_index=plugin.drp_token_index,
        resample_pe=plugin.dsp_resample_pe,
    )
    return PatchedTwoWayTransformer(decoder.transformer, block, layer_index=PATCHED_LAYER)


def sam_decoder(sam: Sam) -> PromptableDecoder:
    """SAM's own prompt encoder + mask decoder as a :class:`PromptableDecoder`, NOT frozen: what base
    pre-training trains (pipeline/training/pretrain_base.py); the image encoder stays outside."""
    return PromptableDecoder(name="sam", prompt_encoder=sam.prompt_encoder, mask_decoder=sam.mask_decoder,
                             transformer=None, img_size=int(sam.image_encoder.img_size), decoder_trainable=True)


def build_method(
    name: str, sam: Sam, plugin: PluginConfig, *, force_alpha: Optional[Alpha] = None
) -> PromptableDecoder:
    """Build method ``name`` (one of :data:`METHODS`) around a frozen ``sam``.

    Freezes every parameter of ``sam``; methods that train the decoder get their own deep copy of it, so
    ``sam`` stays bit-identical. ``force_alpha`` fixes α in the patched layer (equivalence tests).
    """
    if name in UNSUPPORTED:
        raise ValueError(f"method {name!r} is not supported: {UNSUPPORTED[name]}")
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(METHODS)}")
    for p in sam.parameters():
        p.requires_grad_(False)
    decoder = sam.mask_decoder
    if name in OWN_DECODER:
        decoder = copy.deepcopy(sam.mask_decoder)
        train = [decoder.iou_token.weight, decoder.mask_tokens.weight] if name == "pt_sam" else decoder.parameters()
        for p in train:
            p.requires_grad_(True)
    transformer = _plugin_transformer(name, decoder, plugin) if name in PLUGIN_METHODS else None
    model = PromptableDecoder(
        name=name,
        prompt_encoder=sam.prompt_encoder,
        mask_decoder=decoder,
        transformer=transformer,
        img_size=int(sam.image_encoder.img_size),
        decoder_trainable=name in DECODER_TRAINABLE,
    )
    if force_alpha is not None:
        model.set_force_alpha(force_alpha)
    return model


if __name__ == "__main__":  # pragma: no cover - a quick look at the registry
    from pipeline.config import load_params
    from pipeline.modeling.backbones import build_tiny

    _plugin = load_params().plugin
    for _name in METHODS:
        print(f"{_name:24s} {build_method(_name, build_tiny(), _plugin).num_trainable:>10,d} trainable parameters")
