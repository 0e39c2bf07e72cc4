"""Coarse-mask prompts: HQ-SAM's ``masks_noise`` (docs/METHOD.md §3).

On the soft GT at the low-res mask-input grid (``4g x 4g``, the padded model-input frame), the
"incoherent" band is where the GT differs from its 1/8-down-then-up bilinear reconstruction by at least
``band``; that band gets N(0, 1) noise and the result is thresholded at 0.5. Resizing uses torch's
bilinear (align_corners=False, as HQ-SAM's ``F.interpolate``); the noise comes from the caller's numpy
generator, so the draw is seeded like every other prompt.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.modeling.transforms import Postprocess, mask_to_input_frame

DOWNSCALE = 8  # HQ-SAM get_incoherent_mask(sfact=8)


def incoherent_band(soft: np.ndarray, band: float, factor: int = DOWNSCALE) -> np.ndarray:
    """float ``[s, s]`` in [0, 1] -> bool ``[s, s]``: ``|g - up(down(g, 1/factor))| >= band``."""
    s_h, s_w = soft.shape
    g = torch.from_numpy(np.ascontiguousarray(soft, dtype=np.float32))[None, None]
    small = F.interpolate(g, (max(s_h // factor, 1), max(s_w // factor, 1)), mode="bilinear", align_corners=False)
    rec = F.interpolate(small, (s_h, s_w), mode="bilinear", align_corners=False)
    return ((g - rec).abs() >= band)[0, 0].numpy()


def coarse_mask(soft: np.ndarray, band: float, rng: np.random.Generator) -> np.ndarray:
    """float ``[s, s]`` soft GT -> bool ``[s, s]`` coarse mask (noise on the boundary band, > 0.5)."""
    soft = np.asarray(soft, dtype=np.float32)
    noise = rng.standard_normal(soft.shape).astype(np.float32)
    return (soft + noise * incoherent_band(soft, band)) > 0.5


def lowres_target(mask: np.ndarray, img_size: int, side: int, mode: Postprocess = "sam") -> np.ndarray:
    """bool ``HxW`` view GT -> float32 ``[side, side]`` soft GT in the padded model-input frame."""
    return mask_to_input_frame(mask, img_size, side, mode).numpy()


def coarse_mask_logits(coarse: np.ndarray, background: float, foreground: float) -> np.ndarray:
    """bool ``[s, s]`` coarse mask -> float32 ``[s, s]`` values fed as SAM's dense mask input.

    HQ-SAM feeds its 0/255 noisy label as-is (background 0, foreground 255); the two values are params
    (``prompts.coarse_mask_logits``).
    """
    return np.where(np.asarray(coarse, dtype=bool), np.float32(foreground), np.float32(background)).astype(np.float32)
