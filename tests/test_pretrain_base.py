"""The embedded base model's pre-training path: deterministic, resumable, loadable as a tiny SAM."""
from __future__ import annotations

import torch

from pipeline.config import load_params, replace
from pipeline.modeling.backbones import build_sam
from pipeline.training.pretrain_base import boxes_from, points_from, pretrain


def _cfg(steps: int):
    params = replace(load_params("params.yaml"), **{
        "base_pretrain.img_size": 64, "base_pretrain.grid": 8, "base_pretrain.steps": steps,
        "base_pretrain.batch_size": 2, "base_pretrain.images": 4, "generate.min_side": 64, "generate.max_side": 96,
    })
    return params.base_pretrain, params.generate


def test_pretrain_is_deterministic_and_resumable(tmp_path):
    cfg4, gen = _cfg(4)
    straight = pretrain(cfg4, gen, tmp_path / "a.pt", resume=False, holdout=2, log_every=1, eval_every=3)
    assert pretrain(cfg4, gen, tmp_path / "b.pt", resume=False, holdout=2, log_every=1, eval_every=3,
                    stop_after=1) == {"stopped_at": 1}
    resumed = pretrain(cfg4, gen, tmp_path / "b.pt", resume=True, holdout=2, log_every=1, eval_every=3)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["steps"] == resumed["steps"] == 4
    assert set(straight["holdout_miou_lowres"]) == {"gt_box", "noisy_box", "point_1", "point_3"}
    sam = build_sam("tiny", tmp_path / "a.pt", img_size=64, grid=8)  # strict load into the registry's tiny SAM
    assert sam.prompt_encoder.image_embedding_size == (8, 8)


def test_prompt_helpers_stay_inside_the_mask():
    hi = torch.zeros(2, 16, 16, dtype=torch.bool)
    hi[0, 2:5, 3:9] = True
    hi[1, 10:12, 1:2] = True
    assert boxes_from(hi).tolist() == [[3, 2, 8, 4], [1, 10, 1, 11]]
    pts, labels = points_from(hi, [3, 1], torch.Generator().manual_seed(0))
    assert labels.tolist() == [[1, 1, 1], [1, -1, -1]]
    for b in range(2):
        for (x, y), lab in zip(pts[b].tolist(), labels[b].tolist()):
            if lab == 1:
                assert hi[b, int(y), int(x)]
