"""Deformable Sampling Plugin (DSP), Stable-SAM, docs/METHOD.md §2.2.

DSP re-samples the image features entering layer 2 of SAM's mask-decoder transformer at learned,
shifted locations, so that the token-to-image attention can look at the object instead of the
background around a loose prompt. Topology from the paper's figure:

    x_p -> Conv1x1(C->C) = x*_p -> DWConv5x5 -> LayerNorm(C) -> GELU -> Conv1x1(C->2, no bias) = raw
    raw = raw - mean_HW(raw)                             (plugin.dsp_zero_mean: no shift of the whole map) [assume]
    Δp  = tanh(raw) * r * 2/(size-1)                     (DAT-style bound: at most r grid cells) [assume]
    out = grid_sample(x*_p, p + Δp, bilinear, align_corners=True, padding zeros)            [assume]

Initialisation [assume]: the first Conv1x1 is the identity and the last Conv1x1 is zero, so Δp = 0 and an
untrained DSP returns ``x_p`` (to float tolerance of grid_sample's coordinate arithmetic).

    python -c "from pipeline.modeling.dsp import DeformableSampling as D; print(D(channels=256).num_parameters())"
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def seq_to_map(x: Tensor, hw: tuple[int, int]) -> Tensor:
    """``(B, H*W, C)`` token sequence (SAM's ``flatten(2).permute(0, 2, 1)`` order) -> ``(B, C, H, W)``."""
    b, n, c = x.shape
    h, w = hw
    if n != h * w:
        raise ValueError(f"sequence length {n} does not match grid {h}x{w}")
    return x.transpose(1, 2).reshape(b, c, h, w)


def map_to_seq(x: Tensor) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, H*W, C)``; the inverse of :func:`seq_to_map`."""
    return x.flatten(2).transpose(1, 2)


def base_grid(h: int, w: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Sampling locations of the cell centres in grid_sample's align_corners=True frame: ``(1, H, W, 2)`` (x, y)."""
    ys = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)
    xs = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((gx, gy), dim=-1).unsqueeze(0)


def cells_to_grid_units(h: int, w: int, *, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Factor ``(2/(W-1), 2/(H-1))`` turning offsets in grid cells into grid_sample units: ``(2,)``."""
    return torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)], device=device, dtype=dtype)


def sample(x: Tensor, grid: Tensor) -> Tensor:
    """Bilinear read of ``x (B, C, H, W)`` at ``grid (B, H, W, 2)`` (x, y in [-1, 1]); zeros outside.

    Computed in at least float32 (a bf16 grid is off by ~0.1 cell at g = 64) and returned in ``x``'s dtype.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    out = F.grid_sample(x.to(dtype), grid.to(dtype), mode="bilinear", padding_mode="zeros", align_corners=True)
    return out.to(x.dtype)


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel dimension of a ``(B, C, H, W)`` map (2*C parameters)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class DeformableSampling(nn.Module):
    """DSP: ``(B, H*W, C)`` features -> ``(B, H*W, C)`` features read at learned offsets (any H, W >= 2)."""

    def __init__(self, *, channels: int, offset_range: float = 4.0, kernel_size: int = 5, zero_mean: bool = False) -> None:
        """
        Args:
          channels: C, the decoder's transformer width (256 for SAM).
          offset_range: r, the largest offset in grid cells (``plugin.dsp_offset_range``) [assume].
          kernel_size: the depth-wise conv's kernel (5 in the paper's figure).
          zero_mean: remove each map's mean raw offset before the tanh bound (``plugin.dsp_zero_mean``)
            [assume]: the offsets then cannot translate the whole map, only move cells relative to each other.
        """
        super().__init__()
        if offset_range <= 0:
            raise ValueError(f"offset_range must be > 0 grid cells, got {offset_range}")
        self.offset_range = float(offset_range)
        self.zero_mean = bool(zero_mean)
        self.proj = nn.Conv2d(channels, channels, kernel_size=1)
        self.offset_net = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels),
            _ChannelLayerNorm(channels),
            nn.GELU(),
            nn.Conv2d(channels, 2, kernel_size=1, bias=False),
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Identity re-projection and zero offsets: an untrained DSP returns its input."""
        with torch.no_grad():
            self.proj.weight.copy_(torch.eye(self.proj.out_channels).view_as(self.proj.weight))
            self.proj.bias.zero_()
            nn.init.zeros_(self.offset_net[-1].weight)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def offsets(self, x_star: Tensor) -> Tensor:
        """``x*_p (B, C, H, W)`` -> Δp ``(B, H, W, 2)`` in grid_sample units, bounded by ``offset_range`` cells.

        The LayerNorm, GELU and last 1x1 conv run channels-last on ``(B, H, W, C)`` (the same arithmetic as
        the ``offset_net`` modules called in order, without their permute copies).
        """
        h, w = x_star.shape[-2:]
        dwconv, norm, act, last = self.offset_net
        y = dwconv(x_star).permute(0, 2, 3, 1)  # (B, H, W, C)
        raw = F.linear(act(norm.norm(y)), last.weight.flatten(1))  # (B, H, W, 2)
        raw = raw.to(torch.promote_types(raw.dtype, torch.float32))
        if self.zero_mean:
            raw = raw - raw.mean(dim=(1, 2), keepdim=True)
        scale = cells_to_grid_units(h, w, device=x_star.device, dtype=raw.dtype)
        return torch.tanh(raw) * self.offset_range * scale

    def sampling_grid(self, x_p: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``x_p (B, H*W, C)`` -> (``x*_p (B, C, H, W)``, sampling grid ``p + Δp (B, H, W, 2)``).

        The 1x1 re-projection runs as one matmul on the sequence; ``x*_p`` is its channels-last view.
        """
        h, w = hw
        if h < 2 or w < 2:
            raise ValueError(f"DSP needs a grid of at least 2x2 cells, got {h}x{w}")
        b, n, c = x_p.shape
        if n != h * w:
            raise ValueError(f"sequence length {n} does not match grid {h}x{w}")
        x_star = F.linear(x_p, self.proj.weight.flatten(1), self.proj.bias).view(b, h, w, c).permute(0, 3, 1, 2)
        delta = self.offsets(x_star)
        grid = base_grid(h, w, device=x_p.device, dtype=delta.dtype) + delta
        return x_star, grid

    def forward(self, x_p: Tensor, hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``x_p (B, H*W, C)`` -> (deformed features ``(B, H*W, C)``, the sampling grid ``(B, H, W, 2)``).

        The grid is returned so that a caller can read other per-cell maps (SAM's dense PE) at the same
        locations (``plugin.dsp_resample_pe``).
        """
        x_star, grid = self.sampling_grid(x_p, hw)
        return map_to_seq(sample(x_star, grid)), grid


def resample_seq(x: Tensor, grid: Tensor, hw: tuple[int, int]) -> Tensor:
    """Read a ``(B, H*W, C)`` sequence at ``grid (B, H, W, 2)`` -> ``(B, H*W, C)`` (e.g. the dense PE)."""
    if x.shape[0] != grid.shape[0]:
        x = x.expand(grid.shape[0], -1, -1)
    return map_to_seq(sample(seq_to_map(x, hw), grid))
