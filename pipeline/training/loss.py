"""Mask loss: point-sampled BCE + Dice, 1:1 (docs/METHOD.md §3, HQ-SAM's ``loss_masks``).

The low-res logits ``[B, 1, 4g, 4g]`` are compared with the soft GT at the model-input resolution
``[B, 1, S, S]`` (S = img_size; ``transforms.mask_to_input_frame(mask, S, S)``) at ``num_points`` points
per mask chosen as in PointRend / Mask2Former / HQ-SAM: ``oversample * num_points`` uniform candidates,
the ``importance * num_points`` most uncertain of them (uncertainty = -|logit|) plus uniform random
points for the rest. Both maps are read at those points with bilinear ``grid_sample``
(align_corners=False), so the two resolutions never need resizing. Unlike detectron2's ``point_sample``
(zero padding) we use border padding, so a point in the outer half pixel is not blended with a fake 0.

Dice is computed, as in HQ-SAM, on the sigmoid of the SAMPLED point logits against the sampled soft
labels (with +1 smoothing), not on the full map.

Sampling is seeded per mask: the caller passes one ``torch.Generator`` per row (seeded from the sample's
identity), so the points a sample gets never depend on which other samples share its batch, on the
number of DDP ranks, or on resuming.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


class MaskLoss(NamedTuple):
    bce: Tensor  # (B,) per-mask mean BCE over the sampled points
    dice: Tensor  # (B,) per-mask Dice loss over the sampled points

    @property
    def total(self) -> Tensor:
        """(B,) BCE + Dice, weights 1:1."""
        return self.bce + self.dice


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """maps ``(B, C, H, W)``, coords ``(B, P, 2)`` as (x, y) in [0, 1] -> ``(B, C, P)`` bilinear samples."""
    grid = (2.0 * coords - 1.0).unsqueeze(2).to(maps.dtype)  # (B, P, 1, 2)
    return F.grid_sample(maps, grid, mode="bilinear", padding_mode="border", align_corners=False).squeeze(3)


def _uniform(generators: Sequence[torch.Generator], n: int, device: torch.device) -> Tensor:
    """``(B, n, 2)`` uniform [0, 1) coordinates, row b drawn from ``generators[b]`` (on the CPU)."""
    return torch.stack([torch.rand(n, 2, generator=g) for g in generators]).to(device)


@torch.no_grad()
def uncertain_points(
    logits: Tensor,
    num_points: int,
    oversample: float,
    importance: float,
    generators: Sequence[torch.Generator],
) -> Tensor:
    """logits ``(B, 1, h, w)`` -> coords ``(B, num_points, 2)`` in [0, 1] (PointRend's importance sampling)."""
    b = logits.shape[0]
    if len(generators) != b:
        raise ValueError(f"need one generator per mask: {len(generators)} generators for {b} masks")
    num_sampled = max(int(num_points * oversample), num_points)
    num_uncertain = int(importance * num_points)
    cand = _uniform(generators, num_sampled, logits.device)
    coords = cand[:, :0]
    if num_uncertain > 0:
        uncertainty = -point_sample(logits.float(), cand)[:, 0].abs()  # (B, num_sampled)
        idx = torch.topk(uncertainty, k=num_uncertain, dim=1).indices
        coords = torch.gather(cand, 1, idx.unsqueeze(-1).expand(-1, -1, 2))
    if num_points - num_uncertain > 0:
        coords = torch.cat([coords, _uniform(generators, num_points - num_uncertain, logits.device)], dim=1)
    return coords


def sigmoid_bce(point_logits: Tensor, point_labels: Tensor) -> Tensor:
    """``(B, P)`` logits and soft labels -> ``(B,)`` mean binary cross-entropy per mask."""
    return F.binary_cross_entropy_with_logits(point_logits, point_labels, reduction="none").mean(dim=1)


def soft_dice(probs: Tensor, targets: Tensor) -> Tensor:
    """``(B, P)`` probabilities and soft labels -> ``(B,)`` 1 - (2|p t| + 1) / (|p| + |t| + 1)."""
    num = 2.0 * (probs * targets).sum(dim=1)
    den = probs.sum(dim=1) + targets.sum(dim=1)
    return 1.0 - (num + 1.0) / (den + 1.0)


def dice_loss(point_logits: Tensor, point_labels: Tensor) -> Tensor:
    """``(B, P)`` logits and soft labels -> ``(B,)`` Dice loss on sigmoid(logits) (HQ-SAM)."""
    return soft_dice(point_logits.sigmoid(), point_labels)


def mask_loss(
    logits: Tensor,
    targets: Tensor,
    *,
    num_points: int,
    oversample: float,
    importance: float,
    generators: Sequence[torch.Generator],
) -> MaskLoss:
    """Point-sampled BCE + Dice per mask.

    Args:
      logits: ``(B, 1, h, w)`` low-res mask logits (any float dtype; the loss is computed in float32).
      targets: ``(B, 1, H, W)`` soft GT in [0, 1] (H, W may differ from h, w).
      generators: one CPU ``torch.Generator`` per mask.
    Returns:
      :class:`MaskLoss` with ``(B,)`` tensors; reduce with ``.total.mean()``.
    """
    if logits.dim() != 4 or logits.shape[1] != 1 or targets.dim() != 4 or targets.shape[:2] != logits.shape[:2]:
        raise ValueError(f"mask_loss expects logits (B, 1, h, w) and targets (B, 1, H, W), got "
                         f"{tuple(logits.shape)} and {tuple(targets.shape)}")
    logits = logits.float()
    coords = uncertain_points(logits, num_points, oversample, importance, generators)
    point_labels = point_sample(targets.float(), coords)[:, 0]
    point_logits = point_sample(logits, coords)[:, 0]
    return MaskLoss(sigmoid_bce(point_logits, point_labels), dice_loss(point_logits, point_labels))
