"""The train stage on a tiny fake cache and a tiny random SAM: outputs, frozen SAM, exact resume, DDP.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_train.py -q            # the DDP test is marked slow
"""
from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch

from pipeline.config import Params, replace
from pipeline.data.embedding_format import read_cache_meta
from pipeline.modeling.backbones import freeze, load_base
from pipeline.modeling.methods import build_method
from pipeline.prompts.stage import make_prompts, model_frame
from pipeline.prompts.tables import load_train_prompts
from pipeline.training import ddp
from pipeline.modeling.plugin_file import read_plugin_file
from pipeline.training.checkpointing import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from pipeline.training.train import BatchStream, batch_loss, forward_samples, frozen_checksum, param_groups, train
from tests.fakes import free_port, tiny_sam, write_fake_cache, write_tiny_base

IMG, GRID = 64, 8
SKIPPED = "DUTS-TR/im5#0"


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, test_params: Params) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("train")
    base = tmp / "base"
    _, sha = write_tiny_base(base, img=IMG, grid=GRID)
    # One view with an empty GT: the prompts stage quarantines it, training must skip it (counted).
    write_fake_cache(tmp / "emb", sha, img=IMG, grid=GRID, n_train=12, empty_views=(SKIPPED,))
    params = replace(test_params, **{
        "train.batch_size": 4, "train.max_steps": 4, "train.loss_points": 128, "train.checkpoint_every": 2,
        "train.device": "cpu", "train.shuffle_buffer": 4,
        "prompts.train_type_probs": {"gt_box": 1.0, "noisy_box": 1.0, "points": 1.0, "coarse_mask": 1.0},
    })
    make_prompts(params, tmp / "emb", tmp / "prompts")
    return {"tmp": tmp, "base": base, "params": params, "emb": tmp / "emb", "prompts": tmp / "prompts" / "train.parquet"}


def run(ws: dict[str, Any], method: str, tag: str, params: Params | None = None, **kw: Any) -> dict[str, Any]:
    d = ws["tmp"] / tag
    return train(params or ws["params"], method, embeddings=ws["emb"], prompts=ws["prompts"], base=ws["base"],
                 out=d / "plugins", metrics=d / "metrics", plots=d / "plots", **kw)


def plugin(ws: dict[str, Any], tag: str, method: str = "stable_sam") -> dict[str, Any]:
    return read_plugin_file(ws["tmp"] / tag / "plugins" / f"{method}.pt", method)


def test_outputs_frozen_sam_and_plugin_only_weights(ws):
    frozen_before = frozen_checksum(load_base(ws["base"])[0])  # the base model's weights, before training
    res = run(ws, "stable_sam", "a")
    assert res["steps"] == 4 and res["samples"] == 16 and res["trainable_params"] == 77650
    assert res["batches_per_epoch"] == 3 and res["skipped_samples_without_prompt"] == 1  # 4 steps: 1 + 1/3 epochs
    assert res["final_loss"] > 0 and res["seconds"] > 0 and res["samples_per_s"] > 0
    before, after = res["sanity_iou"]["before"], res["sanity_iou"]["after"]
    assert before["views"] == after["views"] == {"train": 11, "eval": 3}  # every view with a non-empty GT
    for split in ("train", "eval"):
        assert set(before[split]) == set(after[split]) == {"gt_box", "noisy_box", "point_1"}
        assert all(0.0 <= v <= 100.0 for v in [*before[split].values(), *after[split].values()])
    saved = json.loads((ws["tmp"] / "a" / "metrics" / "stable_sam.json").read_text())
    assert saved["steps"] == 4
    csv = (ws["tmp"] / "a" / "plots" / "stable_sam_loss.csv").read_text().splitlines()
    assert csv[0] == "step,loss,lr" and len(csv) == 5 and csv[-1].startswith("4,")
    assert (ws["tmp"] / "a" / "plots" / "stable_sam_loss.png").stat().st_size > 1000

    pl = plugin(ws, "a")
    sam, info = load_base(ws["base"])
    assert pl["method"] == "stable_sam" and pl["base_sha256"] == info["checkpoint_sha256"]
    model = build_method("stable_sam", sam, ws["params"].plugin)
    assert set(pl["state_dict"]) == set(model.plugin_state_dict())  # trainable tensors only
    assert sum(v.numel() for v in pl["state_dict"].values()) == res["trainable_params"]
    sam_keys = set(sam.state_dict())
    assert not any(k in sam_keys for k in pl["state_dict"])
    # The plugin really moved away from its (identity) init, and SAM did not move at all.
    init = model.plugin_state_dict()
    assert any(not torch.equal(init[k], pl["state_dict"][k]) for k in init)
    assert res["sam_frozen_sha256"] == frozen_before == frozen_checksum(sam)  # SAM after training == before
    assert all(torch.equal(a, b) for a, b in zip(sam.state_dict().values(),
                                                   torch.load(ws["base"] / "sam.pt", weights_only=True).values()))


def test_frozen_checksum_detects_a_change():
    """Any moved frozen weight changes the checksum; an excluded (trainable) tensor may move freely."""
    sam = freeze(tiny_sam(IMG, GRID))
    token = sam.mask_decoder.iou_token.weight
    before, before_rest = frozen_checksum(sam), frozen_checksum(sam, exclude=[token])
    assert before_rest != before  # the excluded tensor is really left out
    with torch.no_grad():
        token[0, 0] += 1e-6
    assert frozen_checksum(sam) != before
    assert frozen_checksum(sam, exclude=[token]) == before_rest
    with torch.no_grad():
        next(sam.image_encoder.parameters()).view(-1)[0] += 1e-6  # a frozen weight the exclusion does not cover
    assert frozen_checksum(sam, exclude=[token]) != before_rest


def test_training_refuses_a_run_that_moved_frozen_sam(ws, monkeypatch):
    """A bug that changes a frozen SAM weight during training fails the run, and no plugin file is written."""
    import pipeline.training.train as train_mod

    real = train_mod.batch_loss

    def moving_batch_loss(model, *args, **kwargs):
        with torch.no_grad():  # the prompt encoder is SAM's own, shared with the method and frozen
            next(getattr(model, "module", model).prompt_encoder.parameters()).view(-1)[0] += 1e-3
        return real(model, *args, **kwargs)

    monkeypatch.setattr(train_mod, "batch_loss", moving_batch_loss)
    with pytest.raises(RuntimeError, match="frozen weights changed"):
        run(ws, "stable_sam", "moved", params=replace(ws["params"], **{"train.max_steps": 1}))
    assert not (ws["tmp"] / "moved" / "plugins" / "stable_sam.pt").exists()


def test_only_plugin_parameters_get_gradients(ws):
    sam, _ = load_base(ws["base"])
    model = build_method("stable_sam", sam, ws["params"].plugin).train()
    ctx = ddp.DistContext(0, 1, 0, torch.device("cpu"))
    stream = BatchStream(ws["params"], ws["emb"], load_train_prompts(ws["prompts"]),
                         model_frame(read_cache_meta(ws["emb"])), ctx, 4)
    samples = next(iter(stream))
    valid = [s for s in samples if s.prompt is not None]  # the fixture's empty view has no prompt
    assert len({s.prompt.signature for s in valid}) > 1 and all(s.target.shape == (IMG, IMG) for s in samples)
    loss, n = batch_loss(model, samples, ws["params"], torch.device("cpu"))
    assert n == len(valid) >= 3 and torch.isfinite(loss)
    (loss / n).backward()
    assert all(p.grad is None for p in sam.parameters())
    trainable = model.trainable_parameters()
    assert all(p.grad is not None for p in trainable)
    assert sum(p.grad.abs().sum().item() for p in trainable) > 0
    assert {id(p) for p in model.parameters() if p.grad is not None} == {id(p) for p in trainable}


def test_training_and_evaluation_forward_give_the_same_logits(ws):
    """A stored training prompt goes through the training forward (a mixed batch, grouped by signature) and
    through the predictor's evaluation path: identical tokens, so identical logits. Padding a point prompt
    with one ``label -1`` token (what training used to do) would change them: the check can fail."""
    from pipeline.data.embedding_reader import load_embedding_rows
    from pipeline.inference.predictor import Predictor
    from pipeline.inference.prompts import Prompt
    from pipeline.modeling.methods import PromptBatch

    sam, _ = load_base(ws["base"])
    model = build_method("stable_sam", sam, ws["params"].plugin)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.eval()
    frame = model_frame(read_cache_meta(ws["emb"]))
    table = load_train_prompts(ws["prompts"])
    stream = BatchStream(ws["params"], ws["emb"], table, frame, ddp.DistContext(0, 1, 0, torch.device("cpu")), 4)
    batches = iter(stream)
    samples = [s for _ in range(3) for s in next(batches)]
    predictor = Predictor(sam, model, postprocess=frame.mode)
    checked = set()
    with torch.no_grad():
        for members, logits in forward_samples(model, samples, torch.device("cpu"), multimask_output=False):
            rows = load_embedding_rows(ws["emb"], [s.view_id for s in members])
            for s, train_logits in zip(members, logits):
                row = rows[s.view_id]
                stored = table[s.view_id][s.epoch % len(table[s.view_id])]
                prompt = Prompt.from_row(stored, mask_logits=tuple(ws["params"].prompts.coarse_mask_logits),
                                         lowres_side=frame.lowres_side)
                predictor.set_embedding(row["embedding"], (row["height"], row["width"]), (row["input_h"], row["input_w"]))
                chunk = next(predictor.predict_prompts([prompt]))
                torch.testing.assert_close(chunk.low_res[0], train_logits[0], atol=1e-5, rtol=0)
                checked.add(stored["prompt_type"])
                if stored["prompt_type"] == "points":
                    pts = torch.from_numpy(s.prompt.points)[None]
                    padded = PromptBatch(points=torch.cat([pts, torch.zeros(1, 1, 2)], 1),
                                         point_labels=torch.tensor([[1] * pts.shape[1] + [-1]]))
                    out = model(s.embedding[None], padded).low_res_logits[0, 0]
                    assert (out - train_logits[0]).abs().max() > 1e-3
    assert {"points", "gt_box"} <= checked


def test_resume_is_exact(ws):
    straight = run(ws, "stable_sam", "straight")
    stopped = run(ws, "stable_sam", "resumed", stop_after=2)
    assert stopped == {"stopped_at": 2}
    assert not (ws["tmp"] / "resumed" / "plugins" / "stable_sam.pt").exists()
    assert load_checkpoint(ws["tmp"] / "resumed" / "plugins" / "stable_sam.ckpt")["step"] == 2
    resumed = run(ws, "stable_sam", "resumed", resume=True)
    a, b = plugin(ws, "straight")["state_dict"], plugin(ws, "resumed")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final_loss"] == straight["final_loss"] and resumed["steps"] == 4
    csv = lambda tag: (ws["tmp"] / tag / "plots" / "stable_sam_loss.csv").read_text()  # noqa: E731
    assert csv("straight") == csv("resumed")
    # A changed run refuses to resume from the old checkpoint (names the key).
    with pytest.raises(ValueError, match="train.lr"):
        run(ws, "stable_sam", "resumed", params=replace(ws["params"], **{"train.lr": 0.5}), resume=True)


def test_auto_resume_starts_over_when_the_run_changed(ws):
    """`dvc repro` passes --resume auto: a stale checkpoint (other lr) is set aside, not resumed."""
    other = replace(ws["params"], **{"train.lr": 5e-3})
    run(ws, "stable_sam", "auto", stop_after=2, checkpoints=ws["tmp"] / "ck")
    auto = run(ws, "stable_sam", "auto", params=other, resume="auto", checkpoints=ws["tmp"] / "ck")
    run(ws, "stable_sam", "fresh", params=other)
    a, b = plugin(ws, "auto")["state_dict"], plugin(ws, "fresh")["state_dict"]
    assert auto["steps"] == 4 and all(torch.equal(a[k], b[k]) for k in a)
    assert (ws["tmp"] / "ck" / "stable_sam.ckpt").is_file()
    assert not (ws["tmp"] / "auto" / "plugins" / "stable_sam.ckpt").exists()


def test_sam_method_writes_an_empty_plugin_and_pt_sam_trains(ws):
    res = run(ws, "sam", "sam")
    assert res["trainable_params"] == 0 and res["steps"] == 0
    assert plugin(ws, "sam", "sam")["state_dict"] == {}
    assert (ws["tmp"] / "sam" / "metrics" / "sam.json").is_file()
    assert (ws["tmp"] / "sam" / "plots" / "sam_loss.csv").read_text() == "step,loss,lr\n"
    res = run(ws, "pt_sam", "pt", params=replace(ws["params"], **{"train.max_steps": 1}))
    assert res["trainable_params"] == 5 * 256 and res["steps"] == 1


def test_drp_lr_scale_speeds_up_only_the_router(ws):
    """train.drp_lr_scale multiplies the DRP's lr alone: its own Adam group, a router that moves further."""
    model = build_method("stable_sam", tiny_sam(), ws["params"].plugin)
    groups = param_groups(model, replace(ws["params"], **{"train.drp_lr_scale": 10.0}).train)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [g["lr_scale"] for g in groups] == [1.0, 10.0]
    assert all(".router." in names[id(p)] for p in groups[1]["params"])
    assert not any(".router." in names[id(p)] for p in groups[0]["params"])
    assert sum(p.numel() for g in groups for p in g["params"]) == model.num_trainable
    assert [g["lr_scale"] for g in param_groups(build_method("pt_sam", tiny_sam(), ws["params"].plugin),
                                                 ws["params"].train)] == [1.0]
    one = replace(ws["params"], **{"train.max_steps": 2})
    run(ws, "stable_sam", "drp1", params=one)
    run(ws, "stable_sam", "drp10", params=replace(one, **{"train.drp_lr_scale": 10.0}))
    init = build_method("stable_sam", tiny_sam(), ws["params"].plugin).plugin_state_dict()
    key = "transformer.layer.router.fc2.bias"
    moved = {t: (plugin(ws, t)["state_dict"][key] - init[key]).abs().max().item() for t in ("drp1", "drp10")}
    assert moved["drp10"] > 5 * moved["drp1"] > 0


def test_dataloader_workers_give_the_same_run(ws):
    run(ws, "stable_sam", "w0", params=replace(ws["params"], **{"train.max_steps": 2}))
    run(ws, "stable_sam", "w2", params=replace(ws["params"], **{"train.max_steps": 2, "train.num_workers": 2}))
    a, b = plugin(ws, "w0")["state_dict"], plugin(ws, "w2")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rng_state_round_trip_weights_only(tmp_path):
    state = capture_rng()
    save_checkpoint(tmp_path / "c.ckpt", {"rng": state})
    a = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    restore_rng(load_checkpoint(tmp_path / "c.ckpt")["rng"])
    b = (torch.rand(3), __import__("numpy").random.rand(), __import__("random").random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


# ---------------------------------------------------------------------------------------------- DDP
def _ddp_worker(rank: int, world: int, port: int, ws: dict[str, Any], method: str, tag: str) -> None:
    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    run(ws, method, tag)


@pytest.mark.slow
def test_ddp_two_ranks_match_one_process(ws):
    """Same total batch on 2 gloo ranks = one process, to float tolerance.

    Checked on ``dsp``: with ``stable_sam`` the untrained DSP returns its input exactly, so the gradient
    reaching the router's α is exactly 0 in exact arithmetic and ~1e-11 of rounding noise in practice;
    Adam normalises such gradients, so the router's first steps follow the noise and two runs that
    differ only in batching (hence rounding) drift apart by ~lr. That is the init's saddle, not DDP.
    """
    import torch.multiprocessing as mp

    single = run(ws, "dsp", "single")
    mp.spawn(_ddp_worker, args=(2, free_port(), ws, "dsp", "ddp"), nprocs=2, join=True)
    a, b = plugin(ws, "single", "dsp")["state_dict"], plugin(ws, "ddp", "dsp")["state_dict"]
    init = build_method("dsp", load_base(ws["base"])[0], ws["params"].plugin).plugin_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-3)  # float sums ordered differently per rank
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # not two untrained plugins
    metrics = json.loads((ws["tmp"] / "ddp" / "metrics" / "dsp.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == single["steps"]
    assert metrics["final_loss"] == pytest.approx(single["final_loss"], rel=1e-5)
