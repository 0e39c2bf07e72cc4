"""Masks as COCO run-length encodings (pycocotools), the format masks take in every table."""
from __future__ import annotations

import numpy as np
from pycocotools import mask as mask_utils


def encode(mask: np.ndarray) -> str:
    """Encode a ``bool``/``uint8`` ``HxW`` mask as a COCO RLE ``counts`` string."""
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask, got shape {mask.shape}")
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return rle["counts"].decode("ascii")


def decode(counts: str, height: int, width: int) -> np.ndarray:
    """Decode a ``counts`` string back to a ``bool`` ``HxW`` mask."""
    rle = {"size": [int(height), int(width)], "counts": counts.encode("ascii")}
    return mask_utils.decode(rle).astype(bool)


def area(counts: str, height: int, width: int) -> int:
    """Foreground pixel count of an encoded mask, without decoding it."""
    return int(mask_utils.area({"size": [int(height), int(width)], "counts": counts.encode("ascii")}))
