"""A small convolutional image encoder for the embedded-default SAM.

It replaces SAM's ViT (far too slow to pre-train on two CPU cores) but keeps its contract: an
``img_size`` attribute and ``forward(x [B, 3, img_size, img_size]) -> [B, 256, g, g]`` embeddings,
normalised like SAM's neck (1x1 conv -> LayerNorm2d). Stem: stride-2 3x3 convs down to the grid;
body: ConvNeXt-style blocks (Liu et al., CVPR 2022: 7x7 depthwise conv, LayerNorm, inverted MLP) for
a wide receptive field at little cost.
"""
from __future__ import annotations

import math

import torch
from segment_anything.modeling.common import LayerNorm2d
from torch import nn


class ConvNeXtBlock(nn.Module):
    """x + MLP(LN(DWConv7x7(x))), on ``[B, C, g, g]``."""

    def __init__(self, *, dim: int, expansion: int = 4) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = LayerNorm2d(dim)
        self.pw1 = nn.Conv2d(dim, dim * expansion, 1)
        self.act = nn.GELU()
        self.pw2 = nn.Conv2d(dim * expansion, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pw2(self.act(self.pw1(self.norm(self.dwconv(x)))))


class TinyConvEncoder(nn.Module):
    """``[B, 3, img_size, img_size]`` -> ``[B, out_chans, grid, grid]``; ``img_size / grid`` a power of 2."""

    def __init__(self, *, img_size: int = 256, grid: int = 32, dim: int = 128, depth: int = 4, out_chans: int = 256) -> None:
        super().__init__()
        stride = img_size // grid
        if img_size % grid or stride & (stride - 1) or stride < 2:
            raise ValueError(f"img_size/grid must be a power of two >= 2, got {img_size}/{grid}")
        self.img_size = img_size
        self.grid = grid
        n_down = int(math.log2(stride))
        widths = [max(16, dim >> (n_down - 1 - i)) for i in range(n_down)]  # e.g. 32, 64, 128
        layers: list[nn.Module] = []
        c_in = 3
        for c_out in widths:
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), LayerNorm2d(c_out), nn.GELU()]
            c_in = c_out
        self.stem = nn.Sequential(*layers)
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim=c_in) for _ in range(depth)])
        self.neck = nn.Sequential(
            nn.Conv2d(c_in, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.blocks(self.stem(x)))
