"""SAM's pre- and post-processing for any model input side ``img_size`` (1024 for official SAM).

Pre: ResizeLongestSide(img_size) -> normalise with SAM's pixel mean/std -> zero-pad bottom/right.
Post: low-res logits [.., 4g, 4g] -> img_size² -> crop the padding -> original size (SAM's
``postprocess_masks``), or HQ-SAM's "squash" protocol (the image is resized to img_size² without
keeping its aspect ratio, so logits are simply resized back).
"""
from __future__ import annotations

import functools
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide
from torchvision.transforms.functional import resize, to_pil_image

PIXEL_MEAN = (123.675, 116.28, 103.53)
PIXEL_STD = (58.395, 57.12, 57.375)

Postprocess = Literal["sam", "squash"]


def input_size(orig_hw: tuple[int, int], img_size: int, mode: Postprocess = "sam") -> tuple[int, int]:
    """(input_h, input_w): the image's size after resizing, before padding."""
    if mode == "squash":
        return (img_size, img_size)
    return ResizeLongestSide.get_preprocess_shape(orig_hw[0], orig_hw[1], img_size)


def _check_image(image: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}")


@functools.lru_cache(maxsize=1)
def _normalise_lut() -> np.ndarray:
    """float32 ``[3, 256]``: ``(level - mean) / std`` per channel for every uint8 level.

    Computed with the very torch float32 ops ``Sam.preprocess`` applies to each pixel, so looking a pixel
    up here gives the bit-identical value (an elementwise subtract and divide are exactly rounded).
    """
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 256).expand(3, 1, 256).float()
    mean = torch.tensor(PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(PIXEL_STD).view(3, 1, 1)
    lut = ((levels - mean) / std)[:, 0, :].numpy().copy()
    lut.setflags(write=False)
    return lut


def preprocess_into(image: np.ndarray, out: np.ndarray, img_size: int, mode: Postprocess = "sam") -> tuple[int, int]:
    """:func:`preprocess` written into ``out`` (float32 ``[3, img_size, img_size]``, e.g. a row of a batch
    buffer); returns (input_h, input_w). Every element of ``out`` is written (the padding with zeros).

    Pure numpy on one thread: normalisation is a per-channel table lookup (bit-identical to the torch
    arithmetic of :func:`preprocess`), so no torch thread pool is woken per image.
    """
    _check_image(image)
    if out.shape != (3, img_size, img_size) or out.dtype != np.float32:
        raise ValueError(f"expected a float32 [3, {img_size}, {img_size}] output buffer, got {out.dtype} {out.shape}")
    in_h, in_w = input_size(image.shape[:2], img_size, mode)
    resized = np.asarray(resize(to_pil_image(np.ascontiguousarray(image)), [in_h, in_w]))
    lut = _normalise_lut()
    for c in range(3):
        np.take(lut[c], resized[:, :, c], out=out[c, :in_h, :in_w], mode="clip")  # uint8: never out of range
    out[:, in_h:, :] = 0.0
    out[:, :in_h, in_w:] = 0.0
    return in_h, in_w


def preprocess(image: np.ndarray, img_size: int, mode: Postprocess = "sam") -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 ``HxWx3`` RGB -> (float32 ``[3, img_size, img_size]``, (input_h, input_w)).

    Exactly ``SamPredictor.set_image``'s arithmetic: PIL resize (``ResizeLongestSide.apply_image``), then
    ``Sam.preprocess`` (normalise, zero-pad bottom/right), so an embedding made here equals SAM's own.
    """
    _check_image(image)
    out = np.empty((3, img_size, img_size), dtype=np.float32)
    hw = preprocess_into(image, out, img_size, mode)
    return torch.from_numpy(out), hw


def to_input_coords(coords: np.ndarray, orig_hw: tuple[int, int], img_size: int, mode: Postprocess = "sam") -> np.ndarray:
    """Map ``(..., 2)`` x/y pixel coordinates (or ``(..., 4)`` XYXY boxes) into the model-input frame."""
    in_h, in_w = input_size(orig_hw, img_size, mode)
    sx, sy = in_w / orig_hw[1], in_h / orig_hw[0]
    out = np.asarray(coords, dtype=np.float32).copy()
    out[..., 0::2] *= sx
    out[..., 1::2] *= sy
    return out


def postprocess_logits(
    low_res: torch.Tensor,
    input_hw: tuple[int, int],
    orig_hw: tuple[int, int],
    img_size: int,
    mode: Postprocess = "sam",
) -> torch.Tensor:
    """``[B, M, 4g, 4g]`` logits -> ``[B, M, H, W]`` logits at the original image size."""
    x = F.interpolate(low_res.float(), (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_hw[0], : input_hw[1]]
    return F.interpolate(x, tuple(orig_hw), mode="bilinear", align_corners=False)


def mask_to_input_frame(mask: np.ndarray, img_size: int, out_side: int, mode: Postprocess = "sam") -> torch.Tensor:
    """bool ``HxW`` GT -> float32 ``[out_side, out_side]`` soft target in the padded model-input frame.

    Used for training targets (``out_side = 4g``, the low-res logit grid) and for SAM's dense mask input.
    """
    in_h, in_w = input_size(mask.shape, img_size, mode)
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    m = F.interpolate(m, (in_h, in_w), mode="bilinear", align_corners=False)
    m = F.pad(m, (0, img_size - in_w, 0, img_size - in_h))
    if out_side != img_size:
        m = F.interpolate(m, (out_side, out_side), mode="bilinear", align_corners=False)
    return m[0, 0]
