"""Spatial-attention plugin: the ablation that replaces DSP (Stable-SAM supplement §3).

The supplement compares deformable *sampling* with a spatial *attention* map that only re-weights the
features where they are. Its exact design is not published; ours [assume] mirrors DSP so that the
comparison isolates "move features" vs "re-weight features" at the same budget (~73 K at C = 256):

    x_p -> Conv1x1(C->C) = x*_p -> DWConv5x5 -> LayerNorm(C) -> GELU -> Conv1x1(C->1, no bias) = a
    m   = H*W * softmax_over_grid(a)            (a map over the grid, mean 1; cells compete for weight)
    out = m ⊙ x*_p

Init: identity re-projection and a zero last conv give m = 1 everywhere, so an untrained plugin returns
``x_p``, like DSP.

    python -m pytest tests/test_plugins.py -q -k spatial_attention
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from pipeline.modeling.dsp import _ChannelLayerNorm, map_to_seq, seq_to_map


class SpatialAttention(nn.Module):
    """``(B, H*W, C)`` features -> ``(B, H*W, C)`` features re-weighted by a learned map over the grid."""

    def __init__(self, *, channels: int, kernel_size: int = 5) -> None:
        super().__init__()
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)
        self.score_net = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels),
            _ChannelLayerNorm(channels),
            nn.GELU(),
            nn.Conv2d(channels, 1, kernel_size=1, bias=False),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(self.proj.out_channels).view_as(self.proj.weight))
            self.proj.bias.zero_()
            nn.init.zeros_(self.score_net[-1].weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def attention_map(self, x_star: Tensor) -> Tensor:
        """``x*_p (B, C, H, W)`` -> map ``(B, 1, H, W)`` with mean 1 over the grid."""
        b, _, h, w = x_star.shape
        scores = self.score_net(x_star).flatten(1)
        return (torch.softmax(scores, dim=-1) * (h * w)).view(b, 1, h, w)

    def forward(self, x_p: Tensor, hw: tuple[int, int]) -> tuple[Tensor, None]:
        """``x_p (B, H*W, C)`` -> (re-weighted features ``(B, H*W, C)``, ``None``: no sampling grid)."""
        x_star = self.proj(seq_to_map(x_p, hw))
        return map_to_seq(self.attention_map(x_star) * x_star), None
