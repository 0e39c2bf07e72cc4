"""Stored prompts -> the model-input frame -> :class:`~pipeline.modeling.methods.PromptBatch`.

Boxes and points are stored in the view image's pixel frame and mapped with
``transforms.to_input_coords``; the coarse mask is already at ``4g x 4g`` in the padded model-input frame
and becomes SAM's dense mask input with the ``prompts.coarse_mask_logits`` values. SAM's prompt encoder
takes one kind of prompt per call, so a mixed batch is decoded in groups (:data:`GROUP_OF`); points
are padded with label -1 to a FIXED count, so a sample's output never depends on its batch-mates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from pipeline.data import rle
from pipeline.modeling.methods import PromptBatch
from pipeline.modeling.transforms import to_input_coords
from pipeline.prompts.coarse import mask_input_logits
from pipeline.prompts.synthesis import ModelFrame
from pipeline.prompts.tables import TrainPrompt

Group = Literal["box", "points", "mask"]
GROUP_OF: dict[str, Group] = {"gt_box": "box", "noisy_box": "box", "points": "points", "coarse_mask": "mask"}
GROUP_ORDER: tuple[Group, ...] = ("box", "points", "mask")


@dataclass(frozen=True)
class EncodedPrompt:
    """One prompt in the model-input frame."""

    group: Group
    box: np.ndarray | None = None  # float32 [4]
    points: np.ndarray | None = None  # float32 [N, 2]
    mask: np.ndarray | None = None  # bool [4g, 4g]


def encode_prompt(prompt: TrainPrompt, hw: tuple[int, int], frame: ModelFrame) -> EncodedPrompt:
    """A stored prompt of a view of size ``hw`` -> :class:`EncodedPrompt` (model-input frame)."""
    group = GROUP_OF.get(prompt.prompt_type)
    if group is None:
        raise ValueError(f"unknown training prompt type {prompt.prompt_type!r}; known: {sorted(GROUP_OF)}")
    if group == "box":
        if prompt.box is None:
            raise ValueError(f"a {prompt.prompt_type} prompt without a box: re-run the prompts stage")
        return EncodedPrompt(group, box=to_input_coords(prompt.box, hw, frame.img_size, frame.mode))
    if group == "points":
        if prompt.points is None or len(prompt.points) == 0:
            raise ValueError("a points prompt without points: re-run the prompts stage")
        return EncodedPrompt(group, points=to_input_coords(prompt.points, hw, frame.img_size, frame.mode))
    if prompt.mask_input_rle is None:
        raise ValueError("a coarse_mask prompt without mask_input_rle: re-run the prompts stage")
    side = frame.lowres_side
    return EncodedPrompt(group, mask=rle.decode(prompt.mask_input_rle, side, side))


def collate_group(prompts: Sequence[EncodedPrompt], *, pad_points_to: int,
                  mask_logits: tuple[float, float]) -> PromptBatch:
    """Prompts of ONE group -> a :class:`PromptBatch` (CPU tensors).

    ``points`` are padded with label -1 to ``pad_points_to`` (>= the longest); ``mask_logits`` =
    (background, foreground) values of the dense mask input.
    """
    groups = {p.group for p in prompts}
    if len(groups) != 1:
        raise ValueError(f"collate_group needs prompts of one group, got {sorted(groups)}")
    group = groups.pop()
    if group == "box":
        return PromptBatch(boxes=torch.from_numpy(np.stack([p.box for p in prompts]).astype(np.float32)))
    if group == "points":
        n = max(pad_points_to, max(len(p.points) for p in prompts))
        pts = np.zeros((len(prompts), n, 2), dtype=np.float32)
        labels = np.full((len(prompts), n), -1, dtype=np.int64)
        for i, p in enumerate(prompts):
            pts[i, : len(p.points)] = p.points
            labels[i, : len(p.points)] = 1
        return PromptBatch(points=torch.from_numpy(pts), point_labels=torch.from_numpy(labels))
    masks = torch.from_numpy(np.stack([p.mask for p in prompts]))[:, None]
    return PromptBatch(mask_inputs=mask_input_logits(masks, *mask_logits))
