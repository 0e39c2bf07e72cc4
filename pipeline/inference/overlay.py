"""Pictures of a prediction: the mask as a PNG and an overlay of image, prompt and mask."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.common.atomic import atomic_path
from pipeline.inference.prompts import Prompt

MASK_RGB = (30, 144, 255)
BOX_RGB = (255, 200, 0)
POSITIVE_RGB = (40, 220, 60)
NEGATIVE_RGB = (235, 40, 40)


def save_mask(mask: np.ndarray, path: Path) -> None:
    """bool ``[H, W]`` -> an 8-bit PNG (255 = object), written atomically."""
    with atomic_path(Path(path)) as tmp:
        Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")


def draw_overlay(image: np.ndarray, mask: np.ndarray, prompt: Prompt, alpha: float = 0.5) -> Image.Image:
    """uint8 ``[H, W, 3]`` image, bool ``[H, W]`` mask, prompt in image pixels -> an RGB picture: the mask
    tinted with its outline, the box drawn, positive points green and negative points red."""
    base = image.astype(np.float32)
    tint = np.asarray(MASK_RGB, np.float32)
    out = base.copy()
    out[mask] = (1 - alpha) * base[mask] + alpha * tint
    edge = mask & ~_erode(mask)
    out[edge] = tint
    pic = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pic)
    scale = max(1, round(max(image.shape[:2]) / 300))
    if prompt.box is not None:
        draw.rectangle([float(v) for v in prompt.box], outline=BOX_RGB, width=2 * scale)
    if prompt.points is not None:
        r = 4 * scale
        for (x, y), lab in zip(prompt.points.tolist(), prompt.point_labels.tolist()):  # type: ignore[union-attr]
            color = POSITIVE_RGB if lab == 1 else NEGATIVE_RGB
            draw.ellipse([x - r, y - r, x + r, y + r], fill=color, outline=(255, 255, 255), width=max(1, scale))
    return pic


def save_overlay(image: np.ndarray, mask: np.ndarray, prompt: Prompt, path: Path) -> None:
    with atomic_path(Path(path)) as tmp:
        draw_overlay(image, mask, prompt).save(tmp, format="PNG")


def _erode(mask: np.ndarray) -> np.ndarray:
    """One-pixel 4-neighbour erosion of a bool mask (pixels outside the image count as background)."""
    m = np.pad(mask, 1)
    return m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]


__all__ = ["draw_overlay", "save_mask", "save_overlay"]
