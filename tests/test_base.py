"""Stage `base`: verified checkpoints (sha256 + size), weights_only loading, strict official key names."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline.common.hashing import sha256_file
from pipeline.config import replace
from pipeline.modeling import backbones
from pipeline.modeling.backbones import ChecksumMismatch, build_tiny, load_base
from pipeline.modeling.sam_checkpoint import prepare_base
from tests.fakes import load_test_params
from tests.fixtures_http import LoopbackServer


@pytest.fixture()
def tiny_ckpt(tmp_path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "tiny.pt"
    torch.save(build_tiny(64, 8).state_dict(), path)
    return path


def _params(tmp_path, **overrides):
    return replace(load_test_params(), **{"sam.cache_dir": str(tmp_path / "cache"), **overrides})


def _tiny_spec(monkeypatch, path: Path, sha: str) -> None:
    spec = dataclasses.replace(backbones.BACKBONES["tiny"], url=path.as_uri(), sha256=sha, img_size=64, grid=8,
                               builder=lambda: build_tiny(64, 8))
    monkeypatch.setitem(backbones.BACKBONES, "tiny", spec)
    monkeypatch.setattr(backbones, "build_tiny", lambda img_size=64, grid=8: spec.builder())


def test_tiny_base_installed_and_reloaded(tmp_path, tiny_ckpt, monkeypatch):
    _tiny_spec(monkeypatch, tiny_ckpt, sha256_file(tiny_ckpt))
    info = prepare_base(_params(tmp_path), tmp_path / "base")
    assert info["checkpoint_sha256"] == sha256_file(tiny_ckpt)
    assert (info["img_size"], info["grid"], info["channels"]) == (64, 8, 256)
    assert json.loads((tmp_path / "base/base.json").read_text()) == info
    sam, loaded = load_base(tmp_path / "base")
    assert loaded == info
    assert all(not p.requires_grad for p in sam.parameters()) and not sam.training
    ref = torch.load(tiny_ckpt, weights_only=True)
    assert all(torch.equal(v, ref[k]) for k, v in sam.state_dict().items())


def test_base_json_does_not_depend_on_where_the_clone_lives():
    """The embedded asset is recorded by its project-relative path: two clones give the same base.json
    (an absolute file:// URL made every stage after `base` re-run in another folder)."""
    from pipeline import PROJECT_ROOT
    from pipeline.modeling.sam_checkpoint import portable_source

    assert portable_source((PROJECT_ROOT / "assets" / "tiny_sam.pt").as_uri()) == "assets/tiny_sam.pt"
    assert portable_source("file:///mirror/sam_vit_b_01ec64.pth") == "file:///mirror/sam_vit_b_01ec64.pth"
    assert portable_source("https://example.org/sam.pth") == "https://example.org/sam.pth"


def test_wrong_sha256_refused(tmp_path, tiny_ckpt, monkeypatch):
    _tiny_spec(monkeypatch, tiny_ckpt, "0" * 64)
    with pytest.raises(ChecksumMismatch, match="sha256"):
        prepare_base(_params(tmp_path), tmp_path / "base")
    assert not (tmp_path / "base/sam.pt").exists()


def test_tampered_base_refused_on_load(tmp_path, tiny_ckpt, monkeypatch):
    _tiny_spec(monkeypatch, tiny_ckpt, sha256_file(tiny_ckpt))
    prepare_base(_params(tmp_path), tmp_path / "base")
    sam_pt = tmp_path / "base/sam.pt"
    data = bytearray(sam_pt.read_bytes())
    data[-10] ^= 0xFF
    sam_pt.unlink()  # it may be a hard link to the source: replace, do not edit in place
    sam_pt.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatch):
        load_base(tmp_path / "base")


def test_checkpoint_with_wrong_keys_refused(tmp_path, monkeypatch):
    bad = tmp_path / "bad.pt"
    torch.save({"not_a_sam_key": torch.zeros(3)}, bad)
    _tiny_spec(monkeypatch, bad, sha256_file(bad))
    with pytest.raises(ValueError, match="not a tiny SAM checkpoint"):
        prepare_base(_params(tmp_path), tmp_path / "base")


def test_unknown_variant_named():
    with pytest.raises(KeyError, match="known: vit_h, vit_l, vit_b, tiny"):
        backbones.get_spec("vit_x")


@pytest.mark.slow
def test_fake_official_vit_b_over_loopback_http(tmp_path, monkeypatch):
    """A random-init ViT-B with the official key names and shapes, served from 127.0.0.1, verified and loaded."""
    torch.manual_seed(0)
    sd = backbones.BACKBONES["vit_b"].builder().state_dict()
    fake = tmp_path / "sam_vit_b_01ec64.pth"
    torch.save(sd, fake)
    sha, size = sha256_file(fake), fake.stat().st_size
    with LoopbackServer() as srv:
        url = srv.add("sam_vit_b_01ec64.pth", fake.read_bytes())
        spec = dataclasses.replace(backbones.BACKBONES["vit_b"], url=url, sha256=sha, size_bytes=size)
        monkeypatch.setitem(backbones.BACKBONES, "vit_b", spec)
        info = prepare_base(_params(tmp_path, **{"sam.variant": "vit_b"}), tmp_path / "base")
    assert (info["variant"], info["img_size"], info["grid"]) == ("vit_b", 1024, 64)
    assert (tmp_path / "cache/sam_vit_b_01ec64.pth").stat().st_size == size
    sam, _ = load_base(tmp_path / "base")
    key = "image_encoder.blocks.0.attn.qkv.weight"
    assert torch.equal(sam.state_dict()[key], sd[key])
