"""The HQSeg-44K folder layout (docs/METHOD.md §4.1): which folders hold each set's images and masks.

Both the downloader (real archives) and the embedded generator (a stand-in) produce this tree under
one dataset root; the index stage reads it back with the same table, so the three can never disagree.

    root/DIS5K/DIS-TR/im/<stem>.jpg              root/DIS5K/DIS-TR/gt/<stem>.png
    root/thin_object_detection/ThinObject5K/images_train/<stem>.jpg   .../masks_train/<stem>.png
    root/cascade_psp/fss_all/<stem>.jpg          root/cascade_psp/fss_all/<stem>.png  (side by side)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Split = Literal["train", "eval"]


@dataclass(frozen=True)
class SetLayout:
    """Where one HQSeg-44K set lives, relative to the dataset root.

    ``image_dir == mask_dir`` means the "side by side" convention of cascade_psp: ``a.jpg`` + ``a.png``.
    """

    name: str
    split: Split
    image_dir: str
    mask_dir: str
    archive: str  # which of the three zips ships it
    style: Literal["thin", "salient"]  # what kind of objects the embedded generator draws for it

    @property
    def side_by_side(self) -> bool:
        return self.image_dir == self.mask_dir


HQSEG_SETS: tuple[SetLayout, ...] = (
    SetLayout("DIS5K-TR", "train", "DIS5K/DIS-TR/im", "DIS5K/DIS-TR/gt", "DIS5K.zip", "thin"),
    SetLayout(
        "ThinObject5K-TR", "train",
        "thin_object_detection/ThinObject5K/images_train",
        "thin_object_detection/ThinObject5K/masks_train",
        "thin_object_detection.zip", "thin",
    ),
    SetLayout("FSS", "train", "cascade_psp/fss_all", "cascade_psp/fss_all", "cascade_psp.zip", "salient"),
    SetLayout("DUTS-TR", "train", "cascade_psp/DUTS-TR", "cascade_psp/DUTS-TR", "cascade_psp.zip", "salient"),
    SetLayout("DUTS-TE", "train", "cascade_psp/DUTS-TE", "cascade_psp/DUTS-TE", "cascade_psp.zip", "salient"),
    SetLayout("ECSSD", "train", "cascade_psp/ecssd", "cascade_psp/ecssd", "cascade_psp.zip", "salient"),
    SetLayout("MSRA10K", "train", "cascade_psp/MSRA_10K", "cascade_psp/MSRA_10K", "cascade_psp.zip", "salient"),
    SetLayout("DIS5K-VD", "eval", "DIS5K/DIS-VD/im", "DIS5K/DIS-VD/gt", "DIS5K.zip", "thin"),
    SetLayout(
        "COIFT", "eval",
        "thin_object_detection/COIFT/images", "thin_object_detection/COIFT/masks",
        "thin_object_detection.zip", "thin",
    ),
    SetLayout(
        "HRSOD", "eval",
        "thin_object_detection/HRSOD/images", "thin_object_detection/HRSOD/masks_max255",
        "thin_object_detection.zip", "salient",
    ),
    SetLayout(
        "ThinObject5K-TE", "eval",
        "thin_object_detection/ThinObject5K/images_test",
        "thin_object_detection/ThinObject5K/masks_test",
        "thin_object_detection.zip", "thin",
    ),
)

SETS_BY_NAME: dict[str, SetLayout] = {s.name: s for s in HQSEG_SETS}
TRAIN_SETS: tuple[str, ...] = tuple(s.name for s in HQSEG_SETS if s.split == "train")
EVAL_SETS: tuple[str, ...] = tuple(s.name for s in HQSEG_SETS if s.split == "eval")
ARCHIVES: tuple[str, ...] = ("DIS5K.zip", "thin_object_detection.zip", "cascade_psp.zip")
IMAGE_SUFFIX = ".jpg"
MASK_SUFFIX = ".png"


def get_set(name: str) -> SetLayout:
    """Look a set up by name; an unknown name fails with the list of known ones."""
    try:
        return SETS_BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown HQSeg-44K set {name!r}; known sets: {', '.join(SETS_BY_NAME)}") from None
