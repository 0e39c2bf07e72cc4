"""The embedded base model's pre-training path: deterministic, resumable, loadable as a tiny SAM."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from pipeline.common.cli import StageError
from pipeline.common.hashing import sha256_file
from pipeline.config import replace
from pipeline.modeling.backbones import build_sam
from pipeline.config import ConfigError
from pipeline.training.pretrain_base import (box_prompts, build_pool, group_of, mask_prompts, part_of, phase_configs,
                                             point_prompts, pretrain, run_pretrain_base)
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


def test_part_targets_are_pieces_of_the_object_and_deterministic():
    """``part_of`` cuts the object with a window: a subset of the mask, smaller than it, at least 15 % of it,
    the same for the same generator state; a mask too small to cut comes back whole."""
    mask = np.zeros((80, 100), bool)
    mask[10:70, 20:90] = True
    mask[30:40, 40:60] = False  # a hole
    for seed in range(20):
        part = part_of(mask, np.random.default_rng(seed))
        assert part.shape == mask.shape and part.dtype == bool
        assert not (part & ~mask).any()
        assert 0.15 * mask.sum() <= part.sum() < mask.sum()
        assert np.array_equal(part, part_of(mask, np.random.default_rng(seed)))
    tiny = np.zeros((20, 20), bool)
    tiny[5:9, 5:9] = True
    assert np.array_equal(part_of(tiny, np.random.default_rng(0)), tiny)


def test_part_p_replaces_some_pool_targets_by_parts_and_never_the_holdout():
    """With ``part_p`` 1 every pool target is a strict piece of the whole one; the held-out pool (scored on
    whole objects) ignores it; ``part_p`` 0 gives the whole objects."""
    cfg, gen, _ = _cfg(1)
    whole = build_pool(4, 1, dataclasses.replace(cfg, part_p=0.0), gen)
    parts = build_pool(4, 1, dataclasses.replace(cfg, part_p=1.0), gen)
    held = build_pool(4, 1, dataclasses.replace(cfg, part_p=1.0), gen, parts=False)
    assert torch.equal(whole.images, parts.images) and torch.equal(whole.hi_targets, held.hi_targets)
    assert not (parts.hi_targets & ~whole.hi_targets).any()
    assert (parts.hi_targets.sum((1, 2)) < whole.hi_targets.sum((1, 2))).all()


def test_group_targets_add_the_touching_objects_only():
    """``group_of`` unites the object with the instances that touch it (4-neighbourhood) and leaves out the
    ones that do not; with nothing touching it returns the object itself."""
    obj = np.zeros((20, 30), bool)
    obj[5:10, 5:10] = True
    touching = np.zeros_like(obj)
    touching[5:10, 10:14] = True  # shares an edge with the object
    apart = np.zeros_like(obj)
    apart[15:18, 20:25] = True
    group = group_of(obj, [obj, touching, apart])
    assert np.array_equal(group, obj | touching)
    assert np.array_equal(group_of(obj, [obj, apart]), obj)


def test_group_p_makes_pool_targets_supersets_and_part_p_plus_group_p_is_checked():
    """With ``group_p`` 1 every pool target contains the whole object (generated scenes have a touching
    distractor, so most grow); the held-out pool stays whole; shares over 1 are refused naming both keys."""
    cfg, gen, _ = _cfg(1)
    whole = build_pool(6, 1, dataclasses.replace(cfg, part_p=0.0, group_p=0.0), gen)
    groups = build_pool(6, 1, dataclasses.replace(cfg, part_p=0.0, group_p=1.0), gen)
    held = build_pool(6, 1, dataclasses.replace(cfg, part_p=0.0, group_p=1.0), gen, parts=False)
    assert torch.equal(whole.images, groups.images) and torch.equal(whole.hi_targets, held.hi_targets)
    assert not (whole.hi_targets & ~groups.hi_targets).any()
    assert (groups.hi_targets.sum((1, 2)) > whole.hi_targets.sum((1, 2))).any()
    with pytest.raises(ConfigError, match=r"part_p \+ base_pretrain.group_p"):
        replace(load_test_params(), **{"base_pretrain.part_p": 0.6, "base_pretrain.group_p": 0.5})


def test_two_phases_reuse_the_finished_first_phase_and_refuse_a_foreign_resume_state(tmp_path):
    """The part phase starts from the whole-object phase's weights; a rerun reuses a finished phase instead of
    training it again; a resume state made by another config is refused with the fix."""
    params = replace(load_test_params(), **{
        "base_pretrain.img_size": 64, "base_pretrain.grid": 8, "base_pretrain.steps": 2, "base_pretrain.batch_size": 2,
        "base_pretrain.images": 4, "generate.min_side": 64, "generate.max_side": 96, "base_pretrain.parts_steps": 2,
        "base_pretrain.parts_images": 4, "base_pretrain.part_p": 1.0})
    first, second = phase_configs(params.base_pretrain)
    assert (first.steps, first.part_p, second.steps, second.part_p, second.lr) == (2, 0.0, 2, 1.0, 3.0e-4)
    out = tmp_path / "tiny.pt"
    run_pretrain_base(params, out)
    phase1 = tmp_path / "tiny-phase1.pt"
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["init_sha256"] == sha256_file(phase1) and report["config"]["part_p"] == 1.0
    a, b = torch.load(phase1, weights_only=True), torch.load(out, weights_only=True)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the second phase trained
    before = phase1.stat().st_mtime_ns
    run_pretrain_base(params, out)  # both phases finished: nothing is retrained
    assert phase1.stat().st_mtime_ns == before
    # a resume state of another run (the whole-object phase's config) next to the part phase's output
    cfg1 = phase_configs(params.base_pretrain)[0]
    pretrain(cfg1, params.generate, params.prompts, tmp_path / "x.pt", resume=False, holdout=2, stop_after=1)
    (tmp_path / "x.train-state.pt").rename(out.with_suffix(".train-state.pt"))
    with pytest.raises(StageError, match="another pre-training run"):
        run_pretrain_base(params, out)
