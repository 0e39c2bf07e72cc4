"""COCO-json benchmarks (MS COCO val2017, SGinW...): box-prompted instance masks scored by mask mAP.

docs/METHOD.md §4.4/§5: mask mAP and mAP50 with pycocotools ``COCOeval(iouType="segm")``, each mask scored by
SAM's predicted IoU. Images are not in the embedding cache: the frozen image encoder runs on the fly.
Box sources (``evaluate.coco[].box_source``):

- ``gt``: every non-crowd GT instance prompted by its tight box (output key ``gt_box``);
- ``noisy``: the same box with docs/METHOD.md §3 noise, seeded per (prompts.seed, benchmark, image, annotation)
  (output key ``noisy_box``);
- ``detections``: boxes from a COCO results json (``evaluate.coco[].detections``); each mask's score is
  the detection's score [assume: ranking detections is the detector's job, as in HQ-SAM's COCO protocol]
  (output key ``detections``; no ``miou``, detections have no paired GT).

Before scoring, :func:`validate_coco` checks every image and instance like the index stage checks the HQ
sets (decode, size against the json, empty masks) and quarantines the rest with a stable reason; only the
valid images are scored.

    python -m stages.evaluate --params params.yaml --benchmark <coco entry name> --method stable_sam ...
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tqdm import tqdm

from pipeline.config import IndexConfig
from pipeline.data.index import IndexResult, SetSummary
from pipeline.data.pairs import IndexRow, QuarantineRow, mask_box, read_regular_file
from pipeline.evaluation.predict import EvaluationError, predict_rles
from pipeline.inference.predictor import Predictor
from pipeline.inference.prompts import Prompt

log = logging.getLogger(__name__)

BOX_SOURCE_KEYS = {"gt": "gt_box", "noisy": "noisy_box", "detections": "detections"}


# ------------------------------------------------------------------------------------------- metric
def coco_from_dict(dataset: dict[str, Any]) -> COCO:
    """An in-memory pycocotools ``COCO`` from a COCO-json dict (quietly: no index chatter)."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco(path: str | Path) -> COCO:
    """Read a COCO annotations json; a missing or malformed file fails naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: COCO annotations not found (check evaluate.coco[].annotations)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise ValueError(f"{path}: not a COCO annotations file (no {key!r} list)")
    return coco_from_dict(data)


def segm_map(gt: COCO, results: Sequence[dict[str, Any]], image_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Mask AP@[.5:.95] and AP@.5 in percent (0-100) with pycocotools' ``COCOeval(iouType="segm")``.

    ``results``: dicts ``{"image_id", "category_id", "segmentation": RLE, "score"}`` (no ``bbox`` key:
    pycocotools would then take areas from boxes). ``image_ids`` restricts the evaluation (e.g. to the
    images actually processed). No results -> 0; no GT instance at all -> NaN (COCOeval's -1).
    """
    if not results:
        return {"map": 0.0, "map50": 0.0}
    clean = [{k: v for k, v in r.items() if k != "bbox"} for r in results]
    with contextlib.redirect_stdout(io.StringIO()):
        dt = gt.loadRes(clean)
        ev = COCOeval(gt, dt, iouType="segm")
        if image_ids is not None:
            ev.params.imgIds = sorted(int(i) for i in image_ids)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    stats = ev.stats
    return {"map": _pct(stats[0]), "map50": _pct(stats[1])}


def _pct(v: float) -> float:
    return float("nan") if v < 0 else float(v) * 100.0


def xywh_to_xyxy(b: Sequence[float]) -> np.ndarray:
    """COCO ``[x, y, w, h]`` -> our XYXY with inclusive maxima (a w-pixel-wide box ends at x + w - 1)."""
    x, y, w, h = (float(v) for v in b)
    return np.array([x, y, x + max(w - 1.0, 0.0), y + max(h - 1.0, 0.0)], dtype=np.float32)


# ---------------------------------------------------------------------------------------- benchmark
def _load_detections(path: str | Path) -> dict[int, list[dict[str, Any]]]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: detections json not found (evaluate.coco[].detections; or use box_source: gt)")
    try:
        dets = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(dets, list) or any(not {"image_id", "category_id", "bbox", "score"} <= set(d) for d in dets):
        raise ValueError(f"{path}: expected a COCO results list of {{image_id, category_id, bbox, score}}")
    by_image: dict[int, list[dict[str, Any]]] = {}
    for d in dets:
        by_image.setdefault(int(d["image_id"]), []).append(d)
    for v in by_image.values():
        v.sort(key=lambda d: -float(d["score"]))
        del v[100:]  # COCOeval's maxDets
    return by_image


def _instance_mask(coco: COCO, ann: dict[str, Any]) -> np.ndarray:
    """``bool [H, W]`` of one annotation; a malformed segmentation raises ``ValueError`` with a stable message."""
    try:
        return coco.annToMask(ann).astype(bool)
    except Exception as exc:  # pycocotools raises TypeError/KeyError/IndexError... on malformed polygons/RLEs
        raise ValueError(f"segmentation not decodable ({type(exc).__name__})") from None


def validate_coco(entry: dict[str, Any], cfg: IndexConfig) -> IndexResult:
    """Validate an ``evaluate.coco`` entry: each json image decodes, has the json's size and (box sources gt /
    noisy) at least one non-empty instance; every other case is a quarantine row (file, reason), as in the index
    stage. Valid images are :class:`IndexRow` s (``mask_path`` = ``<annotations>#image_id=<id>``)."""
    from pipeline.data.images import DecodeError, image_to_rgb, open_image
    from pipeline.evaluation.user_datasets import IMAGE_SUFFIXES, index_result  # (it imports this module lazily)

    name, source = str(entry["name"]), str(entry["box_source"])
    ann_path = str(entry["annotations"])
    coco = load_coco(ann_path)
    image_dir = Path(entry["images"])
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: COCO image folder not found (evaluate.coco[{name}].images)")
    quarantine: list[QuarantineRow] = []
    rows: list[IndexRow] = []

    def bad(path: str, reason: str, kind: str) -> None:
        quarantine.append(QuarantineRow(path, name, reason, kind))  # type: ignore[arg-type]

    listed = {str(info.get("file_name", "")) for info in coco.imgs.values()}
    for f in sorted(image_dir.iterdir(), key=lambda q: q.name):
        if f.name in listed:
            continue
        if f.is_dir():
            bad(str(f), "stray folder (the images folder is flat; not scanned)", "stray_folder")
        elif f.name.startswith(".") or f.suffix.lower() not in IMAGE_SUFFIXES:
            bad(str(f), "stray file (not an image listed in the annotations json)", "stray_file")
        else:
            bad(str(f), f"no annotations entry for image (not in {ann_path})", "no_mask")
    for ann in sorted(coco.anns.values(), key=lambda a: a["id"]):
        if ann.get("image_id") not in coco.imgs:
            bad(f"{ann_path}#ann={ann['id']}", f"annotation of an unknown image_id {ann.get('image_id')!r}", "no_image")
    for image_id in sorted(coco.imgs):
        info = coco.imgs[image_id]
        path = str(image_dir / str(info.get("file_name", "")))
        if not Path(path).is_file():
            bad(path, f"no image file for annotations entry image_id={image_id}", "no_image")
            continue
        try:
            data = read_regular_file(Path(path))
        except OSError as exc:
            bad(path, f"image not readable: {exc.strerror or exc}", "unreadable")
            continue
        try:
            image = open_image(data)
            if image.mode != "RGB":
                image_to_rgb(image)
        except DecodeError as exc:
            bad(path, f"image not decodable: {exc}", "image_undecodable")
            continue
        (w, h), want = image.size, (int(info.get("width", -1)), int(info.get("height", -1)))
        if (w, h) != want:
            bad(path, f"image size {w}x{h} != annotations size {want[0]}x{want[1]} (image_id={image_id})",
                "size_mismatch")
            continue
        union = np.zeros((h, w), bool)
        area = 0
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False)):
            where = f"{ann_path}#ann={ann['id']}"
            try:
                m = _instance_mask(coco, ann)
            except ValueError as exc:
                bad(where, f"instance mask of image_id={image_id}: {exc}", "mask_undecodable")
                continue
            if m.shape != (h, w):
                bad(where, f"instance mask size {m.shape[1]}x{m.shape[0]} != image size {w}x{h}", "size_mismatch")
            elif not m.any():
                bad(where, f"empty instance mask (0 px; image_id={image_id})", "empty_mask")
            else:
                union |= m
                area += int(m.sum())
        if not union.any() and source != "detections":
            bad(path, f"no non-empty instance to prompt (image_id={image_id})", "empty_mask")
            continue
        digest = hashlib.sha256(data)
        digest.update(json.dumps(coco.imgToAnns.get(image_id, []), sort_keys=True, default=str).encode())
        rows.append(IndexRow(
            sample_id=f"{name}/{image_id}", dataset=name, split="eval", image_path=path,
            mask_path=f"{ann_path}#image_id={image_id}", height=h, width=w, mask_area=area,
            box=mask_box(union) if union.any() else (0.0, 0.0, float(w - 1), float(h - 1)),
            content_sha256=digest.hexdigest(),
        ))
    return index_result(name, rows, quarantine, SetSummary(name, "eval", candidates=len(coco.imgs)), cfg)


@torch.inference_mode()
def run_coco_benchmark(
    params: Any,
    entry: dict[str, Any],
    predictor: Predictor,
    *,
    progress: bool = True,
) -> tuple[dict[str, dict[str, float]], list[dict[str, Any]]]:
    """Evaluate one ``evaluate.coco`` entry; returns (metrics, prediction rows).

    metrics = ``{"gt_box"|"noisy_box"|"detections": {"map", "map50", "miou", "n"}}`` (percent; n = masks);
    rows carry view_id (image id), prompt_type, draw (instance index), iou, biou (NaN: not computed
    here), alpha1, pred_rle, score, height, width, ann_id, category_id.
    """
    from pipeline.data.images import load_image
    from pipeline.prompts.boxes import mask_to_box, noisy_box
    from pipeline.prompts.seeding import rng_for

    name = str(entry["name"])
    source = str(entry["box_source"])
    key = BOX_SOURCE_KEYS[source]
    coco = load_coco(entry["annotations"])
    image_dir = Path(entry["images"])
    if not image_dir.is_dir():
        raise FileNotFoundError(f"{image_dir}: COCO image folder not found (check evaluate.coco[].images for {name!r})")
    detections = _load_detections(entry["detections"]) if source == "detections" else {}
    ev = params.evaluate
    valid = validate_coco(entry, params.index).rows
    if not valid:
        raise EvaluationError(f"{name}: no valid image in {image_dir} (see the quarantine warnings above)")
    valid_ids = {r.sample_id for r in valid}
    image_ids = [i for i in sorted(coco.imgs) if f"{name}/{i}" in valid_ids]
    if params.data.max_images_per_set:
        image_ids = image_ids[: params.data.max_images_per_set]

    results: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    done: list[int] = []
    ious: list[float] = []
    for image_id in tqdm(image_ids, desc=f"{name} [{key}]", unit="img", disable=not progress):
        info = coco.imgs[image_id]
        image = load_image(image_dir / info["file_name"])  # validated above
        hw = (int(info["height"]), int(info["width"]))
        prompts: list[Prompt] = []
        meta: list[tuple[int, int, dict[str, Any] | None]] = []  # (ann_id, category_id, gt rle)
        if source == "detections":
            for i, d in enumerate(detections.get(image_id, [])):
                prompts.append(Prompt(box=xywh_to_xyxy(d["bbox"]), prompt_type=key, draw=i))
                meta.append((-1, int(d["category_id"]), None))
        else:
            anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id], iscrowd=False))
            for ann in anns:
                try:
                    gt_mask = _instance_mask(coco, ann)
                except ValueError:
                    continue  # quarantined by validate_coco
                if gt_mask.shape != hw or not gt_mask.any():
                    continue
                box = mask_to_box(gt_mask)
                if source == "noisy":
                    rng = rng_for(params.prompts.seed, "coco", name, image_id, ann["id"])
                    box = noisy_box(box, hw, params.prompts.box_noise_scale, params.prompts.noisy_box_min_iou, rng).box
                prompts.append(Prompt(box=box, prompt_type=key, draw=len(prompts)))
                meta.append((int(ann["id"]), int(ann["category_id"]), coco.annToRLE(ann)))
        done.append(image_id)
        if not prompts:
            continue
        predictor.set_image(image)
        rles, score, alpha1 = predict_rles(predictor, prompts, batch_size=ev.batch_size)
        for i, (pr, rle, (ann_id, cat, gt_rle)) in enumerate(zip(prompts, rles, meta)):
            iou = float("nan")
            if gt_rle is not None:
                iou = float(np.asarray(mask_utils.iou([_bytes_rle(rle)], [gt_rle], [0])).reshape(-1)[0])
                ious.append(iou)
            s = float(detections[image_id][i]["score"]) if source == "detections" else float(score[i])
            results.append({"image_id": image_id, "category_id": cat, "segmentation": rle, "score": s})
            rows.append({
                "view_id": str(image_id), "prompt_type": key, "draw": pr.draw, "iou": iou, "biou": float("nan"),
                "alpha1": float("nan") if alpha1 is None else float(alpha1[i]), "pred_rle": rle["counts"],
                "score": s, "height": hw[0], "width": hw[1], "ann_id": ann_id, "category_id": cat,
            })
    if not done:
        raise EvaluationError(f"{name}: no image of {image_dir} could be evaluated (see the quarantine warnings above)")
    scores = segm_map(coco, results, image_ids=done)
    metrics = {key: {**scores, "n": len(results)}}
    if source != "detections":
        metrics[key]["miou"] = float(np.mean(ious) * 100.0) if ious else float("nan")
    return metrics, rows


def _bytes_rle(rle: dict[str, Any]) -> dict[str, Any]:
    counts = rle["counts"]
    return {"size": rle["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}


__all__ = ["BOX_SOURCE_KEYS", "coco_from_dict", "load_coco", "run_coco_benchmark", "segm_map", "validate_coco",
           "xywh_to_xyxy"]
