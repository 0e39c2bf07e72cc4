"""Decoding images and ground-truth masks: the one place that turns HQSeg-44K files into arrays.

Every stage that reads pixels uses these helpers, so the index stage validates exactly what the
later stages will decode:

- images -> ``uint8 HxWx3`` RGB (any PIL mode: L, P, RGBA, CMYK, 16-bit gray ...);
- masks  -> ``bool HxW``, GT = level > ``threshold`` on a 0..255 scale, where the level is
  L / 1: the value; P: the palette colour's luminance (``convert("L")``, not the palette index);
  RGB: luminance; RGBA / LA: luminance, or the alpha channel if the colour is constant;
  I;16 / I (16-bit): value / 257.

Truncated files are errors: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is deliberately left off. EXIF
orientation is NOT applied: masks are aligned with the stored pixel raster (as in HQ-SAM's loader,
which reads with ``skimage.io.imread``).

    python -c "from pipeline.data.images import load_mask; print(load_mask('a.png', 128).sum())"
"""
from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")
MASK_EXTENSIONS: tuple[str, ...] = (".png",)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DecodeError(ValueError):
    """A file that cannot be decoded as an image/mask; the message says why."""


def open_image(source: str | os.PathLike[str] | bytes) -> Image.Image:
    """Open and fully decode ``source`` (a path or the file's bytes) with PIL.

    ``.load()`` forces the whole pixel stream to be decoded, so a truncated or corrupt file
    raises here rather than later. Raises :class:`DecodeError` (``"<ErrorType>: <message>"``).
    """
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(Path(source), "rb")
        with fp:
            img = Image.open(fp)
            img.load()
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError ...
        # PIL names an in-memory file by its repr (a memory address): say "the file's bytes" instead, so the
        # message (a quarantine reason in data/index) is the same on every run.
        message = re.sub(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "the file's bytes", str(exc))
        raise DecodeError(f"{type(exc).__name__}: {message}") from exc
    return img


def image_to_rgb(img: Image.Image) -> np.ndarray:
    """A decoded PIL image as ``uint8 [H, W, 3]`` RGB (alpha is dropped, 16-bit gray scaled by /257)."""
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        gray = np.clip(np.rint(_sixteen_bit(img)), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if mode == "F":
        raise DecodeError("unsupported image mode 'F' (32-bit float); save the image as 8-bit JPEG/PNG")
    if mode == "PA" or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")  # avoids PIL's palette-transparency warning
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8))


def mask_levels(img: Image.Image) -> np.ndarray:
    """Foreground levels of a decoded mask on a 0..255 scale, ``[H, W]`` (uint8, or float32 for 16-bit).

    See the module docstring for how each PIL mode is read.
    """
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        return _sixteen_bit(img)
    if mode == "F":
        raise DecodeError("unsupported mask mode 'F' (32-bit float); save the mask as an 8-bit PNG")
    if mode == "PA" or (mode == "P" and "transparency" in img.info):
        img, mode = img.convert("RGBA"), "RGBA"
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode in ("RGBA", "LA"):
        colour = np.asarray(img.convert("RGB" if mode == "RGBA" else "L"))
        if colour.size and (colour == colour.reshape(-1, *colour.shape[2:])[0]).all():
            return np.asarray(img.getchannel("A"), dtype=np.uint8)  # constant colour: the shape is in alpha
        return np.asarray(img.convert("L"), dtype=np.uint8)
    return np.asarray(img.convert("L"), dtype=np.uint8)  # 1, P, RGB, CMYK, YCbCr ...


def mask_to_bool(img: Image.Image, threshold: int) -> np.ndarray:
    """A decoded mask as ``bool [H, W]``: level > ``threshold`` (0..255 scale)."""
    return mask_levels(img) > threshold


def load_image(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an image file as ``uint8 [H, W, 3]`` RGB; a bad file raises :class:`DecodeError` naming it."""
    try:
        return image_to_rgb(open_image(path))
    except DecodeError as exc:
        raise DecodeError(f"{path}: image not decodable: {exc} (re-run the index stage to quarantine it)") from exc


def load_mask(path: str | os.PathLike[str], threshold: int) -> np.ndarray:
    """Read a mask file as ``bool [H, W]`` (level > ``threshold``); a bad file raises :class:`DecodeError`."""
    try:
        return mask_to_bool(open_image(path), threshold)
    except DecodeError as exc:
        raise DecodeError(f"{path}: mask not decodable: {exc} (re-run the index stage to quarantine it)") from exc


def _sixteen_bit(img: Image.Image) -> np.ndarray:
    """16-bit gray (PIL ``I;16*`` or ``I``) -> float32 levels on the 0..255 scale (value / 257)."""
    arr = np.asarray(img)
    if arr.size and (arr.min() < 0 or arr.max() > 65535):
        raise DecodeError(f"mode {img.mode!r} values outside 0..65535 (min {arr.min()}, max {arr.max()})")
    return arr.astype(np.float32) / np.float32(257.0)


__all__ = [
    "DecodeError", "IMAGE_EXTENSIONS", "MASK_EXTENSIONS", "image_to_rgb",
    "load_image", "load_mask", "mask_levels", "mask_to_bool", "open_image",
]
