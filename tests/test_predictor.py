"""The one prompt-to-mask path: SamPredictor parity, plugins, ONNX export and the predict CLI.

    OMP_NUM_THREADS=1 .venv/bin/pytest tests/test_predictor.py -q
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import Params
from pipeline.inference.predictor import Predictor
from pipeline.inference.prompts import Prompt, collate, group_by_signature
from pipeline.modeling.backbones import build_sam
from pipeline.modeling.plugin_file import PluginFileError, read_plugin_file
from tests.fakes import write_tiny_base, write_trained_plugin

IMG, GRID = 64, 16


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, test_params: Params) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("predictor")
    params = test_params
    sam, sha = write_tiny_base(tmp / "base", img=IMG, grid=GRID)
    write_trained_plugin(tmp / "stable_sam.pt", "stable_sam", sam, params.plugin, sha)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (50, 80, 3), dtype=np.uint8)
    image[10:40, 20:60] = (200, 60, 40)  # an object, so that masks are not all empty or all full
    Image.fromarray(image).save(tmp / "photo.png")
    return {"tmp": tmp, "params": params, "sha": sha, "image": image}


PROMPTS = [
    dict(box=np.array([18.0, 8, 62, 42])),
    dict(point_coords=np.array([[30.0, 20], [70, 45]]), point_labels=np.array([1, 0])),
    dict(point_coords=np.array([[40.0, 25]]), point_labels=np.array([1]), box=np.array([10.0, 5, 70, 45])),
]


@pytest.mark.parametrize("multimask", [True, False])
def test_sam_method_matches_segment_anything_predictor(ws, multimask):
    from segment_anything import SamPredictor

    ours = Predictor.from_pretrained(ws["tmp"] / "base", "sam", device="cpu")
    theirs = SamPredictor(build_sam("tiny", ws["tmp"] / "base" / "sam.pt", img_size=IMG, grid=GRID))
    ours.set_image(ws["image"])
    theirs.set_image(ws["image"])
    torch.testing.assert_close(ours.get_image_embedding(), theirs.get_image_embedding(), atol=1e-5, rtol=0)
    assert ours.input_size == tuple(theirs.input_size) and ours.original_size == tuple(theirs.original_size)
    for kw in PROMPTS:
        m1, s1, l1 = ours.predict(**kw, multimask_output=multimask, return_logits=True)
        m2, s2, l2 = theirs.predict(**kw, multimask_output=multimask, return_logits=True)
        assert m1.shape == m2.shape and l1.shape == l2.shape == ((3 if multimask else 1), 4 * GRID, 4 * GRID)
        assert np.abs(l1 - l2).max() <= 1e-5 and np.abs(m1 - m2).max() <= 1e-5 and np.abs(s1 - s2).max() <= 1e-5
        b1, _, _ = ours.predict(**kw, multimask_output=multimask)
        assert b1.dtype == bool and np.array_equal(b1, m2 > 0.0)
    # A previous low-res output fed back as the mask prompt (SAM's iterative refinement).
    kw = dict(PROMPTS[0], mask_input=l2[:1])
    _, _, a = ours.predict(**kw, multimask_output=multimask)
    _, _, b = theirs.predict(**kw, multimask_output=multimask)
    assert np.abs(a - b).max() <= 1e-5
    # The batched call, as SamPredictor.predict_torch (coordinates in the model-input frame).
    boxes = torch.from_numpy(ours.apply_coords(np.array([[18.0, 8, 62, 42], [0, 0, 30, 30]])))
    t1 = ours.predict_torch(None, None, boxes=boxes, multimask_output=multimask, return_logits=True)
    t2 = theirs.predict_torch(None, None, boxes=boxes, multimask_output=multimask, return_logits=True)
    for x, y in zip(t1, t2):
        assert (x - y).abs().max() <= 1e-5


def test_stable_sam_predictor_reports_alpha_and_differs_from_sam(ws):
    sam_p = Predictor.from_pretrained(ws["tmp"] / "base", "sam", device="cpu")
    ours = Predictor.from_pretrained(ws["tmp"] / "base", "stable_sam", ws["tmp"] / "stable_sam.pt", device="cpu")
    assert ours.method == "stable_sam" and sam_p.last_alpha1 is None
    for p in (sam_p, ours):
        p.set_image(ws["image"])
    _, _, low_sam = sam_p.predict(**PROMPTS[0], multimask_output=False)
    _, _, low = ours.predict(**PROMPTS[0], multimask_output=False)
    assert ours.last_alpha1 is not None and ours.last_alpha1.shape == (1,) and 0 < ours.last_alpha1[0] < 1
    assert np.abs(low - low_sam).max() > 1e-3  # the plugin changes the masks
    # predict_prompts (evaluation's path) gives the same low-res logits as predict, prompt by prompt.
    prompts = [Prompt(box=PROMPTS[0]["box"]), Prompt(points=PROMPTS[1]["point_coords"], point_labels=[1, 0])]
    chunks = list(ours.predict_prompts(prompts, batch_size=1))
    assert sorted(i for c in chunks for i in c.indices) == [0, 1]
    first = next(c for c in chunks if c.indices == [0])
    np.testing.assert_allclose(first.low_res[0].numpy(), low[0], atol=1e-5)
    assert first.masks.shape == (1, 50, 80) and first.alpha1 is not None


def test_plugin_file_errors_name_the_fix(ws, tmp_path):
    base = ws["tmp"] / "base"
    with pytest.raises(PluginFileError, match="not 'dsp'"):
        Predictor.from_pretrained(base, "dsp", ws["tmp"] / "stable_sam.pt")
    with pytest.raises(FileNotFoundError, match="plugin file"):
        Predictor.from_pretrained(base, "stable_sam", None)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(PluginFileError, match="not a readable plugin file"):
        read_plugin_file(tmp_path / "junk.pt", "stable_sam")
    other, sha = write_tiny_base(tmp_path / "other", img=IMG, grid=GRID, seed=5)
    write_trained_plugin(tmp_path / "other.pt", "stable_sam", other, ws["params"].plugin, sha)
    with pytest.raises(PluginFileError, match="trained on SAM checkpoint"):
        Predictor.from_pretrained(base, "stable_sam", tmp_path / "other.pt")


def test_prompts_group_by_signature_without_padding():
    prompts = [Prompt(points=[[1, 2]]), Prompt(box=[0, 0, 5, 5]), Prompt(points=[[1, 2], [3, 4]]),
               Prompt(points=[[5, 6]]), Prompt(mask_input=np.zeros((8, 8), np.float32))]
    groups = group_by_signature(prompts)
    assert [idx for _, idx in groups] == [[4], [0, 3], [2], [1]]
    batch = collate([prompts[i] for i in groups[1][1]])
    assert batch.points.shape == (2, 1, 2) and batch.point_labels.tolist() == [[1], [1]] and batch.boxes is None
    with pytest.raises(ValueError, match="mixed signatures"):
        collate(prompts[:2])
    with pytest.raises(ValueError, match="needs a box, points or a mask"):
        Prompt()
    with pytest.raises(ValueError, match="2 points but 1 labels"):
        Prompt(points=[[1, 2], [3, 4]], point_labels=[1])


@pytest.mark.parametrize("method", ["sam", "stable_sam"])
def test_onnx_export_matches_pytorch(ws, method, tmp_path):
    import onnxruntime as ort

    from pipeline.inference.onnx_export import export_onnx, onnx_inputs

    plugin = ws["tmp"] / "stable_sam.pt" if method == "stable_sam" else None
    pred = Predictor.from_pretrained(ws["tmp"] / "base", method, plugin, device="cpu")
    path = export_onnx(pred.decoder, tmp_path / f"{method}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    emb = torch.randn(256, GRID, GRID, generator=torch.Generator().manual_seed(2))
    mask = np.random.default_rng(3).normal(0, 3, (4 * GRID, 4 * GRID)).astype(np.float32)
    cases = [Prompt(box=[5.0, 6, 50, 40]), Prompt(points=[[10.0, 12]]),
             Prompt(points=[[10.0, 12], [40, 30], [20, 50], [33, 3], [60, 60]], point_labels=[1, 1, 0, 1, 0]),
             Prompt(points=[[30.0, 30]], box=[5.0, 6, 50, 40]), Prompt(box=[5.0, 6, 50, 40], mask_input=mask)]
    for prompt in cases:  # 1 to 5 points: the number of points is a dynamic axis
        scores, low = session.run(None, onnx_inputs(prompt, emb, 4 * GRID))
        with torch.no_grad():
            want = pred.decode(emb[None], collate([prompt]))
        assert np.abs(low - want.low_res_logits.numpy()).max() <= 1e-3
        assert np.abs(scores - want.iou_pred.numpy()).max() <= 1e-3


def test_predict_cli_single_and_batch(ws, tmp_path, capsys):
    from stages.predict import main

    base = ["--base", str(ws["tmp"] / "base"), "--plugin", str(ws["tmp"] / "stable_sam.pt"), "--device", "cpu"]
    photo = str(ws["tmp"] / "photo.png")
    assert main(["--image", photo, "--box", "18", "8", "62", "42", "--out", str(tmp_path / "m.png"),
                 "--overlay", str(tmp_path / "o.png"), *base]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert "embedded tiny base" in captured.err and out["alpha1"] is not None
    mask = np.asarray(Image.open(tmp_path / "m.png"))
    assert mask.shape == (50, 80) and set(np.unique(mask)) <= {0, 255} and out["area"] == int((mask == 255).sum())
    assert np.asarray(Image.open(tmp_path / "o.png").convert("RGB")).shape == (50, 80, 3)

    (tmp_path / "prompts.json").write_text(json.dumps([
        {"image": "photo.png", "box": [18, 8, 62, 42], "name": "a"},
        {"image": "photo.png", "points": [[30, 20]], "negatives": [[70, 45]], "name": "b"}]))
    (tmp_path / "prompts.csv").write_text("image,box,points,negatives,name\nphoto.png,,30 20; 40 25,,c\n")
    for f in ("prompts.json", "prompts.csv"):
        assert main(["--images", str(ws["tmp"]), "--prompts", str(tmp_path / f), "--out-dir", str(tmp_path / "outs"),
                     "--overlays", *base]) == 0
    assert {p.name for p in (tmp_path / "outs").iterdir()} == {
        "a.png", "a_overlay.png", "b.png", "b_overlay.png", "c.png", "c_overlay.png"}
    capsys.readouterr()

    # Known bad inputs: one line, exit code 2.
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    cases = [
        (["--image", str(tmp_path / "broken.jpg"), "--point", "1", "1", "--out", str(tmp_path / "x.png")], "broken.jpg"),
        (["--image", photo, "--box", "10", "10", "500", "40", "--out", str(tmp_path / "x.png")], "not inside"),
        (["--image", photo, "--point", "90", "10", "--out", str(tmp_path / "x.png")], "outside"),
        (["--image", photo, "--point", "5", "5", "--out", str(tmp_path / "x.png"), "--method", "dsp"], "not 'dsp'"),
    ]
    for argv, expected in cases:
        assert main([*argv, *base]) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert expected in err[-1] and err[-1].startswith("predict: error:")
    assert main(["--image", photo, "--box", "1", "1", "9", "9", "--out", str(tmp_path / "x.png"),
                 "--base", str(ws["tmp"] / "base"), "--plugin", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
