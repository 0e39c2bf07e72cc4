"""SAM's two-way transformer with Stable-SAM's plugins in layer 2 (docs/METHOD.md §2.1).

Inside ``transformer.layers[1]`` only the token-to-image cross-attention changes: its keys are
``x' + key_pe`` and its values ``x'`` with

    x' = α1 · plugin(x_p) + α2 · x_p

where ``x_p`` is the image side entering the block, ``plugin`` is DSP (or the spatial-attention ablation)
and α comes from DRP (learned), a fixed pair (``dsp``: (1, 0)) or a forced pair (``force_alpha``, used by
the equivalence tests with (0, 1)). DRP reads its token from the block's self-attention output (after
``norm1``). The block's MLP and image-to-token attention, ``layers[0]`` and the final attention use the
original ``x_p`` and are untouched. With ``resample_pe`` [assume, default off] the key PE is mixed the
same way: ``pe' = α1 · PE(p + Δp) + α2 · PE(p)``.

The wrappers hold SAM's own submodules (no weight copies) and never modify the wrapped transformer, so
a frozen SAM can be shared by several methods at once.

    python -m pytest tests/test_plugins.py -q
"""
from __future__ import annotations

from typing import Optional

import torch
from segment_anything.modeling.transformer import TwoWayAttentionBlock, TwoWayTransformer
from torch import Tensor, nn

from pipeline.modeling.dsp import resample_seq
from pipeline.modeling.drp import DynamicRouting

Alpha = tuple[float, float]


class PatchedAttentionBlock(nn.Module):
    """Replacement forward for one ``TwoWayAttentionBlock`` (shares its submodules)."""

    def __init__(
        self,
        block: TwoWayAttentionBlock,
        *,
        sampler: nn.Module,
        router: Optional[DynamicRouting] = None,
        fixed_alpha: Optional[Alpha] = None,
        token_index: int = 1,
        resample_pe: bool = False,
    ) -> None:
        """
        Args:
          block: SAM's block to patch (its submodules are used, not copied).
          sampler: ``(x_p (B, HW, C), (H, W)) -> (features (B, HW, C), grid (B, H, W, 2) | None)``.
          router: DRP; when ``None``, ``fixed_alpha`` is used.
          fixed_alpha: α when there is no router (``dsp``: (1, 0)).
          token_index: the token DRP reads (0 = IoU token, 1 = first mask token, ...).
          resample_pe: also read the key PE at the sampler's grid.
        """
        super().__init__()
        if router is None and fixed_alpha is None:
            raise ValueError("PatchedAttentionBlock needs a router (DRP) or a fixed_alpha")
        if token_index < 0:
            raise ValueError(f"token_index must be >= 0, got {token_index}")
        self.block = block
        self.sampler = sampler
        self.router = router
        self.fixed_alpha = fixed_alpha
        self.token_index = token_index
        self.resample_pe = resample_pe
        self.force_alpha: Optional[Alpha] = None  # overrides router/fixed α when set (tests, ablations)

    def _alpha(self, queries: Tensor) -> Tensor:
        """α ``(B, 2)`` for tokens ``queries (B, T, C)``."""
        b = queries.shape[0]
        pair = self.force_alpha
        if pair is None and self.router is None:
            pair = self.fixed_alpha
        if pair is not None:
            return torch.tensor(pair, device=queries.device, dtype=queries.dtype).expand(b, 2)
        if self.token_index >= queries.shape[1]:
            raise ValueError(f"DRP token_index {self.token_index} is out of range for {queries.shape[1]} tokens")
        return self.router(queries[:, self.token_index, :])

    def forward(
        self, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor, hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """queries ``(B, T, C)``, keys ``(B, HW, C)``, query_pe ``(B, T, C)``, key_pe ``(B, HW, C)`` ->
        (queries ``(B, T, C)``, keys ``(B, HW, C)``, α ``(B, 2)``)."""
        blk = self.block
        queries = token_self_attention(blk, queries, query_pe)  # unchanged

        # Token-to-image attention on the routed mixture x' (the only patched step).
        alpha = self._alpha(queries)
        a1 = alpha[:, 0].view(-1, 1, 1).to(keys.dtype)
        a2 = alpha[:, 1].view(-1, 1, 1).to(keys.dtype)
        deformed, grid = self.sampler(keys, hw)
        # One contiguous (B, HW, C) mixture: the projections below then read it without copying it again.
        mixed = torch.addcmul(a2 * keys, a1, deformed.contiguous())
        pe = key_pe
        if self.resample_pe and grid is not None:
            pe = a1 * resample_seq(key_pe, grid, hw) + a2 * key_pe
        q = queries + query_pe
        queries = queries + blk.cross_attn_token_to_image(q=q, k=mixed + pe, v=mixed)
        queries = blk.norm2(queries)

        # MLP block (unchanged).
        queries = blk.norm3(queries + blk.mlp(queries))

        # Image-to-token attention on the ORIGINAL x_p (unchanged).
        q = queries + query_pe
        keys = blk.norm4(keys + blk.cross_attn_image_to_token(q=keys + key_pe, k=q, v=queries))
        return queries, keys, alpha


class PatchedTwoWayTransformer(nn.Module):
    """``TwoWayTransformer`` whose layer ``layer_index`` is a :class:`PatchedAttentionBlock`."""

    def __init__(self, base: TwoWayTransformer, layer: PatchedAttentionBlock, *, layer_index: int = 1) -> None:
        super().__init__()
        if not 0 <= layer_index < len(base.layers):
            raise ValueError(f"layer_index {layer_index} out of range for {len(base.layers)} layers")
        if layer.block is not base.layers[layer_index]:
            raise ValueError("the patched block must wrap base.layers[layer_index] itself, not a copy")
        self.base = base
        self.layer = layer
        self.layer_index = layer_index

    def forward(
        self, image_embedding: Tensor, image_pe: Tensor, point_embedding: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """image_embedding ``(B, C, H, W)``, image_pe ``(B, C, H, W)``, point_embedding ``(B, T, C)`` ->
        (tokens ``(B, T, C)``, image side ``(B, HW, C)``, α ``(B, 2)``)."""
        h, w = image_embedding.shape[-2:]
        keys = image_embedding.flatten(2).permute(0, 2, 1)
        key_pe = image_pe.flatten(2).permute(0, 2, 1)
        return self.forward_seq(keys, key_pe, point_embedding, (h, w))

    def forward_seq(
        self, keys: Tensor, key_pe: Tensor, point_embedding: Tensor, hw: tuple[int, int]
    ) -> tuple[Tensor, Tensor, Tensor]:
        """The same on the image side as a sequence: keys ``(B, HW, C)``, key_pe ``(1 or B, HW, C)``."""
        queries, keys, alpha = two_way_forward(self.base, keys, key_pe, point_embedding, hw,
                                               patched=self.layer, layer_index=self.layer_index)
        assert alpha is not None
        return queries, keys, alpha


def token_self_attention(block: TwoWayAttentionBlock, queries: Tensor, query_pe: Tensor) -> Tensor:
    """The block's first step, SAM's code path for both PE settings: queries ``(B, T, C)`` -> ``(B, T, C)``."""
    if block.skip_first_layer_pe:
        queries = block.self_attn(q=queries, k=queries, v=queries)
    else:
        q = queries + query_pe
        queries = queries + block.self_attn(q=q, k=q, v=queries)
    return block.norm1(queries)


def attention_block(
    block: TwoWayAttentionBlock, queries: Tensor, keys: Tensor, query_pe: Tensor, key_pe: Tensor
) -> tuple[Tensor, Tensor]:
    """SAM's ``TwoWayAttentionBlock.forward``, step for step, with ``keys + key_pe`` computed once (SAM adds
    it twice, to the same unchanged keys): the same numbers, one ``(B, HW, C)`` add less."""
    queries = token_self_attention(block, queries, query_pe)
    k = keys + key_pe
    q = queries + query_pe
    queries = block.norm2(queries + block.cross_attn_token_to_image(q=q, k=k, v=keys))
    queries = block.norm3(queries + block.mlp(queries))
    q = queries + query_pe
    keys = block.norm4(keys + block.cross_attn_image_to_token(q=k, k=q, v=queries))
    return queries, keys


def two_way_forward(
    base: TwoWayTransformer,
    keys: Tensor,
    key_pe: Tensor,
    point_embedding: Tensor,
    hw: tuple[int, int],
    *,
    patched: Optional[PatchedAttentionBlock] = None,
    layer_index: int = 1,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """SAM's ``TwoWayTransformer.forward`` on the image side as a sequence, optionally with layer
    ``layer_index`` replaced by ``patched``.

    keys ``(B, HW, C)``, key_pe ``(1 or B, HW, C)``, point_embedding ``(B, T, C)`` ->
    (tokens ``(B, T, C)``, image side ``(B, HW, C)``, α ``(B, 2)`` or ``None`` without a patched layer).
    """
    queries = point_embedding
    alpha: Optional[Tensor] = None
    for i, layer in enumerate(base.layers):
        if patched is not None and i == layer_index:
            queries, keys, alpha = patched(queries, keys, point_embedding, key_pe, hw)
        else:
            queries, keys = attention_block(layer, queries, keys, point_embedding, key_pe)
    q = queries + point_embedding
    k = keys + key_pe
    queries = base.norm_final_attn(queries + base.final_attn_token_to_image(q=q, k=k, v=keys))
    return queries, keys, alpha
