"""Point-sampled BCE + Dice (pipeline.training.loss)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.training.loss import mask_loss, point_sample, soft_dice, uncertain_points


def _gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def _loss(logits, targets, *, points=256, importance=0.75, seed=0):
    return mask_loss(logits, targets, num_points=points, oversample=3.0, importance=importance,
                     generators=_gens(logits.shape[0], seed))


def test_perfect_logits_give_about_zero_and_wrong_logits_a_large_loss():
    targets = torch.zeros(3, 1, 32, 32)
    targets[0] = 1.0
    targets[2, :, :, :16] = 1.0  # half/half: boundary samples are fractional, still mostly right
    perfect = (targets[:, :, ::2, ::2] * 2 - 1) * 30  # low-res logits at half the target resolution
    good = _loss(perfect, targets)
    bad = _loss(-perfect, targets)
    assert good.bce[:2].max() < 1e-6 and good.dice[0] < 1e-6
    assert good.dice[1] == pytest.approx(0.0, abs=1e-12)  # empty target, empty prediction: smoothing -> 0
    assert bad.bce[:2].min() > 25 and bad.dice[0] > 0.99
    assert (bad.total > good.total + 1).all()


def test_known_values_for_zero_logits():
    p = 100
    targets = torch.ones(2, 1, 16, 16)
    loss = _loss(torch.zeros(2, 1, 8, 8), targets, points=p, importance=0.0)
    assert torch.allclose(loss.bce, torch.full((2,), math.log(2.0)))
    expected_dice = 1 - (2 * 0.5 * p + 1) / (0.5 * p + p + 1)
    assert torch.allclose(loss.dice, torch.full((2,), expected_dice))


def test_dice_of_identical_is_zero():
    t = (torch.rand(4, 50, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    assert torch.equal(soft_dice(t, t), torch.zeros(4))
    assert (soft_dice(1 - t, t) > 0.9).all()


def test_sampling_is_seeded_per_mask_and_prefers_uncertain_points():
    logits = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 5
    a = uncertain_points(logits, 64, 3.0, 0.75, _gens(2))
    b = uncertain_points(logits, 64, 3.0, 0.75, _gens(2))
    assert torch.equal(a, b) and a.shape == (2, 64, 2) and a.min() >= 0 and a.max() <= 1
    # Row 0 does not depend on what else is in the batch.
    solo = uncertain_points(logits[:1], 64, 3.0, 0.75, _gens(1))
    assert torch.equal(solo[0], a[0])
    # The importance-sampled part is more uncertain (smaller |logit|) than uniform points.
    sampled = point_sample(logits, a[:, :48])[:, 0].abs().mean()
    uniform = point_sample(logits, a[:, 48:])[:, 0].abs().mean()
    assert sampled < uniform
    with pytest.raises(ValueError, match="one generator per mask"):
        uncertain_points(logits, 8, 3.0, 0.75, _gens(1))


def test_gradient_flows_to_logits_only():
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    targets = torch.ones(2, 1, 16, 16)
    _loss(logits, targets).total.mean().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert (logits.grad <= 0).all()  # raising the logits lowers the loss towards a positive target
