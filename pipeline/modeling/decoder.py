"""Batched SAM mask decoding: B image embeddings with one prompt each (docs/METHOD.md §2.5).

SAM's ``MaskDecoder.predict_masks`` repeats ONE image embedding for every prompt. Training needs B
different embeddings with one prompt each; evaluation needs one embedding with many prompts, which is
the same call with the embedding expanded (``emb.expand(P, -1, -1, -1)``, no copy). :func:`decode`
re-runs ``predict_masks`` step by step with the decoder's own submodules (no weight copies), so it equals
SAM's per-image path; ``transformer`` swaps in the patched transformer of Stable-SAM.

    python -m pytest tests/test_plugins.py -q -k batched
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from segment_anything.modeling.mask_decoder import MaskDecoder
from torch import Tensor, nn

from pipeline.modeling.patched_transformer import two_way_forward


class DecodeResult(NamedTuple):
    low_res_logits: Tensor  # (B, M, 4g, 4g)
    iou_pred: Tensor  # (B, M)
    tokens: Tensor  # (B, 5 + N, C): the transformer's output tokens
    alpha: Optional[Tensor]  # (B, 2) when the transformer routes (patched layer 2), else None


def _check_shapes(image_embeddings: Tensor, image_pe: Tensor, sparse: Tensor, dense: Tensor) -> None:
    if image_embeddings.dim() != 4:
        raise ValueError(f"image_embeddings must be (B, C, g, g), got {tuple(image_embeddings.shape)}")
    b, c, h, w = image_embeddings.shape
    if image_pe.dim() != 4 or image_pe.shape[1:] != (c, h, w) or image_pe.shape[0] not in (1, b):
        raise ValueError(f"image_pe must be (1 or {b}, {c}, {h}, {w}), got {tuple(image_pe.shape)}")
    if sparse.dim() != 3 or sparse.shape[0] != b or sparse.shape[2] != c:
        raise ValueError(f"sparse prompt embeddings must be ({b}, N, {c}), got {tuple(sparse.shape)}")
    if dense.shape != image_embeddings.shape:
        raise ValueError(f"dense prompt embeddings must be {tuple(image_embeddings.shape)}, got {tuple(dense.shape)}")


def _shared_rows(x: Tensor) -> bool:
    """``x (B, ...)`` is one row expanded B times (batch stride 0, as ``expand`` makes it)."""
    return x.stride(0) == 0


def decode_with_alpha(
    sam_decoder: MaskDecoder,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse: Tensor,
    dense: Tensor,
    multimask_output: Optional[bool],
    transformer: Optional[nn.Module] = None,
) -> DecodeResult:
    """Like :func:`decode`, also returning α from a patched ``transformer`` (one returning 3 values).

    ``multimask_output=None`` returns all four outputs ``[B, 4, 4g, 4g]`` (single-mask token first), which
    SAM-style pre-training needs (pipeline/training/pretrain_base.py).
    ``transformer`` defaults to ``sam_decoder.transformer``; a module with ``forward_seq`` (the patched
    transformer) gets the image side as a sequence, any other one is called with
    ``(src (B, C, g, g), pos (B, C, g, g), tokens (B, T, C)) -> (tokens, src (B, g*g, C)[, α (B, 2)])``.
    """
    _check_shapes(image_embeddings, image_pe, sparse, dense)
    dec = sam_decoder
    b, c, h, w = image_embeddings.shape
    output_tokens = torch.cat([dec.iou_token.weight, dec.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
    tokens = torch.cat((output_tokens, sparse.to(output_tokens.dtype)), dim=1)

    if transformer is None or hasattr(transformer, "forward_seq"):
        # The image side as a (B, HW, C) sequence from the start, made contiguous once (SAM's permuted view
        # makes every projection of layer 1 copy it again); the dense PE stays (1, HW, C) and broadcasts.
        # Many prompts on one image without mask inputs (evaluation, the predictor) share one image side
        # until layer 1's image-to-token attention makes it per prompt: it enters as (1, HW, C), and SAM's
        # attention broadcasts it, so layer 1's three image-side projections run once instead of B times.
        if b > 1 and _shared_rows(image_embeddings) and _shared_rows(dense):
            src = image_embeddings[:1] + dense[:1]
        else:
            src = image_embeddings + dense  # one embedding per prompt: no repeat_interleave
        keys = src.flatten(2).transpose(1, 2).contiguous()
        key_pe = image_pe.flatten(2).transpose(1, 2)
        if transformer is None:
            hs, src, alpha = two_way_forward(dec.transformer, keys, key_pe, tokens, (h, w))
        else:
            hs, src, alpha = transformer.forward_seq(keys, key_pe, tokens, (h, w))
    else:
        out = transformer(image_embeddings + dense, image_pe.expand(b, -1, -1, -1), tokens)
        hs, src = out[0], out[1]
        alpha = out[2] if len(out) > 2 else None
    iou_token_out = hs[:, 0, :]

    # Only the mask tokens that are returned go through their hypernetwork MLP (SAM computes all four and
    # slices afterwards; each mask is a separate row of the product, so the kept ones are unchanged).
    if multimask_output is None:
        kept = list(range(dec.num_mask_tokens))
    else:
        kept = list(range(1, dec.num_mask_tokens)) if multimask_output else [0]
    upscaled = dec.output_upscaling(src.transpose(1, 2).reshape(b, c, h, w))
    hyper_in = torch.stack([dec.output_hypernetworks_mlps[i](hs[:, 1 + i, :]) for i in kept], dim=1)
    ub, uc, uh, uw = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(ub, uc, uh * uw)).view(ub, -1, uh, uw)
    iou_pred = dec.iou_prediction_head(iou_token_out)[:, kept[0]: kept[-1] + 1]
    return DecodeResult(masks, iou_pred, hs, alpha)


def decode(
    sam_decoder: MaskDecoder,
    image_embeddings: Tensor,
    image_pe: Tensor,
    sparse: Tensor,
    dense: Tensor,
    multimask_output: bool,
    transformer: Optional[nn.Module] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode B embeddings with one prompt each, reusing ``sam_decoder``'s submodules.

    Args:
      image_embeddings: ``(B, C, g, g)`` (expand one embedding to decode many prompts on one image).
      image_pe: ``(1, C, g, g)``, ``prompt_encoder.get_dense_pe()``.
      sparse: ``(B, N, C)`` sparse prompt embeddings; dense: ``(B, C, g, g)``.
      multimask_output: the 3 multimask outputs (True) or the single-mask output (False), as in SAM.
      transformer: an optional replacement for ``sam_decoder.transformer`` (see :func:`decode_with_alpha`).
    Returns:
      (low_res_logits ``(B, M, 4g, 4g)``, iou_pred ``(B, M)``, tokens ``(B, 5 + N, C)``), M = 3 or 1.
    """
    res = decode_with_alpha(sam_decoder, image_embeddings, image_pe, sparse, dense, multimask_output, transformer)
    return res.low_res_logits, res.iou_pred, res.tokens
