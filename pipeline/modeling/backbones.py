"""Registry of frozen SAM backbones (segment-anything style: one builder per variant, one shared builder).

``vit_b`` / ``vit_l`` / ``vit_h`` are Meta's official checkpoints (docs/METHOD.md §4.2, URL, size and sha256 below);
``tiny`` is the embedded default: a SAM with the *unchanged* ``PromptEncoder`` and ``MaskDecoder`` over a
small convolutional encoder (pipeline/modeling/tiny_encoder.py), pre-trained by
``python -m stages.pretrain_base`` and shipped as ``assets/tiny_sam.pt``. Every variant is loaded through
the same verified path: size + sha256 check, then ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from pipeline.common.cli import StageError
from pipeline import PROJECT_ROOT
from pipeline.common.hashing import sha256_file
from pipeline.common.torch_files import load_error_reason
from pipeline.modeling.tiny_encoder import TinyConvEncoder

PROMPT_EMBED_DIM = 256


@dataclass(frozen=True)
class BackboneSpec:
    """Where a variant's weights come from and what grid its embeddings have."""

    name: str
    url: str
    size_bytes: int
    sha256: str
    img_size: int
    grid: int
    builder: Callable[[], Sam]


class ChecksumMismatch(StageError):
    """A checkpoint whose bytes are not the registered ones."""


def _build_sam(image_encoder: nn.Module, img_size: int, grid: int) -> Sam:
    """Shared builder: SAM's prompt encoder and two-layer mask decoder around any image encoder."""
    return Sam(
        image_encoder=image_encoder,  # type: ignore[arg-type]
        prompt_encoder=PromptEncoder(
            embed_dim=PROMPT_EMBED_DIM,
            image_embedding_size=(grid, grid),
            input_image_size=(img_size, img_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=PROMPT_EMBED_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )


def _build_vit(embed_dim: int, depth: int, num_heads: int, global_attn_indexes: tuple[int, ...]) -> Sam:
    encoder = ImageEncoderViT(
        depth=depth,
        embed_dim=embed_dim,
        img_size=1024,
        mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_heads=num_heads,
        patch_size=16,
        qkv_bias=True,
        use_rel_pos=True,
        global_attn_indexes=list(global_attn_indexes),
        window_size=14,
        out_chans=PROMPT_EMBED_DIM,
    )
    return _build_sam(encoder, 1024, 64)


def build_tiny(img_size: int = 256, grid: int = 32) -> Sam:
    """The embedded-default SAM: TinyConvEncoder + SAM's prompt encoder and mask decoder."""
    return _build_sam(TinyConvEncoder(img_size=img_size, grid=grid), img_size, grid)


_DL = "https://dl.fbaipublicfiles.com/segment_anything"
TINY_ASSET = PROJECT_ROOT / "assets" / "tiny_sam.pt"
TINY_SHA256 = "a7264a7b4fed9a61dc40ef4c190e586562fcfc7ded1ec6a3786f0b6c3ab2b14b"  # assets/tiny_sam.pt; see stages/pretrain_base.py

BACKBONES: dict[str, BackboneSpec] = {
    "vit_h": BackboneSpec("vit_h", f"{_DL}/sam_vit_h_4b8939.pth", 2_564_550_879,
                          "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", 1024, 64,
                          partial(_build_vit, 1280, 32, 16, (7, 15, 23, 31))),
    "vit_l": BackboneSpec("vit_l", f"{_DL}/sam_vit_l_0b3195.pth", 1_249_524_607,
                          "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", 1024, 64,
                          partial(_build_vit, 1024, 24, 16, (5, 11, 17, 23))),
    "vit_b": BackboneSpec("vit_b", f"{_DL}/sam_vit_b_01ec64.pth", 375_042_383,
                          "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", 1024, 64,
                          partial(_build_vit, 768, 12, 12, (2, 5, 8, 11))),
    "tiny": BackboneSpec("tiny", TINY_ASSET.as_uri(), 0, TINY_SHA256, 256, 32, build_tiny),
}


def get_spec(variant: str) -> BackboneSpec:
    """The registry entry for ``variant``; an unknown name fails listing the known ones."""
    try:
        return BACKBONES[variant]
    except KeyError:
        raise KeyError(f"unknown SAM variant {variant!r}; known: {', '.join(BACKBONES)}") from None


def verify_checkpoint(path: Path, sha256: str, size_bytes: int = 0) -> str:
    """Check a checkpoint's size and sha256 (when given); returns its sha256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found (run `dvc repro base`)")
    if size_bytes and path.stat().st_size != size_bytes:
        raise ChecksumMismatch(
            f"{path}: {path.stat().st_size} bytes, expected {size_bytes}; the download is incomplete or another "
            "file: delete it and run `dvc repro base` again"
        )
    digest = sha256_file(path)
    if sha256 and digest != sha256:
        raise ChecksumMismatch(
            f"{path}: sha256 {digest} != expected {sha256}; delete it and run `dvc repro base` again "
            "(or set sam.checkpoint_sha256 if you really mean to use another checkpoint)"
        )
    return digest


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)`` of a SAM checkpoint; accepts a bare state dict or {"model": sd}."""
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors of a truncated, foreign or random file
        raise ValueError(f"{path}: not a readable PyTorch checkpoint ({load_error_reason(exc)}); "
                         "delete it and run `dvc repro base`, or fix sam.checkpoint_url") from None
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return obj


def freeze(sam: Sam) -> Sam:
    """Eval mode and ``requires_grad=False`` on every parameter."""
    sam.eval()
    for p in sam.parameters():
        p.requires_grad_(False)
    return sam


def build_sam(variant: str, checkpoint: Path | None = None, *, img_size: int | None = None, grid: int | None = None) -> Sam:
    """Build a variant (random init without ``checkpoint``), load weights strictly, freeze it.

    ``img_size``/``grid`` only apply to ``tiny`` (its checkpoint fixes them; a mismatch fails on load).
    """
    spec = get_spec(variant)
    sam = build_tiny(img_size or spec.img_size, grid or spec.grid) if variant == "tiny" else spec.builder()
    if checkpoint is not None:
        sd = load_state_dict(Path(checkpoint))
        try:
            sam.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ValueError(f"{checkpoint}: not a {variant} SAM checkpoint: {str(exc)[:500]}") from None
    return freeze(sam)


def load_base(base_dir: Path) -> tuple[Sam, dict[str, Any]]:
    """Load the frozen base written by the ``base`` stage: ``base_dir/sam.pt`` + ``base_dir/base.json``.

    ``info`` = {"variant", "checkpoint_sha256", "img_size", "grid", "channels"}.
    """
    base_dir = Path(base_dir)
    info_path = base_dir / "base.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path}: no base model here (run `dvc repro base`)")
    try:
        info = json.loads(info_path.read_text(encoding="utf-8"))
    except ValueError as exc:  # JSON or UTF-8 decoding
        raise ValueError(f"{info_path}: not a base description ({exc}); re-run `dvc repro base`") from None
    ckpt = base_dir / "sam.pt"
    verify_checkpoint(ckpt, info["checkpoint_sha256"])
    sam = build_sam(info["variant"], ckpt, img_size=info["img_size"], grid=info["grid"])
    return sam, info
