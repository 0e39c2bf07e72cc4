"""The embedded base model's pre-training path: deterministic, resumable, loadable as a tiny SAM."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.common.cli import StageError
from pipeline.config import replace
from pipeline.modeling.backbones import build_sam
from pipeline.training.pretrain_base import box_prompts, mask_prompts, point_prompts, pretrain
from tests.fakes import load_test_params


def _cfg(steps: int):
    params = replace(load_test_params(), **{
        "base_pretrain.img_size": 64, "base_pretrain.grid": 8, "base_pretrain.steps": steps,
        "base_pretrain.batch_size": 2, "base_pretrain.images": 4, "generate.min_side": 64, "generate.max_side": 96,
        "base_pretrain.mask_prompt_p": 0.3,
    })
    return params.base_pretrain, params.generate, params.prompts


def test_pretrain_is_deterministic_and_resumable(tmp_path):
    cfg4, gen, prompts = _cfg(8)
    straight = pretrain(cfg4, gen, prompts, tmp_path / "a.pt", resume=False, holdout=2, log_every=1, eval_every=3)
    assert pretrain(cfg4, gen, prompts, tmp_path / "b.pt", resume=False, holdout=2, log_every=1, eval_every=3,
                    stop_after=3) == {"stopped_at": 3}
    resumed = pretrain(cfg4, gen, prompts, tmp_path / "b.pt", resume=True, holdout=2, log_every=1, eval_every=3)
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight["steps"] == resumed["steps"] == 8
    assert set(straight["holdout_miou_lowres"]) == {"gt_box", "noisy_box", "point_1", "point_3"}
    sam = build_sam("tiny", tmp_path / "a.pt", img_size=64, grid=8)  # strict load into the registry's tiny SAM
    assert sam.prompt_encoder.image_embedding_size == (8, 8)


def test_a_corrupt_resume_state_is_a_clear_error_not_a_traceback(tmp_path):
    """Resuming from a random-bytes state file names the file and the fix (a StageError: exit 2 in the CLI)."""
    cfg, gen, prompts = _cfg(2)
    (tmp_path / "c.train-state.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(StageError, match=r"c\.train-state\.pt: unreadable pre-training state .*delete it"):
        pretrain(cfg, gen, prompts, tmp_path / "c.pt", resume=True, holdout=2, log_every=1, eval_every=3)


def test_prompt_helpers_stay_inside_the_mask():
    hi = torch.zeros(2, 16, 16, dtype=torch.bool)
    hi[0, 2:5, 3:9] = True
    hi[1, 10:12, 1:2] = True
    assert [p.box.tolist() for p in box_prompts(hi)] == [[3, 2, 8, 4], [1, 10, 1, 11]]
    prompts = point_prompts(hi, 3, torch.Generator().manual_seed(0))
    assert {p.signature for p in prompts} == {(False, 3, False)}  # one signature per batch: no padding tokens
    for b, p in enumerate(prompts):
        assert p.point_labels.tolist() == [1, 1, 1]
        assert all(hi[b, int(y), int(x)] for x, y in p.points.tolist())
    soft = torch.zeros(2, 64, 64)
    soft[:, 16:48, 16:48] = 1.0
    masks = mask_prompts(soft, 0.01, (0.0, 255.0), torch.Generator().manual_seed(0))
    assert all(p.mask_input.shape == (64, 64) and set(np.unique(p.mask_input)) <= {0.0, 255.0} for p in masks)
    assert all(p.mask_input[32, 32] == 255.0 and p.mask_input[0, 0] == 0.0 for p in masks)
    assert not np.array_equal(masks[0].mask_input, masks[1].mask_input)  # each row its own noise
