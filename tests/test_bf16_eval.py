"""``evaluate.bf16``: the decoder under bf16 autocast for evaluation, and when ``auto`` turns it on.

    .venv/bin/pytest tests/test_bf16_eval.py -q
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.config import ConfigError, Params, load_params
from pipeline.evaluation.predict import load_predictor
from pipeline.inference import predictor as predictor_mod
from pipeline.inference.predictor import Predictor, native_bf16, resolve_bf16
from tests.fakes import write_tiny_base, write_trained_plugin

IMG, GRID = 64, 16


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, test_params: Params) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("bf16")
    sam, sha = write_tiny_base(tmp / "base", img=IMG, grid=GRID)
    write_trained_plugin(tmp / "plugins" / "stable_sam.pt", "stable_sam", sam, test_params.plugin, sha)
    return {"tmp": tmp, "params": test_params}


@pytest.mark.parametrize("value", ["auto", True, False])
def test_config_accepts_auto_true_false(test_params_path: Path, value: Any) -> None:
    assert load_params(test_params_path, {"evaluate.bf16": value}).evaluate.bf16 == value


@pytest.mark.parametrize("value", [1, 0, "true", "on", None])
def test_config_rejects_anything_else_naming_the_key(test_params_path: Path, value: Any) -> None:
    with pytest.raises(ConfigError, match=r"evaluate\.bf16"):
        load_params(test_params_path, {"evaluate.bf16": value})


def test_resolve_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_bf16(True, cuda) is True and resolve_bf16(False, cpu) is False
    assert resolve_bf16("auto", cuda) is False  # unmeasured on CUDA: off
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert native_bf16(cpu) and resolve_bf16("auto", cpu) is True
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    assert not native_bf16(cpu) and resolve_bf16("auto", cpu) is False
    with pytest.raises(ValueError, match="auto"):
        resolve_bf16("yes", cpu)


def test_load_predictor_follows_the_param(ws: dict[str, Any], test_params_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    base, plugins = ws["tmp"] / "base", ws["tmp"] / "plugins"
    for value, native, expected in ((True, False, True), (False, True, False), ("auto", True, True), ("auto", False, False)):
        monkeypatch.setattr(predictor_mod, "native_bf16", lambda device, n=native: n)
        params = load_params(test_params_path, {"evaluate.bf16": value, "evaluate.device": "cpu"})
        assert load_predictor(params, "stable_sam", base, plugins).bf16 is expected, (value, native)


def _decode(predictor: Predictor) -> Any:
    rng = np.random.default_rng(0)
    predictor.set_image(rng.integers(0, 255, (50, 80, 3), dtype=np.uint8))
    boxes = np.array([[10.0, 5, 60, 45], [0, 0, 80, 50], [30, 10, 50, 30]], dtype=np.float32)
    return predictor.predict_torch(None, None, boxes=torch.as_tensor(predictor.apply_coords(boxes)),
                                   multimask_output=False, return_logits=True)


def test_bf16_decode_is_close_to_fp32_and_returns_float32(ws: dict[str, Any]) -> None:
    base, plugin = ws["tmp"] / "base", ws["tmp"] / "plugins" / "stable_sam.pt"
    fp32 = Predictor.from_pretrained(base, "stable_sam", plugin, device="cpu", plugin_cfg=ws["params"].plugin)
    bf16 = Predictor.from_pretrained(base, "stable_sam", plugin, device="cpu", plugin_cfg=ws["params"].plugin,
                                     bf16=True)
    logits32, scores32, low32 = _decode(fp32)
    logits16, scores16, low16 = _decode(bf16)
    assert logits16.dtype == scores16.dtype == low16.dtype == torch.float32
    assert not torch.equal(low16, low32), "bf16 autocast changed nothing: it is not on"
    scale = float(low32.abs().max())
    assert float((low16 - low32).abs().max()) <= 0.05 * scale
    agree = ((logits16 > 0) == (logits32 > 0)).float().mean()
    assert float(agree) >= 0.99
    assert float((scores16 - scores32).abs().max()) <= 0.02
    assert bf16.last_alpha1 is not None and np.allclose(bf16.last_alpha1, fp32.last_alpha1, atol=0.01)
