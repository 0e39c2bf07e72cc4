"""One prompt, one way to the decoder: :class:`Prompt` -> model-input frame -> :class:`PromptBatch`.

Training, evaluation, base pre-training, the predictor, the CLI and the served model all build their
decoder inputs here, so the same prompt always becomes the same tokens:

- a :class:`Prompt` holds a box, points (+ labels) and/or a dense mask input, in an image's pixel frame;
- :meth:`Prompt.in_input_frame` maps it to the model-input frame (``transforms.to_input_coords``);
- :func:`collate` stacks prompts of ONE :attr:`Prompt.signature` into a :class:`PromptBatch` WITHOUT
  padding. SAM's prompt encoder lets every sparse token (a ``label -1`` padding point too) take part in
  the decoder's attention, so padding a 1-point prompt to 10 points changes its mask; grouping by
  signature (:func:`group_by_signature`) instead keeps a prompt's output independent of its batch-mates.

    from pipeline.inference.prompts import Prompt, collate, group_by_signature
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from pipeline.modeling.methods import PromptBatch
from pipeline.modeling.transforms import Postprocess, to_input_coords

Signature = tuple[bool, int, bool]  # (has a box, number of points, has a dense mask input)


@dataclass(frozen=True)
class Prompt:
    """One prompt for one image.

    ``box`` float32 ``[4]`` XYXY and ``points`` float32 ``[N, 2]`` (x, y) in the frame the prompt was
    made in (an image's pixels, or the model input after :meth:`in_input_frame`); ``point_labels``
    int64 ``[N]`` (1 foreground, 0 background); ``mask_input`` float32 ``[4g, 4g]`` logits in the padded
    model-input frame (SAM's ``mask_input``; frame-independent). ``prompt_type``/``draw`` name it in tables.
    """

    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    mask_input: np.ndarray | None = None
    prompt_type: str = "custom"
    draw: int = 0

    def __post_init__(self) -> None:
        where = f"prompt {self.prompt_type!r} (draw {self.draw})"
        box, pts, labels, mask = self.box, self.points, self.point_labels, self.mask_input
        if box is not None:
            box = np.asarray(box, dtype=np.float32).reshape(-1)
            if box.shape != (4,):
                raise ValueError(f"{where}: a box needs 4 numbers (x0, y0, x1, y1), got {box.tolist()}")
            if not np.isfinite(box).all():
                raise ValueError(f"{where}: box {box.tolist()} is not finite")
        if pts is not None:
            pts = np.asarray(pts, dtype=np.float32).reshape(-1, 2)
            if len(pts) == 0:
                pts = None
        if pts is not None:
            if not np.isfinite(pts).all():
                raise ValueError(f"{where}: points {pts.tolist()} are not finite")
            labels = np.ones(len(pts), np.int64) if labels is None else np.asarray(labels, dtype=np.int64).reshape(-1)
            if labels.shape != (len(pts),):
                raise ValueError(f"{where}: {len(pts)} points but {labels.size} labels")
            if not np.isin(labels, (0, 1)).all():
                raise ValueError(f"{where}: point labels must be 1 (foreground) or 0 (background), got {labels.tolist()}")
        else:
            labels = None
        if mask is not None:
            mask = np.asarray(mask, dtype=np.float32)
            if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
                raise ValueError(f"{where}: mask_input must be a square [4g, 4g] logit map, got {mask.shape}")
        if box is None and pts is None and mask is None:
            raise ValueError(f"{where}: needs a box, points or a mask input")
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "points", pts)
        object.__setattr__(self, "point_labels", labels)
        object.__setattr__(self, "mask_input", mask)

    @property
    def signature(self) -> Signature:
        """(has a box, number of points, has a mask input): prompts with equal signatures batch exactly."""
        return (self.box is not None, 0 if self.points is None else len(self.points), self.mask_input is not None)

    def in_input_frame(self, orig_hw: tuple[int, int], img_size: int, mode: Postprocess = "sam") -> "Prompt":
        """This prompt with box and points mapped from an ``orig_hw`` image into the model-input frame."""
        box = None if self.box is None else to_input_coords(self.box, orig_hw, img_size, mode)
        pts = None if self.points is None else to_input_coords(self.points, orig_hw, img_size, mode)
        return replace(self, box=box, points=pts)

    @classmethod
    def from_row(cls, row: Mapping[str, Any], *, mask_logits: tuple[float, float] | None = None,
                 lowres_side: int | None = None, where: str = "prompts") -> "Prompt":
        """From a prompt-table row: ``box`` [4], ``points`` flat [2N], ``point_labels`` [N] (nulls allowed)
        and, in training tables, ``mask_input_rle`` (a coarse mask at ``lowres_side``², turned into
        logits with ``mask_logits`` = (background, foreground))."""
        mask = None
        rle_str = row.get("mask_input_rle")
        if rle_str is not None:
            if mask_logits is None or lowres_side is None:
                raise ValueError(f"{where}: a mask prompt needs mask_logits and lowres_side to decode")
            from pipeline.data import rle
            from pipeline.prompts.coarse import coarse_mask_logits

            mask = coarse_mask_logits(rle.decode(rle_str, lowres_side, lowres_side), *mask_logits)
        try:
            return cls(box=row.get("box"), points=row.get("points"), point_labels=row.get("point_labels"),
                       mask_input=mask, prompt_type=str(row.get("prompt_type", "custom")),
                       draw=int(row.get("draw") or 0))
        except ValueError as exc:
            raise ValueError(f"{where}: view {row.get('view_id', '?')!r}: {exc}; re-run `dvc repro prompts`") from None


def group_by_signature(prompts: Sequence[Prompt]) -> list[tuple[Signature, list[int]]]:
    """Indices of ``prompts`` grouped by signature, groups in sorted signature order, members in order."""
    groups: dict[Signature, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p.signature, []).append(i)
    return sorted(groups.items())


def collate(prompts: Sequence[Prompt], device: torch.device | str | None = None) -> PromptBatch:
    """Prompts of ONE signature, already in the model-input frame -> :class:`PromptBatch` (no padding).

    boxes ``[B, 4]``, points ``[B, N, 2]``, point_labels ``[B, N]``, mask_inputs ``[B, 1, 4g, 4g]``.
    """
    if not prompts:
        raise ValueError("collate: no prompts")
    sigs = {p.signature for p in prompts}
    if len(sigs) != 1:
        raise ValueError(f"collate: prompts of mixed signatures {sorted(sigs)}; group them first (group_by_signature)")
    has_box, n_points, has_mask = sigs.pop()

    def stack(arrays: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(np.stack(arrays)).to(device=device, dtype=dtype)

    return PromptBatch(
        boxes=stack([p.box for p in prompts], torch.float32) if has_box else None,  # type: ignore[misc]
        points=stack([p.points for p in prompts], torch.float32) if n_points else None,  # type: ignore[misc]
        point_labels=stack([p.point_labels for p in prompts], torch.int64) if n_points else None,  # type: ignore[misc]
        mask_inputs=stack([p.mask_input for p in prompts], torch.float32)[:, None] if has_mask else None,  # type: ignore[misc]
    )


__all__ = ["Prompt", "Signature", "collate", "group_by_signature"]
