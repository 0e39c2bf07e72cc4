"""Run one method over stored prompts: all prompts of one image go through the decoder together.

The image embedding is computed once (cached, or encoded on the fly for COCO/folder benchmarks) and
expanded to the P prompts of that image. Prompts are grouped by their *signature* (box or not, number
of points) so that no prompt is padded with extra ``label -1`` points: SAM's prompt encoder lets padding
tokens take part in attention, so padding would change the result compared with prompting SAM one
prompt at a time. Each group is decoded in chunks of ``batch_size``, post-processed to the original
resolution and scored at once (:mod:`pipeline.evaluation.metrics`), so that memory stays bounded even
for 20-megapixel DIS5K images; only the RLE of each predicted mask is kept.

    from pipeline.evaluation.predict import Prompt, predict_and_score
"""
from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch import nn

from pipeline.evaluation.metrics import boundary_iou_many, mask_iou_many, mask_to_boundary_many
from pipeline.modeling.transforms import postprocess_logits, to_input_coords

log = logging.getLogger(__name__)

class EvaluationError(RuntimeError):
    """An evaluation that cannot produce results (nothing readable to score); the message says why."""


# Post-processed float logits of at most this many pixels (all masks of a chunk together) at once.
_POST_PIXELS = 1 << 26


@dataclass(frozen=True)
class Prompt:
    """One prompt in the ORIGINAL image's pixel frame.

    ``box``: float32 ``[4]`` XYXY or None; ``points``: float32 ``[N, 2]`` (x, y) or None;
    ``point_labels``: int32 ``[N]`` (1 = positive, 0 = negative) or None.
    """

    prompt_type: str
    draw: int
    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None

    @property
    def signature(self) -> tuple[bool, int]:
        """(has a box, number of points): prompts with equal signatures batch without padding."""
        return (self.box is not None, 0 if self.points is None else int(self.points.shape[0]))

    @classmethod
    def from_row(cls, row: dict[str, Any], where: str = "prompts") -> "Prompt":
        """From an eval-prompts row (``box`` [4], ``points`` flat [2N], ``point_labels`` [N]; nulls allowed)."""
        box = row.get("box")
        pts = row.get("points")
        labels = row.get("point_labels")
        box_a = None if box is None else np.asarray(box, dtype=np.float32).reshape(-1)
        pts_a = None if pts is None else np.asarray(pts, dtype=np.float32).reshape(-1, 2)
        if pts_a is not None and pts_a.shape[0] == 0:
            pts_a = None
        lab_a = None
        if pts_a is not None:
            lab_a = (np.ones(len(pts_a), np.int32) if labels is None else np.asarray(labels, dtype=np.int32).reshape(-1))
        view = row.get("view_id", "?")
        if box_a is not None and box_a.shape != (4,):
            raise ValueError(f"{where}: view {view!r} {row.get('prompt_type')}: box must have 4 numbers, got {box_a.tolist()}")
        if pts_a is not None and lab_a is not None and len(lab_a) != len(pts_a):
            raise ValueError(f"{where}: view {view!r} {row.get('prompt_type')}: {len(pts_a)} points but {len(lab_a)} labels")
        if box_a is None and pts_a is None:
            raise ValueError(f"{where}: view {view!r} {row.get('prompt_type')} draw {row.get('draw')}: neither box nor points")
        return cls(str(row["prompt_type"]), int(row.get("draw") or 0), box_a, pts_a, lab_a)


@dataclass
class ImageScores:
    """Per-prompt results for one image, in the order of the prompts given.

    ``iou``/``biou``: float64 ``[P]`` in [0, 1]; ``score``: SAM's predicted IoU ``[P]``; ``alpha1``: DRP's
    weight of the deformed features ``[P]`` or None; ``rles``: COCO RLE dicts (``counts`` as str).
    """

    iou: np.ndarray
    biou: np.ndarray
    score: np.ndarray
    alpha1: np.ndarray | None
    rles: list[dict[str, Any]]


def prompt_batch(prompts: Sequence[Prompt], orig_hw: tuple[int, int], img_size: int, mode: str, device: torch.device) -> Any:
    """Prompts of ONE signature -> a model-input-frame ``PromptBatch`` (boxes [B,4], points [B,N,2], labels [B,N])."""
    from pipeline.modeling.methods import PromptBatch  # the method registry owns the prompt container

    sigs = {p.signature for p in prompts}
    if len(sigs) != 1:
        raise ValueError(f"prompt_batch: prompts of mixed signatures {sorted(sigs)}")
    has_box, n_points = sigs.pop()
    boxes = points = labels = None
    if has_box:
        b = np.stack([p.box for p in prompts])  # type: ignore[misc]
        boxes = torch.from_numpy(to_input_coords(b, orig_hw, img_size, mode)).to(device)
    if n_points:
        xy = np.stack([p.points for p in prompts])  # type: ignore[misc]
        points = torch.from_numpy(to_input_coords(xy, orig_hw, img_size, mode)).to(device)
        labels = torch.from_numpy(np.stack([p.point_labels for p in prompts]).astype(np.int64)).to(device)  # type: ignore[misc]
    return PromptBatch(boxes=boxes, points=points, point_labels=labels, mask_inputs=None)


def _encode_rles(masks: torch.Tensor) -> list[dict[str, Any]]:
    """bool ``[n, H, W]`` -> n COCO RLE dicts with str counts."""
    arr = np.asfortranarray(masks.cpu().numpy().transpose(1, 2, 0).astype(np.uint8))
    out = mask_utils.encode(arr)
    for r in out:
        r["counts"] = r["counts"].decode("ascii")
    return out


@torch.inference_mode()
def predict_and_score(
    decoder: nn.Module,
    embedding: torch.Tensor,
    prompts: Sequence[Prompt],
    gt: np.ndarray,
    *,
    input_hw: tuple[int, int],
    img_size: int,
    mode: str = "sam",
    dilation_ratio: float = 0.02,
    batch_size: int = 64,
) -> ImageScores:
    """Decode every prompt of one image and score it against ``gt``.

    ``embedding``: ``[C, g, g]`` on the decoder's device; ``gt``: bool ``[H, W]`` at the original size
    (required; unlabeled images go through :func:`predict_rles`); ``input_hw``: the image's size after
    ResizeLongestSide, before padding. Returns :class:`ImageScores` in the order of ``prompts``.
    """
    device = embedding.device
    orig_hw = (int(gt.shape[0]), int(gt.shape[1]))
    gt_t = torch.from_numpy(np.ascontiguousarray(gt)).to(device)
    gt_boundary = mask_to_boundary_many(gt_t[None], dilation_ratio)[0]
    p = len(prompts)
    iou = np.full(p, np.nan)
    biou = np.full(p, np.nan)
    score = np.full(p, np.nan)
    alpha1 = np.full(p, np.nan)
    has_alpha = False
    rles: list[dict[str, Any] | None] = [None] * p
    for idx, chunk_masks, chunk_score, chunk_alpha in _decode_groups(
        decoder, embedding, prompts, orig_hw=orig_hw, input_hw=input_hw, img_size=img_size, mode=mode, batch_size=batch_size
    ):
        iou[idx] = mask_iou_many(chunk_masks, gt_t)
        biou[idx] = boundary_iou_many(chunk_masks, gt_t, dilation_ratio, gt_boundary=gt_boundary)
        score[idx] = chunk_score
        if chunk_alpha is not None:
            has_alpha = True
            alpha1[idx] = chunk_alpha
        for j, r in zip(idx, _encode_rles(chunk_masks)):
            rles[j] = r
    return ImageScores(iou, biou, score, alpha1 if has_alpha else None, rles)  # type: ignore[arg-type]


def _decode_groups(
    decoder: nn.Module,
    embedding: torch.Tensor,
    prompts: Sequence[Prompt],
    *,
    orig_hw: tuple[int, int],
    input_hw: tuple[int, int],
    img_size: int,
    mode: str,
    batch_size: int,
) -> Iterable[tuple[list[int], torch.Tensor, np.ndarray, np.ndarray | None]]:
    """Yield (prompt indices, bool masks [n, H, W], predicted IoU [n], alpha1 [n] | None) chunk by chunk."""
    if embedding.ndim != 3:
        raise ValueError(f"expected one [C, g, g] embedding, got shape {tuple(embedding.shape)}")
    groups: dict[tuple[bool, int], list[int]] = defaultdict(list)
    for i, pr in enumerate(prompts):
        groups[pr.signature].append(i)
    h, w = orig_hw
    post_step = max(1, _POST_PIXELS // max(1, h * w))
    for sig in sorted(groups):
        members = groups[sig]
        for start in range(0, len(members), batch_size):
            idx = members[start : start + batch_size]
            batch = prompt_batch([prompts[i] for i in idx], orig_hw, img_size, mode, embedding.device)
            emb = embedding[None].expand(len(idx), -1, -1, -1)
            out = decoder(emb, batch, multimask_output=False)
            low = out.low_res_logits[:, :1]
            pred_iou = out.iou_pred[:, 0].float().cpu().numpy()
            alpha = None if getattr(out, "alpha", None) is None else out.alpha[:, 0].float().cpu().numpy()
            for s in range(0, len(idx), post_step):
                logits = postprocess_logits(low[s : s + post_step], input_hw, orig_hw, img_size, mode=mode)  # type: ignore[arg-type]
                masks = logits[:, 0] > 0
                yield idx[s : s + post_step], masks, pred_iou[s : s + post_step], None if alpha is None else alpha[s : s + post_step]


@torch.inference_mode()
def predict_rles(
    decoder: nn.Module,
    embedding: torch.Tensor,
    prompts: Sequence[Prompt],
    *,
    orig_hw: tuple[int, int],
    input_hw: tuple[int, int],
    img_size: int,
    mode: str = "sam",
    batch_size: int = 64,
) -> tuple[list[dict[str, Any]], np.ndarray, np.ndarray | None]:
    """Masks without scoring (prompts with no single GT, e.g. detections).

    Returns (COCO RLE dicts with str counts, predicted IoU ``[P]``, alpha1 ``[P]`` or None).
    """
    rles: list[dict[str, Any] | None] = [None] * len(prompts)
    score = np.full(len(prompts), np.nan)
    alpha1 = np.full(len(prompts), np.nan)
    has_alpha = False
    for idx, masks, s, a in _decode_groups(
        decoder, embedding, prompts, orig_hw=orig_hw, input_hw=input_hw, img_size=img_size, mode=mode, batch_size=batch_size
    ):
        score[idx] = s
        if a is not None:
            has_alpha = True
            alpha1[idx] = a
        for j, r in zip(idx, _encode_rles(masks)):
            rles[j] = r
    return rles, score, (alpha1 if has_alpha else None)  # type: ignore[return-value]


def stability_from_rles(rles: Sequence[dict[str, Any]]) -> float:
    """OUR ST (:func:`pipeline.evaluation.metrics.stability`) of K masks given as RLEs, in percent.

    Uses pycocotools' exact RLE IoU (no dense masks needed); a pair of empty masks counts as IoU 1.
    """
    k = len(rles)
    if k == 0:
        raise ValueError("stability_from_rles: needs at least one mask")
    if k == 1:
        return 100.0
    iou = np.asarray(mask_utils.iou(list(rles), list(rles), [0] * k), dtype=np.float64).reshape(k, k)
    area = np.asarray(mask_utils.area(list(rles)), dtype=np.int64)
    empty = area == 0
    iou[np.ix_(empty, empty)] = 1.0  # pycocotools returns 0 for an empty union; SPEC counts it as 1
    return float(iou[np.triu_indices(k, 1)].mean() * 100.0)


# ------------------------------------------------------------------------------------------ methods
def load_method(name: str, sam: nn.Module, plugin_cfg: Any, plugins_dir: Path | None, device: torch.device) -> nn.Module:
    """Build method ``name`` around the frozen ``sam`` and load its trained plugin weights.

    A method with trainable parameters needs ``plugins_dir/<name>.pt`` (``{"method", "state_dict"}``,
    written by the train stage); one without (``sam``) needs no file.
    """
    from pipeline.modeling.methods import build_method

    decoder = build_method(name, sam, plugin_cfg)
    if int(getattr(decoder, "num_trainable", 0)) > 0:
        if plugins_dir is None:
            raise FileNotFoundError(f"method {name!r} has trained weights, but no --plugins folder was given")
        path = Path(plugins_dir) / f"{name}.pt"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no trained weights for method {name!r}; run `dvc repro train@{name}` "
                f"(or `python -m stages.train --method {name} ...`) first"
            )
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
            raise ValueError(f"{path}: not a plugin checkpoint (expected a dict with 'method' and 'state_dict')")
        if ckpt.get("method", name) != name:
            raise ValueError(f"{path}: holds weights of method {ckpt.get('method')!r}, not {name!r}; re-run training")
        decoder.load_plugin_state_dict(ckpt["state_dict"])
    return decoder.to(device).eval()


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is an error naming the fix."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("evaluate.device is 'cuda' but no GPU is visible; set evaluate.device: auto or cpu")
    return torch.device(name)


__all__ = [
    "EvaluationError",
    "ImageScores",
    "Prompt",
    "load_method",
    "predict_and_score",
    "predict_rles",
    "prompt_batch",
    "resolve_device",
    "stability_from_rles",
]
