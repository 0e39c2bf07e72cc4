"""DSP, DRP, the patched layer-2 block and the batched decoder (docs/METHOD.md §2.1-2.5), on a tiny random SAM.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_plugins.py -q
"""
from __future__ import annotations

import pytest
import torch
from segment_anything.modeling import Sam
from torch import nn

from pipeline.modeling.decoder import decode, decode_with_alpha
from pipeline.modeling.drp import DynamicRouting
from pipeline.modeling.dsp import DeformableSampling, base_grid, map_to_seq, sample, seq_to_map
from pipeline.modeling.patched_transformer import PatchedAttentionBlock, PatchedTwoWayTransformer
from pipeline.modeling.spatial_attention import SpatialAttention
from tests.fakes import C, make_sam


def _randomise(module: nn.Module, std: float = 0.05) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * std)


# ---------------------------------------------------------------------------------------------- DSP
@pytest.mark.parametrize("hw", [(8, 8), (16, 16), (6, 10)])
def test_untrained_dsp_returns_its_input(hw):
    torch.manual_seed(0)
    dsp = DeformableSampling(channels=C, offset_range=4.0)
    x = torch.randn(2, hw[0] * hw[1], C)
    out, grid = dsp(x, hw)
    assert out.shape == x.shape and grid.shape == (2, hw[0], hw[1], 2)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_dsp_parameter_count_matches_spec():
    # docs/METHOD.md §2.4: 65,792 + 6,656 + 512 + 512
    assert DeformableSampling(channels=C).num_parameters() == 73_472


def test_constant_one_cell_offset_equals_rolled_map():
    torch.manual_seed(0)
    h, w = 8, 8
    x = torch.randn(2, 5, h, w)
    grid = base_grid(h, w, device=x.device, dtype=x.dtype).expand(2, -1, -1, -1).clone()
    grid[..., 0] += 2.0 / (w - 1)  # +1 cell in x: cell (i, j) reads (i, j+1)
    out = sample(x, grid)
    torch.testing.assert_close(out[..., :-1], torch.roll(x, -1, dims=-1)[..., :-1], atol=1e-5, rtol=1e-5)
    assert out[..., -1].abs().max() < 1e-5  # reads outside the map: zero padding
    grid = base_grid(h, w, device=x.device, dtype=x.dtype).expand(2, -1, -1, -1).clone()
    grid[..., 1] -= 2.0 / (h - 1)  # -1 cell in y: row i reads row i-1
    out = sample(x, grid)
    torch.testing.assert_close(out[..., 1:, :], torch.roll(x, 1, dims=-2)[..., 1:, :], atol=1e-5, rtol=1e-5)


def test_dsp_forward_uses_its_offsets(monkeypatch):
    torch.manual_seed(0)
    h, w = 8, 8
    dsp = DeformableSampling(channels=C)
    x = torch.randn(1, h * w, C)

    def one_cell_right(x_star):
        d = torch.zeros(x_star.shape[0], h, w, 2)
        d[..., 0] = 2.0 / (w - 1)
        return d

    monkeypatch.setattr(dsp, "offsets", one_cell_right)
    out, _ = dsp(x, (h, w))
    rolled = map_to_seq(torch.roll(seq_to_map(x, (h, w)), -1, dims=-1))
    inner = seq_to_map(out, (h, w))[..., :-1]
    torch.testing.assert_close(inner, seq_to_map(rolled, (h, w))[..., :-1], atol=1e-5, rtol=1e-5)


def test_dsp_offsets_are_bounded_and_trainable():
    torch.manual_seed(0)
    h = w = 8
    dsp = DeformableSampling(channels=C, offset_range=2.0)
    with torch.no_grad():
        dsp.offset_net[-1].weight.normal_(0, 5.0)  # saturate tanh
    x = torch.randn(2, h * w, C)
    x_star = dsp.proj(seq_to_map(x, (h, w)))
    cells = dsp.offsets(x_star) / torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)])
    assert cells.abs().max() <= 2.0 + 1e-5 and cells.abs().max() > 1.0
    out, _ = dsp(x, (h, w))
    assert (out - x).abs().max() > 1e-2  # features really moved
    out.square().mean().backward()
    for name, p in dsp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_zero_mean_dsp_cannot_translate_the_whole_map():
    """``zero_mean``: each map's raw offsets have mean 0 before the tanh bound. An all-positive last weight reads
    GELU's positive mean at every cell: the plain DSP then shifts the whole map, the zero-mean one does not."""
    torch.manual_seed(0)
    h = w = 6
    x = torch.randn(2, h * w, C)
    plain, centred = DeformableSampling(channels=C), DeformableSampling(channels=C, zero_mean=True)
    centred.load_state_dict(plain.state_dict())
    unit = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)])

    def cells(dsp: DeformableSampling) -> torch.Tensor:
        return dsp.offsets(dsp.proj(seq_to_map(x, (h, w)))) / unit  # (B, H, W, 2) in grid cells

    with torch.no_grad():
        for dsp in (plain, centred):
            dsp.offset_net[-1].weight.normal_(0, 0.02)
        raw = torch.atanh(cells(centred) / centred.offset_range)
        assert raw.mean(dim=(1, 2)).abs().max() < 1e-4 and raw.abs().max() > 1e-2
        for dsp in (plain, centred):
            dsp.offset_net[-1].weight.fill_(0.02)
        plain_shift = cells(plain).mean(dim=(1, 2)).norm(dim=-1)  # (B,) mean offset of each map
        centred_shift = cells(centred).mean(dim=(1, 2)).norm(dim=-1)
    assert (plain_shift > 0.5).all() and (centred_shift < 0.1 * plain_shift).all()


def test_dsp_rejects_a_one_cell_grid():
    with pytest.raises(ValueError, match="2x2"):
        DeformableSampling(channels=C)(torch.randn(1, 1, C), (1, 1))


# ---------------------------------------------------------------------------------------------- DRP
def test_drp_initial_alpha_and_parameter_count():
    torch.manual_seed(0)
    tokens = torch.randn(4, C) * 3
    drp = DynamicRouting(channels=C, hidden=16)
    assert drp.num_parameters() == 256 * 16 + 16 + 32 + 16 * 2 + 2  # 4,178
    torch.testing.assert_close(drp(tokens), torch.full((4, 2), 0.5))
    a = DynamicRouting(channels=C, hidden=16, init_alpha1=0.3)(tokens)
    torch.testing.assert_close(a, torch.tensor([[0.3, 0.7]]).expand(4, 2))
    s = DynamicRouting(channels=C, hidden=16, norm="sigmoid", init_alpha1=0.3)(tokens)
    torch.testing.assert_close(s, torch.tensor([[0.3, 0.7]]).expand(4, 2))


def test_drp_depends_on_the_token_once_trained():
    torch.manual_seed(0)
    drp = DynamicRouting(channels=C, hidden=16)
    _randomise(drp, 0.5)
    a = drp(torch.randn(4, C))
    torch.testing.assert_close(a.sum(-1), torch.ones(4))
    assert (a[:, 0].max() - a[:, 0].min()) > 1e-3


def test_spatial_attention_identity_init_and_budget():
    torch.manual_seed(0)
    sa = SpatialAttention(channels=C)
    assert 70_000 <= sa.num_parameters() <= 75_000
    x = torch.randn(2, 64, C)
    out, grid = sa(x, (8, 8))
    assert grid is None
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)
    _randomise(sa.score_net, 0.5)
    assert (sa(x, (8, 8))[0] - x).abs().max() > 1e-3


# ------------------------------------------------------------------------------- patched layer 2
def _block_inputs(sam: Sam, batch: int = 2, tokens: int = 7, grid: int = 8):
    torch.manual_seed(1)
    queries = torch.randn(batch, tokens, C)
    query_pe = torch.randn(batch, tokens, C)
    keys = torch.randn(batch, grid * grid, C)
    key_pe = sam.prompt_encoder.get_dense_pe().flatten(2).permute(0, 2, 1).expand(batch, -1, -1)
    return queries, keys, query_pe, key_pe


def _patched(sam: Sam, **kw) -> PatchedAttentionBlock:
    dsp = DeformableSampling(channels=C, offset_range=4.0)
    _randomise(dsp, 0.05)  # a "trained" DSP with nonzero offsets
    kw.setdefault("router", DynamicRouting(channels=C))
    return PatchedAttentionBlock(sam.mask_decoder.transformer.layers[1], sampler=dsp, **kw)


def test_forced_alpha_0_1_reproduces_the_original_block():
    sam = make_sam()
    q, k, qpe, kpe = _block_inputs(sam)
    block = sam.mask_decoder.transformer.layers[1]
    ref_q, ref_k = block(queries=q, keys=k, query_pe=qpe, key_pe=kpe)
    patched = _patched(sam)
    patched.force_alpha = (0.0, 1.0)
    out_q, out_k, alpha = patched(q, k, qpe, kpe, (8, 8))
    torch.testing.assert_close(out_q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_k, ref_k, atol=1e-5, rtol=1e-5)
    assert alpha.shape == (2, 2)
    patched.force_alpha = (1.0, 0.0)  # the deformed branch really changes the result
    assert (patched(q, k, qpe, kpe, (8, 8))[0] - ref_q).abs().max() > 1e-4


def test_only_token_to_image_attention_sees_the_mixture():
    sam = make_sam()
    q, k, qpe, kpe = _block_inputs(sam)
    patched = _patched(sam, router=None, fixed_alpha=(1.0, 0.0))
    blk = patched.block
    seen: dict[str, dict] = {}

    def grab(name):
        def hook(module, args, kwargs, out):
            seen[name] = kwargs
        return hook

    handles = [blk.cross_attn_token_to_image.register_forward_hook(grab("t2i"), with_kwargs=True),
               blk.cross_attn_image_to_token.register_forward_hook(grab("i2t"), with_kwargs=True)]
    patched(q, k, qpe, kpe, (8, 8))
    for h in handles:
        h.remove()
    deformed, _ = patched.sampler(k, (8, 8))
    torch.testing.assert_close(seen["t2i"]["v"], deformed)  # values = x' = DSP(x_p) with α = (1, 0)
    torch.testing.assert_close(seen["t2i"]["k"], deformed + kpe)  # keys = x' + PE at the original grid
    torch.testing.assert_close(seen["i2t"]["q"], k + kpe)  # image-to-token still uses the original x_p


def test_resample_pe_reads_the_pe_at_the_offsets():
    sam = make_sam()
    q, k, qpe, kpe = _block_inputs(sam)
    torch.manual_seed(3)
    dsp = DeformableSampling(channels=C)
    with torch.no_grad():
        dsp.offset_net[-1].weight.normal_(0, 1.0)
    outs = []
    for resample in (False, True):
        blk = PatchedAttentionBlock(sam.mask_decoder.transformer.layers[1], sampler=dsp, router=None,
                                    fixed_alpha=(1.0, 0.0), resample_pe=resample)
        outs.append(blk(q, k, qpe, kpe, (8, 8))[0])
    assert (outs[0] - outs[1]).abs().max() > 1e-4
    nn.init.zeros_(dsp.offset_net[-1].weight)  # no offsets: resampled PE == PE
    outs = [PatchedAttentionBlock(sam.mask_decoder.transformer.layers[1], sampler=dsp, router=None,
                                  fixed_alpha=(1.0, 0.0), resample_pe=r)(q, k, qpe, kpe, (8, 8))[0]
            for r in (False, True)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


def test_drp_reads_the_configured_token():
    sam = make_sam()
    q, k, qpe, kpe = _block_inputs(sam)
    router = DynamicRouting(channels=C)
    _randomise(router, 0.5)
    got = {}
    router.register_forward_hook(lambda m, args, out: got.setdefault("token", args[0]))
    patched = _patched(sam, router=router, token_index=2)
    patched(q, k, qpe, kpe, (8, 8))
    blk = patched.block
    ref = blk.norm1(q + blk.self_attn(q=q + qpe, k=q + qpe, v=q))[:, 2]
    torch.testing.assert_close(got["token"], ref)
    with pytest.raises(ValueError, match="out of range"):
        _patched(sam, token_index=9)(q, k, qpe, kpe, (8, 8))


def test_patched_transformer_refuses_a_copied_block():
    import copy

    sam = make_sam()
    tr = sam.mask_decoder.transformer
    blk = PatchedAttentionBlock(copy.deepcopy(tr.layers[1]), sampler=DeformableSampling(channels=C),
                                fixed_alpha=(1.0, 0.0))
    with pytest.raises(ValueError, match="not a copy"):
        PatchedTwoWayTransformer(tr, blk)


# ------------------------------------------------------------------------------- batched decoder
def _prompt_embeddings(sam: Sam, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    img = sam.image_encoder.img_size
    xy = torch.rand(batch, 2, 2, generator=g) * img
    boxes = torch.cat([xy.min(1).values, xy.max(1).values], dim=1)
    pts = torch.rand(batch, 3, 2, generator=g) * img
    labels = torch.tensor([[1, 0, -1]]).expand(batch, -1)
    return sam.prompt_encoder(points=(pts, labels), boxes=boxes, masks=None)


@pytest.mark.parametrize("multimask", [False, True])
def test_batched_decode_equals_per_image_path(multimask):
    sam = make_sam()
    torch.manual_seed(5)
    emb = torch.randn(3, C, 8, 8)
    sparse, dense = _prompt_embeddings(sam, 3, seed=6)
    pe = sam.prompt_encoder.get_dense_pe()
    logits, iou, tokens = decode(sam.mask_decoder, emb, pe, sparse, dense, multimask)
    m = 3 if multimask else 1
    assert logits.shape == (3, m, 32, 32) and iou.shape == (3, m) and tokens.shape == (3, 5 + 5, C)
    for i in range(3):
        ref_l, ref_i = sam.mask_decoder(image_embeddings=emb[i : i + 1], image_pe=pe,
                                        sparse_prompt_embeddings=sparse[i : i + 1],
                                        dense_prompt_embeddings=dense[i : i + 1], multimask_output=multimask)
        torch.testing.assert_close(logits[i : i + 1], ref_l, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(iou[i : i + 1], ref_i, atol=1e-5, rtol=1e-5)


def test_decode_one_embedding_many_prompts_equals_sam():
    sam = make_sam()
    torch.manual_seed(7)
    emb = torch.randn(1, C, 8, 8)
    sparse, dense = _prompt_embeddings(sam, 4, seed=8)
    pe = sam.prompt_encoder.get_dense_pe()
    res = decode_with_alpha(sam.mask_decoder, emb.expand(4, -1, -1, -1), pe, sparse, dense, True)
    ref_l, ref_i = sam.mask_decoder(image_embeddings=emb, image_pe=pe, sparse_prompt_embeddings=sparse,
                                    dense_prompt_embeddings=dense, multimask_output=True)
    torch.testing.assert_close(res.low_res_logits, ref_l, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(res.iou_pred, ref_i, atol=1e-5, rtol=1e-5)
    assert res.alpha is None


def test_decode_rejects_mismatched_shapes():
    sam = make_sam()
    sparse, dense = _prompt_embeddings(sam, 2, seed=0)
    pe = sam.prompt_encoder.get_dense_pe()
    with pytest.raises(ValueError, match="sparse"):
        decode(sam.mask_decoder, torch.randn(3, C, 8, 8), pe, sparse, torch.randn(3, C, 8, 8), False)
    with pytest.raises(ValueError, match="dense"):
        decode(sam.mask_decoder, torch.randn(2, C, 8, 8), pe, sparse, torch.randn(2, C, 4, 4), False)


# ------------------------------------------------------------------------------- exact rewrites
def _conv_reference_dsp(dsp: DeformableSampling, x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """DSP as the paper's figure reads, module by module on (B, C, H, W) maps: the reference of the fast path."""
    h, w = hw
    x_star = dsp.proj(seq_to_map(x, hw))
    raw = dsp.offset_net(x_star).permute(0, 2, 3, 1)
    cells = torch.tensor([2.0 / (w - 1), 2.0 / (h - 1)])
    grid = base_grid(h, w, device=x.device, dtype=raw.dtype) + torch.tanh(raw) * dsp.offset_range * cells
    return map_to_seq(sample(x_star, grid))


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_dsp_fast_path_equals_the_module_by_module_reference(hw):
    torch.manual_seed(11)
    dsp = DeformableSampling(channels=C)
    with torch.no_grad():  # a trained-looking DSP: non-identity projection, real offsets
        for p in dsp.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(3, hw[0] * hw[1], C, requires_grad=True)
    out, _ = dsp(x, hw)
    ref = _conv_reference_dsp(dsp, x, hw)
    assert (ref - x).abs().max() > 0.1  # the offsets move the read
    torch.testing.assert_close(out, ref, atol=2e-4, rtol=1e-4)  # float32 sums of 256 terms, reordered
    g_out = torch.autograd.grad(out.square().sum(), [x, dsp.proj.weight])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, dsp.proj.weight])
    for a, b in zip(g_out, g_ref):  # gradients reach ~1e4 here: compare relative to the largest
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max()


def test_patched_transformer_with_identity_routing_equals_sam_transformer():
    """The sequence path of the patched transformer (shared keys + PE per layer) with α = (0, 1) is SAM's
    ``TwoWayTransformer.forward``."""
    sam = make_sam()
    tr = sam.mask_decoder.transformer
    dsp = DeformableSampling(channels=C)
    with torch.no_grad():
        dsp.offset_net[-1].weight.normal_()
    patched = PatchedTwoWayTransformer(tr, PatchedAttentionBlock(tr.layers[1], sampler=dsp, fixed_alpha=(0.0, 1.0)))
    torch.manual_seed(12)
    emb, pe, tokens = torch.randn(2, C, 8, 8), torch.randn(1, C, 8, 8), torch.randn(2, 7, C)
    q, k, alpha = patched(emb, pe.expand(2, -1, -1, -1), tokens)
    ref_q, ref_k = tr(emb, pe.expand(2, -1, -1, -1), tokens)
    torch.testing.assert_close(q, ref_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k, ref_k, atol=1e-5, rtol=1e-5)
    assert alpha.shape == (2, 2)


def test_decode_all_outputs_equals_sam_slices():
    """multimask_output=None (pre-training) returns SAM's four masks; False and True its slices."""
    sam = make_sam()
    torch.manual_seed(13)
    emb = torch.randn(2, C, 8, 8)
    sparse, dense = _prompt_embeddings(sam, 2, seed=14)
    pe = sam.prompt_encoder.get_dense_pe()
    every = decode_with_alpha(sam.mask_decoder, emb, pe, sparse, dense, None)
    single = decode_with_alpha(sam.mask_decoder, emb, pe, sparse, dense, False)
    multi = decode_with_alpha(sam.mask_decoder, emb, pe, sparse, dense, True)
    assert every.low_res_logits.shape == (2, 4, 32, 32) and every.iou_pred.shape == (2, 4)
    torch.testing.assert_close(single.low_res_logits, every.low_res_logits[:, :1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(multi.low_res_logits, every.low_res_logits[:, 1:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(multi.iou_pred, every.iou_pred[:, 1:])


def test_dense_pe_is_cached_per_device_and_follows_its_buffer():
    from pipeline.config import PluginConfig
    from pipeline.modeling.methods import build_method

    sam = make_sam()
    dec = build_method("sam", sam, PluginConfig(4.0, False, 16, 1, "softmax", 0.5))
    with torch.inference_mode():
        inference_pe = dec.dense_pe()
    first = dec.dense_pe()
    assert first is dec.dense_pe()  # cached
    torch.testing.assert_close(first, sam.prompt_encoder.get_dense_pe())
    assert not first.is_inference()  # an inference-mode call does not leak into training
    assert inference_pe.is_inference()
    with torch.no_grad():
        sam.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.mul_(2.0)
    again = dec.dense_pe()
    assert again is not first
    torch.testing.assert_close(again, sam.prompt_encoder.get_dense_pe())


@pytest.mark.parametrize("method", ["sam", "stable_sam"])
def test_many_prompts_on_one_image_share_layer_one_exactly(method):
    """An expanded embedding (evaluation, the predictor) takes the shared-image-side path; it must give what
    B separate copies of the embedding give."""
    from pipeline.config import PluginConfig
    from pipeline.modeling.methods import PromptBatch, build_method

    sam = make_sam()
    model = build_method(method, sam, PluginConfig(4.0, False, 16, 1, "softmax", 0.5))
    torch.manual_seed(15)
    with torch.no_grad():
        for p in model.trainable_parameters():  # a trained-looking plugin: real offsets, token-dependent α
            p.add_(0.1 * torch.randn_like(p))
    emb = torch.randn(1, C, 8, 8)
    xy = torch.rand(5, 2, 2) * sam.image_encoder.img_size
    prompts = PromptBatch(boxes=torch.cat([xy.min(1).values, xy.max(1).values], dim=1))
    with torch.no_grad():
        shared = model(emb.expand(5, -1, -1, -1), prompts)
        copies = model(emb.expand(5, -1, -1, -1).contiguous(), prompts)
    assert not torch.equal(shared.low_res_logits[0], shared.low_res_logits[1])  # the prompts differ
    torch.testing.assert_close(shared.low_res_logits, copies.low_res_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(shared.iou_pred, copies.iou_pred, atol=1e-5, rtol=1e-5)
    if method == "stable_sam":
        torch.testing.assert_close(shared.alpha, copies.alpha, atol=1e-6, rtol=1e-5)
