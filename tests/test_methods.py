"""The method registry (docs/METHOD.md §2.5-2.6): equivalence with vanilla SAM, frozen SAM, budgets, checkpoints.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_methods.py -q
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import PluginConfig
from pipeline.modeling.dsp import DeformableSampling
from pipeline.modeling.methods import METHODS, PromptableDecoder, PromptBatch, build_method
from tests.fakes import C, make_sam

PLUGIN = PluginConfig(dsp_offset_range=4.0, dsp_resample_pe=False, drp_hidden=16, drp_token_index=1,
                      drp_norm="softmax", drp_init_alpha1=0.5)
B = 3


def _prompts(kind: str, grid: int = 8, seed: int = 0) -> PromptBatch:
    g = torch.Generator().manual_seed(seed)
    img = 16 * grid
    xy = torch.rand(B, 2, 2, generator=g) * img
    boxes = torch.cat([xy.min(1).values, xy.max(1).values], dim=1)
    points = torch.rand(B, 3, 2, generator=g) * img
    labels = torch.tensor([[1, 1, 0], [1, -1, -1], [0, 1, -1]])  # rows padded with SAM's not-a-point
    masks = torch.randn(B, 1, 4 * grid, 4 * grid, generator=g) * 5
    return {
        "box": PromptBatch(boxes=boxes),
        "points": PromptBatch(points=points, point_labels=labels),
        "box+points": PromptBatch(boxes=boxes, points=points, point_labels=labels),
        "mask": PromptBatch(mask_inputs=masks),
        "box+mask": PromptBatch(boxes=boxes, mask_inputs=masks),
    }[kind]


def _embeddings(grid: int = 8, seed: int = 1) -> torch.Tensor:
    return torch.randn(B, C, grid, grid, generator=torch.Generator().manual_seed(seed))


def _vanilla(sam, emb: torch.Tensor, p: PromptBatch, multimask: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's own per-image path: prompt_encoder + mask_decoder on one embedding at a time."""
    logits, ious = [], []
    for i in range(emb.shape[0]):
        pts = None if p.points is None else (p.points[i : i + 1], p.point_labels[i : i + 1])
        sparse, dense = sam.prompt_encoder(
            points=pts,
            boxes=None if p.boxes is None else p.boxes[i : i + 1],
            masks=None if p.mask_inputs is None else p.mask_inputs[i : i + 1],
        )
        lo, io = sam.mask_decoder(image_embeddings=emb[i : i + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                                  sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                  multimask_output=multimask)
        logits.append(lo)
        ious.append(io)
    return torch.cat(logits), torch.cat(ious)


def _perturb_plugins(model: PromptableDecoder, std: float = 0.05) -> None:
    """Make the plugins 'trained': nonzero offsets, token-dependent α."""
    torch.manual_seed(123)
    with torch.no_grad():
        for p in model.transformer.layer.sampler.parameters():
            p.add_(torch.randn_like(p) * std)
        if model.transformer.layer.router is not None:
            for p in model.transformer.layer.router.parameters():
                p.add_(torch.randn_like(p) * 0.5)


# ------------------------------------------------------------------------------------ registry
def test_registry_names_and_unsupported_methods():
    assert METHODS == ("sam", "dsp", "stable_sam", "dt_sam", "pt_sam", "spatial_attention", "stable_sam_ft_decoder")
    sam = make_sam()
    with pytest.raises(ValueError, match="unknown method"):
        build_method("stable-sam", sam, PLUGIN)
    with pytest.raises(ValueError, match="intermediate"):
        build_method("hq_sam", sam, PLUGIN)
    with pytest.raises(ValueError, match="image encoder"):
        build_method("lora", sam, PLUGIN)


# --------------------------------------------------------------------------------- equivalence
EQUIVALENT = [
    ("sam", None, False),
    ("dsp", (0.0, 1.0), True),  # forced α: a trained DSP is bypassed
    ("stable_sam", (0.0, 1.0), True),
    ("spatial_attention", (0.0, 1.0), True),
    ("stable_sam_ft_decoder", (0.0, 1.0), True),
    ("dsp", None, False),  # untrained plugins (identity init) are SAM
    ("stable_sam", None, False),
    ("spatial_attention", None, False),
    ("dt_sam", None, False),
    ("pt_sam", None, False),
    ("stable_sam_ft_decoder", None, False),
]


_IDS = [f"{n}-{'forced' if f else 'init'}" for n, f, _ in EQUIVALENT]


@pytest.mark.parametrize("name,force,perturb", EQUIVALENT, ids=_IDS)
def test_method_reproduces_vanilla_sam(name, force, perturb):
    sam = make_sam()
    model = build_method(name, sam, PLUGIN, force_alpha=force)
    if perturb:
        _perturb_plugins(model)
    emb = _embeddings()
    with torch.no_grad():
        for kind in ("box", "points", "box+points", "mask", "box+mask"):
            p = _prompts(kind)
            for multimask in (False, True):
                out = model(emb, p, multimask_output=multimask)
                ref_l, ref_i = _vanilla(sam, emb, p, multimask)
                assert out.low_res_logits.shape == ref_l.shape == (B, 3 if multimask else 1, 32, 32)
                torch.testing.assert_close(out.low_res_logits, ref_l, atol=1e-5, rtol=1e-5, msg=f"{kind} {multimask}")
                torch.testing.assert_close(out.iou_pred, ref_i, atol=1e-5, rtol=1e-5, msg=f"{kind} {multimask}")


def test_forced_equivalence_with_resampled_pe():
    sam = make_sam()
    model = build_method("stable_sam", sam, dataclasses.replace(PLUGIN, dsp_resample_pe=True), force_alpha=(0.0, 1.0))
    _perturb_plugins(model)
    emb, p = _embeddings(), _prompts("box+points")
    with torch.no_grad():
        out = model(emb, p)
        torch.testing.assert_close(out.low_res_logits, _vanilla(sam, emb, p, False)[0], atol=1e-5, rtol=1e-5)
        model.set_force_alpha(None)
        assert (model(emb, p).low_res_logits - out.low_res_logits).abs().max() > 1e-4


def test_zero_mean_dsp_is_built_from_the_params_and_still_starts_as_sam():
    """``plugin.dsp_zero_mean`` reaches the DSP of every DSP method; untrained, the method is still SAM."""
    sam = make_sam()
    emb, p = _embeddings(), _prompts("box")
    for method in ("dsp", "stable_sam"):
        model = build_method(method, sam, dataclasses.replace(PLUGIN, dsp_zero_mean=True))
        dsps = [m for m in model.modules() if isinstance(m, DeformableSampling)]
        assert len(dsps) == 1 and dsps[0].zero_mean
        with torch.no_grad():
            torch.testing.assert_close(model(emb, p).low_res_logits, _vanilla(sam, emb, p, False)[0], atol=1e-5, rtol=1e-5)
    assert not [m for m in build_method("stable_sam", sam, PLUGIN).modules() if isinstance(m, DeformableSampling)][0].zero_mean


def test_trained_plugins_change_the_output_and_report_alpha():
    sam = make_sam()
    emb, p = _embeddings(), _prompts("box")
    with torch.no_grad():
        ref = _vanilla(sam, emb, p, False)[0]
        for name in ("dsp", "stable_sam", "spatial_attention"):
            model = build_method(name, sam, PLUGIN)
            _perturb_plugins(model)
            out = model(emb, p)
            assert (out.low_res_logits - ref).abs().max() > 1e-3, name
            if name == "dsp":
                assert out.alpha is None
            else:
                assert out.alpha.shape == (B, 2)
                torch.testing.assert_close(out.alpha.sum(-1), torch.ones(B))
                assert (out.alpha[:, 0].max() - out.alpha[:, 0].min()) > 1e-4  # prompt-dependent
        assert build_method("sam", sam, PLUGIN)(emb, p).alpha is None
        forced = build_method("stable_sam", sam, PLUGIN, force_alpha=(0.25, 0.75))(emb, p).alpha
        torch.testing.assert_close(forced, torch.tensor([[0.25, 0.75]]).expand(B, 2))


def test_padding_point_coordinates_are_ignored():
    sam = make_sam()
    model = build_method("stable_sam", sam, PLUGIN)
    _perturb_plugins(model)
    p = _prompts("points")
    moved = p.points.clone()
    moved[p.point_labels == -1] = torch.tensor([77.0, 5.0])
    emb = _embeddings()
    with torch.no_grad():
        a = model(emb, p).low_res_logits
        b = model(emb, PromptBatch(points=moved, point_labels=p.point_labels)).low_res_logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("grid", [8, 16])
def test_any_grid(grid):
    sam = make_sam(grid=grid)
    model = build_method("stable_sam", sam, PLUGIN)
    _perturb_plugins(model)
    with torch.no_grad():
        out = model(_embeddings(grid), _prompts("box+points", grid=grid), multimask_output=True)
    assert out.low_res_logits.shape == (B, 3, 4 * grid, 4 * grid) and out.iou_pred.shape == (B, 3)
    assert torch.isfinite(out.low_res_logits).all()


def test_one_embedding_many_prompts_via_expand():
    sam = make_sam()
    model = build_method("sam", sam, PLUGIN)
    emb = _embeddings()[:1]
    p = _prompts("box")
    with torch.no_grad():
        out = model(emb.expand(B, -1, -1, -1), p, multimask_output=True)
        ref_l, ref_i = sam.mask_decoder(image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
                                        sparse_prompt_embeddings=sam.prompt_encoder(None, p.boxes, None)[0],
                                        dense_prompt_embeddings=sam.prompt_encoder(None, p.boxes, None)[1],
                                        multimask_output=True)
    torch.testing.assert_close(out.low_res_logits, ref_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.iou_pred, ref_i, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- budgets and freezing
def test_trainable_parameter_counts():
    sam = make_sam()
    counts = {name: build_method(name, sam, PLUGIN).num_trainable for name in METHODS}
    print("trainable parameters at C=256:", counts)
    assert 70_000 <= counts["stable_sam"] <= 90_000  # docs/METHOD.md §2.4: "0.08 M"
    assert counts["stable_sam"] == 73_472 + 4_178
    assert counts["dsp"] == 73_472
    assert counts["sam"] == 0
    assert counts["pt_sam"] == 5 * C
    decoder = sum(p.numel() for p in sam.mask_decoder.parameters())
    assert counts["dt_sam"] == decoder
    assert counts["stable_sam_ft_decoder"] == decoder + counts["stable_sam"]
    assert abs(counts["spatial_attention"] - counts["stable_sam"]) < 1_000  # the same budget


@pytest.mark.parametrize("name", [m for m in METHODS if m != "sam"])
def test_optimizer_step_leaves_sam_bit_identical(name):
    sam = make_sam()
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    model = build_method(name, sam, PLUGIN).train()
    assert not model.prompt_encoder.training
    assert all(not p.requires_grad for p in sam.parameters())
    assert not any(p.requires_grad for p in model.prompt_encoder.parameters())
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    emb, p = _embeddings(), _prompts("box+points")
    target = (torch.rand(B, 1, 32, 32, generator=torch.Generator().manual_seed(2)) > 0.5).float()
    for _ in range(2):
        opt.zero_grad()
        out = model(emb, p)
        loss = F.binary_cross_entropy_with_logits(out.low_res_logits, target) + out.iou_pred.square().mean()
        loss.backward()
        opt.step()
    for k, v in sam.state_dict().items():
        assert torch.equal(v, before[k]), f"SAM tensor {k} changed"
    # single-mask output: the multimask tokens' hypernetworks are not run, so they get no gradient (and stay put)
    unused = tuple(f"output_hypernetworks_mlps.{i}." for i in range(1, 4))
    for n, prm in model.named_parameters():
        if prm.requires_grad and any(u in n for u in unused):
            assert prm.grad is None and torch.equal(prm, trainable[n]), n
        elif prm.requires_grad:
            assert prm.grad is not None, n
        else:
            assert prm.grad is None, f"frozen {n} got a gradient"
    changed = [n for n, prm in model.named_parameters() if prm.requires_grad and not torch.equal(prm, trainable[n])]
    assert changed, "the optimizer step changed nothing"
    if model.has_router:  # after DSP moved off the identity, DRP gets a gradient too
        router = model.transformer.layer.router
        assert router.fc2.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------ checkpoints
def test_plugin_state_dict_round_trip(tmp_path):
    sam = make_sam()
    model = build_method("stable_sam", sam, PLUGIN)
    _perturb_plugins(model)
    sd = model.plugin_state_dict()
    assert sum(v.numel() for v in sd.values()) == model.num_trainable
    assert all(k.startswith(("transformer.layer.sampler.", "transformer.layer.router.")) for k in sd), list(sd)
    torch.save(sd, tmp_path / "plugin.pt")
    fresh = build_method("stable_sam", sam, PLUGIN)
    emb, p = _embeddings(), _prompts("box")
    with torch.no_grad():
        assert not torch.equal(fresh(emb, p).low_res_logits, model(emb, p).low_res_logits)
        fresh.load_plugin_state_dict(torch.load(tmp_path / "plugin.pt", weights_only=True))
        torch.testing.assert_close(fresh(emb, p).low_res_logits, model(emb, p).low_res_logits, atol=0, rtol=0)
    with pytest.raises(ValueError, match="unexpected"):
        build_method("dsp", sam, PLUGIN).load_plugin_state_dict(sd)
    with pytest.raises(ValueError, match="shape"):
        build_method("stable_sam", sam, dataclasses.replace(PLUGIN, drp_hidden=8)).load_plugin_state_dict(sd)
    with pytest.raises(ValueError, match="missing"):
        model.load_plugin_state_dict({k: v for k, v in list(sd.items())[1:]})


def test_decoder_methods_save_their_own_copy():
    sam = make_sam()
    model = build_method("pt_sam", sam, PLUGIN)
    assert model.mask_decoder is not sam.mask_decoder
    assert sorted(model.plugin_state_dict()) == ["mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"]
    dt = build_method("dt_sam", sam, PLUGIN)
    assert len(dt.plugin_state_dict()) == len(list(sam.mask_decoder.parameters()))
    assert not any(k.startswith("prompt_encoder") for k in dt.plugin_state_dict())


# ------------------------------------------------------------------------------------- validation
def test_bad_prompts_and_embeddings_fail_clearly():
    sam = make_sam()
    model = build_method("sam", sam, PLUGIN)
    emb = _embeddings()
    with pytest.raises(ValueError, match="boxes"):
        model(emb, PromptBatch(boxes=torch.zeros(2, 4)))
    with pytest.raises(ValueError, match="point_labels"):
        model(emb, PromptBatch(points=torch.zeros(B, 1, 2), point_labels=torch.full((B, 1), 2)))
    with pytest.raises(ValueError, match="together"):
        model(emb, PromptBatch(points=torch.zeros(B, 1, 2)))
    with pytest.raises(ValueError, match="mask_inputs"):
        model(emb, PromptBatch(mask_inputs=torch.zeros(B, 1, 16, 16)))
    with pytest.raises(ValueError, match="grid"):
        model(torch.zeros(B, C, 16, 16), _prompts("box"))
    with pytest.raises(ValueError, match="no patched layer"):
        model.set_force_alpha((0.0, 1.0))
