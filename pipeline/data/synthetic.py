"""The embedded default dataset: a seeded generator that writes the exact HQSeg-44K tree.

Real HQSeg-44K cannot be downloaded here (and weighs 7 GB), so the default profile generates a stand-in
with the same folders, file names and pairing conventions (pipeline/data/layout.py), .jpg images and
.png masks. It is built to be a *fair* stand-in for the things Stable-SAM is about:

- images of varied sizes and aspect ratios, on textured backgrounds (gratings, gradients, noise, clutter);
- exactly one target object per mask; "thin" sets (DIS, ThinObject, COIFT) draw thin and fine structures
  (curves, rings, holes, branching trees, lattices), "salient" sets draw blob-like objects with holes
  and handles;
- distractor objects near or touching the target, sometimes of a similar colour, sometimes in front of it,
  so that a loose box or a single click is genuinely ambiguous.

It also writes a small COCO-format instance set (``coco_synth/``) in which every object is annotated, for
the COCO mAP benchmark, and, when ``generate.inject_defects`` is on, plants the kinds of broken files users
report in the real data (unlabeled FSS images, stray files, a mislabeled/mis-sized mask, an empty mask, a
corrupt JPEG) in training sets only, so the index stage's quarantine is exercised on every run.

Same seed, same bytes: every image draws from its own generator seeded by (seed, set, index).

    python -m stages.download --params params.yaml --out data/hqseg44k   # with data.source: embedded
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.common.atomic import atomic_path
from pipeline.config import GenerateConfig
from pipeline.data.layout import HQSEG_SETS, IMAGE_SUFFIX, MASK_SUFFIX, SetLayout

SHAPES_THIN = ("curve", "tree", "ring", "lattice", "holey_blob", "spiky_blob", "spiky_blob")
SHAPES_SALIENT = ("blob", "holey_blob", "handle_blob", "ring", "blob")
CATEGORIES = ("blob", "holey_blob", "handle_blob", "ring", "curve", "tree", "lattice", "spiky_blob")
COCO_DIR = "coco_synth"
COCO_IMAGES = 16


@dataclass(frozen=True)
class Sample:
    """One generated scene: ``image`` uint8 HxWx3, ``target`` bool HxW (visible target pixels),
    ``instances`` [(category, bool HxW visible mask)] for every object, target included."""

    image: np.ndarray
    target: np.ndarray
    instances: list[tuple[str, np.ndarray]]


# ------------------------------------------------------------------------------------------ textures
def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Textured background: two-colour gradient + oriented gratings + low-contrast clutter + noise."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.uniform(30, 225, 3), rng.uniform(30, 225, 3)
    ang = rng.uniform(0, 2 * math.pi)
    t = ((xx * math.cos(ang) + yy * math.sin(ang)) / max(h, w) + 1) / 2
    img = c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]
    for _ in range(rng.integers(1, 4)):
        freq = rng.uniform(0.02, 0.25)
        a = rng.uniform(0, math.pi)
        amp = rng.uniform(6, 28)
        wave = np.sin((xx * math.cos(a) + yy * math.sin(a)) * freq + rng.uniform(0, 6.3))
        img += amp * wave[..., None] * rng.uniform(0.3, 1.0, 3)[None, None]
    clutter = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(clutter)
    for _ in range(rng.integers(4, 14)):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        r = rng.uniform(4, max(h, w) / 8)
        draw.ellipse([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=int(rng.integers(60, 255)))
    clutter = np.asarray(clutter.filter(ImageFilter.GaussianBlur(2)), np.float32) / 255.0
    img += clutter[..., None] * rng.uniform(-35, 35, 3)[None, None]
    img += rng.normal(0, rng.uniform(2, 8), img.shape)
    return img


def _appearance(rng: np.random.Generator, h: int, w: int, base: np.ndarray | None = None) -> np.ndarray:
    """A float HxWx3 fill for an object: a colour (near ``base`` if given) plus stripes or speckle."""
    color = rng.uniform(20, 235, 3) if base is None else np.clip(base + rng.normal(0, 28, 3), 0, 255)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    fill = np.broadcast_to(color, (h, w, 3)).astype(np.float32).copy()
    kind = rng.integers(0, 3)
    if kind == 0:  # stripes
        a, f = rng.uniform(0, math.pi), rng.uniform(0.15, 0.6)
        fill += rng.uniform(8, 30) * np.sin((xx * math.cos(a) + yy * math.sin(a)) * f)[..., None]
    elif kind == 1:  # speckle
        fill += rng.normal(0, rng.uniform(6, 20), (h, w, 1))
    fill += rng.normal(0, 3, fill.shape)
    return fill


# ------------------------------------------------------------------------------------------ shapes
def _polygon_mask(h: int, w: int, pts: np.ndarray) -> np.ndarray:
    im = Image.new("1", (w, h), 0)
    ImageDraw.Draw(im).polygon([tuple(p) for p in pts.tolist()], fill=1)
    return np.array(im, bool)


def _radial(rng: np.random.Generator, cx: float, cy: float, r: float, n: int = 72, wobble: float = 0.35) -> np.ndarray:
    """Star-convex closed outline: r(θ) = r·(1 + Σ a_k cos(kθ + φ_k))."""
    theta = np.linspace(0, 2 * math.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in range(2, 6):
        rad += rng.uniform(0, wobble / (k - 1)) * np.cos(k * theta + rng.uniform(0, 6.3))
    rad = r * np.clip(rad, 0.35, None)
    aspect = rng.uniform(0.6, 1.4)
    return np.stack([cx + rad * np.cos(theta) * aspect, cy + rad * np.sin(theta) / aspect], 1)


def _stroke_mask(h: int, w: int, paths: list[np.ndarray], width: int) -> np.ndarray:
    im = Image.new("1", (w, h), 0)
    draw = ImageDraw.Draw(im)
    for path in paths:
        draw.line([tuple(p) for p in path.tolist()], fill=1, width=width, joint="curve")
        r = width / 2
        for x, y in (path[0], path[-1]):
            draw.ellipse([x - r, y - r, x + r, y + r], fill=1)
    return np.array(im, bool)


def _shape(rng: np.random.Generator, kind: str, h: int, w: int, cx: float, cy: float, size: float) -> np.ndarray:
    """A bool HxW mask of one object of ``kind`` centred near (cx, cy) with extent ~``size`` px."""
    if kind in ("blob", "holey_blob", "handle_blob", "spiky_blob"):
        body = size / 2 if kind != "spiky_blob" else size / 3.5  # spiky: a smaller body, long thin legs
        mask = _polygon_mask(h, w, _radial(rng, cx, cy, body))
        if kind == "holey_blob":
            for _ in range(rng.integers(1, 4)):
                hx, hy = cx + rng.uniform(-0.2, 0.2) * size, cy + rng.uniform(-0.2, 0.2) * size
                mask &= ~_polygon_mask(h, w, _radial(rng, hx, hy, size * rng.uniform(0.06, 0.14), wobble=0.1))
        if kind == "handle_blob":
            a = rng.uniform(0, 2 * math.pi)
            start = np.array([cx, cy])
            end = start + np.array([math.cos(a), math.sin(a)]) * size * rng.uniform(0.6, 0.9)
            mask |= _stroke_mask(h, w, [np.stack([start, end])], int(max(3, size * rng.uniform(0.05, 0.1))))
        if kind == "spiky_blob":  # a body with thin legs/antennae: the HQ sets' "object with thin parts"
            for _ in range(int(rng.integers(2, 6))):
                a = rng.uniform(0, 2 * math.pi)
                start = np.array([cx, cy])
                mid = start + np.array([math.cos(a), math.sin(a)]) * size * rng.uniform(0.3, 0.45)
                a2 = a + rng.uniform(-0.6, 0.6)
                end = mid + np.array([math.cos(a2), math.sin(a2)]) * size * rng.uniform(0.15, 0.35)
                mask |= _stroke_mask(h, w, [np.stack([start, mid, end])], int(max(3, size * rng.uniform(0.03, 0.06))))
        return mask
    if kind == "ring":
        outer = _polygon_mask(h, w, _radial(rng, cx, cy, size / 2, wobble=0.12))
        inner = _polygon_mask(h, w, _radial(rng, cx, cy, size / 2 * rng.uniform(0.55, 0.8), wobble=0.05))
        mask = outer & ~inner
        if rng.random() < 0.5:  # an open ring: cut a gap
            a = rng.uniform(0, 2 * math.pi)
            gap = _polygon_mask(h, w, np.array([[cx, cy], [cx + size * math.cos(a), cy + size * math.sin(a)],
                                                [cx + size * math.cos(a + 0.5), cy + size * math.sin(a + 0.5)]]))
            mask &= ~gap
        return mask
    if kind == "curve":
        t = np.linspace(0, 1, 60)
        a = rng.uniform(0, 2 * math.pi)
        direction = np.array([math.cos(a), math.sin(a)])
        normal = np.array([-direction[1], direction[0]])
        bend = sum(rng.uniform(-0.25, 0.25) * np.sin((k + 1) * math.pi * t + rng.uniform(0, 6.3)) for k in range(3))
        pts = np.array([cx, cy]) + np.outer(t - 0.5, direction) * size * 1.4 + np.outer(bend, normal) * size
        return _stroke_mask(h, w, [pts], int(rng.integers(4, 10)))
    if kind == "tree":
        paths: list[np.ndarray] = []
        width = int(rng.integers(4, 9))

        def grow(p: np.ndarray, ang: float, length: float, depth: int) -> None:
            end = p + length * np.array([math.cos(ang), math.sin(ang)])
            paths.append(np.stack([p, end]))
            if depth > 0:
                for turn in (-1, 1):
                    grow(end, ang + turn * rng.uniform(0.3, 0.9), length * rng.uniform(0.5, 0.75), depth - 1)

        base = np.array([cx, cy + size * 0.45])
        grow(base, -math.pi / 2 + rng.uniform(-0.3, 0.3), size * 0.45, int(rng.integers(2, 4)))
        return _stroke_mask(h, w, paths, width)
    if kind == "lattice":
        half = size / 2
        x0, x1, y0, y1 = cx - half, cx + half * rng.uniform(0.6, 1), cy - half * rng.uniform(0.6, 1), cy + half
        width = int(rng.integers(4, 8))
        n = int(rng.integers(3, 6))
        paths = [np.array([[x0, y], [x1, y]]) for y in np.linspace(y0, y1, n)]
        paths += [np.array([[x, y0], [x, y1]]) for x in np.linspace(x0, x1, n)]
        return _stroke_mask(h, w, paths, width)
    raise ValueError(f"unknown shape kind {kind!r}")


def _place_near(rng: np.random.Generator, target: np.ndarray, size: float, h: int, w: int) -> tuple[float, float]:
    """A centre for a distractor that touches or nearly touches the target's outline."""
    ys, xs = np.nonzero(target)
    i = rng.integers(len(xs))
    a = rng.uniform(0, 2 * math.pi)
    d = size * rng.uniform(0.3, 0.7)
    return float(np.clip(xs[i] + d * math.cos(a), 0, w - 1)), float(np.clip(ys[i] + d * math.sin(a), 0, h - 1))


# ------------------------------------------------------------------------------------------ scenes
def generate_sample(
    rng: np.random.Generator, style: str, min_side: int, max_side: int, max_distractors: int
) -> Sample:
    """One scene of the given style ("thin" | "salient"); see the module docstring."""
    long_side = int(rng.integers(min_side, max_side + 1))
    aspect = float(np.exp(rng.uniform(math.log(0.6), math.log(1.7))))
    h, w = (long_side, max(48, int(long_side / aspect))) if aspect > 1 else (max(48, int(long_side * aspect)), long_side)
    img = _background(rng, h, w)
    kinds = SHAPES_THIN if style == "thin" else SHAPES_SALIENT
    short = min(h, w)
    for _ in range(20):  # a target that is not too small
        t_kind = str(kinds[rng.integers(len(kinds))])
        t_size = short * rng.uniform(0.35, 0.75)
        tcx, tcy = w / 2 + rng.uniform(-0.25, 0.25) * w, h / 2 + rng.uniform(-0.25, 0.25) * h
        t_mask = _shape(rng, t_kind, h, w, tcx, tcy, t_size)
        if t_mask.sum() >= 0.004 * h * w:
            break
    t_fill = _appearance(rng, h, w)
    t_color = t_fill.reshape(-1, 3).mean(0)

    objects: list[tuple[str, np.ndarray, np.ndarray]] = []  # (kind, shape mask, fill), painted in order
    n_dis = int(rng.integers(1, max_distractors + 1)) if max_distractors > 0 else 0
    for j in range(n_dis):
        kind = str(kinds[rng.integers(len(kinds))] if rng.random() < 0.6 else CATEGORIES[rng.integers(len(CATEGORIES))])
        size = short * rng.uniform(0.15, 0.5)
        if j == 0 or rng.random() < 0.5:  # touching / near the target: the ambiguous case
            cx, cy = _place_near(rng, t_mask, size, h, w)
        else:
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        similar = rng.random() < 0.35
        objects.append((kind, _shape(rng, kind, h, w, cx, cy, size), _appearance(rng, h, w, t_color if similar else None)))
    # The target is usually painted last (fully visible); sometimes a distractor lies in front of it.
    t_pos = len(objects) if rng.random() < 0.7 or not objects else int(rng.integers(0, len(objects)))
    objects.insert(t_pos, (t_kind, t_mask, t_fill))

    labels = np.full((h, w), -1, np.int32)
    for k, (_, mask, fill) in enumerate(objects):
        img[mask] = fill[mask]
        labels[mask] = k
    target = labels == t_pos
    if target.sum() < 0.5 * t_mask.sum():  # hidden too much: bring it to the front
        img[t_mask] = t_fill[t_mask]
        labels[t_mask] = t_pos
        target = labels == t_pos
    # soften edges slightly like a real photo, then quantise
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    instances = [(kind, labels == k) for k, (kind, _, _) in enumerate(objects) if (labels == k).sum() >= 16]
    return Sample(np.asarray(pil), target, instances)


def _jpeg_bytes(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def _png_bytes(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _stem(layout: SetLayout, i: int) -> str:
    prefix = {"FSS": "synth_class"}.get(layout.name, layout.name.lower().replace("-", "_"))
    return f"{prefix}_{i:05d}"


def _write_pair(root: Path, layout: SetLayout, stem: str, image: bytes, mask: bytes | None) -> None:
    (root / layout.image_dir).mkdir(parents=True, exist_ok=True)
    (root / layout.mask_dir).mkdir(parents=True, exist_ok=True)
    (root / layout.image_dir / f"{stem}{IMAGE_SUFFIX}").write_bytes(image)
    if mask is not None:
        (root / layout.mask_dir / f"{stem}{MASK_SUFFIX}").write_bytes(mask)


def _inject_defects(root: Path, cfg: GenerateConfig, rng: np.random.Generator) -> list[dict[str, str]]:
    """Plant the defects users report in the real training sets; returns what was planted."""
    planted: list[dict[str, str]] = []
    by_name = {s.name: s for s in HQSEG_SETS}
    n = cfg.train_images_per_set

    def sample(style: str) -> Sample:
        return generate_sample(rng, style, cfg.min_side, cfg.max_side, cfg.max_distractors)

    fss = by_name["FSS"]
    s = sample("salient")
    _write_pair(root, fss, _stem(fss, n), _jpeg_bytes(s.image), None)
    planted.append({"set": "FSS", "file": f"{_stem(fss, n)}{IMAGE_SUFFIX}", "defect": "unlabeled image (no mask)"})
    for stray in ("Thumbs.db", "readme.txt"):
        (root / fss.image_dir / stray).write_bytes(b"not an image\n")
        planted.append({"set": "FSS", "file": stray, "defect": "stray file"})
    msra = by_name["MSRA10K"]
    s = sample("salient")
    wrong = np.zeros((s.target.shape[0] // 2, s.target.shape[1]), bool)
    wrong[: wrong.shape[0] // 2] = True
    _write_pair(root, msra, _stem(msra, n), _jpeg_bytes(s.image), _png_bytes(wrong))
    planted.append({"set": "MSRA10K", "file": f"{_stem(msra, n)}{MASK_SUFFIX}", "defect": "mask of the wrong size"})
    duts = by_name["DUTS-TR"]
    s = sample("salient")
    _write_pair(root, duts, _stem(duts, n), _jpeg_bytes(s.image), _png_bytes(np.zeros_like(s.target)))
    planted.append({"set": "DUTS-TR", "file": f"{_stem(duts, n)}{MASK_SUFFIX}", "defect": "empty mask"})
    ecssd = by_name["ECSSD"]
    s = sample("salient")
    jpg = _jpeg_bytes(s.image)
    _write_pair(root, ecssd, _stem(ecssd, n), jpg[: len(jpg) // 3], _png_bytes(s.target))
    planted.append({"set": "ECSSD", "file": f"{_stem(ecssd, n)}{IMAGE_SUFFIX}", "defect": "truncated JPEG"})
    return planted


def _write_coco(root: Path, cfg: GenerateConfig) -> dict[str, int]:
    """A COCO-format instance set where every object of every scene is annotated."""
    from pipeline.data import rle as rle_codec

    img_dir = root / COCO_DIR / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(COCO_IMAGES):
        rng = np.random.default_rng([cfg.seed, 1000, i])
        s = generate_sample(rng, "thin" if i % 2 else "salient", cfg.min_side, cfg.max_side, cfg.max_distractors)
        name = f"coco_synth_{i:05d}.jpg"
        (img_dir / name).write_bytes(_jpeg_bytes(s.image))
        h, w = s.target.shape
        images.append({"id": i + 1, "file_name": name, "height": h, "width": w})
        for kind, mask in s.instances:
            ys, xs = np.nonzero(mask)
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": CATEGORIES.index(kind) + 1,
                "segmentation": {"size": [h, w], "counts": rle_codec.encode(mask)},
                "area": int(mask.sum()), "iscrowd": 0,
                "bbox": [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)],
            })
    coco = {
        "info": {"description": "Stable-SAM embedded default: synthetic COCO-format instances"},
        "images": images, "annotations": annotations,
        "categories": [{"id": k + 1, "name": c, "supercategory": "shape"} for k, c in enumerate(CATEGORIES)],
    }
    (root / COCO_DIR / "annotations").mkdir(parents=True, exist_ok=True)
    (root / COCO_DIR / "annotations" / "instances_synth.json").write_text(json.dumps(coco))
    return {"images": len(images), "annotations": len(annotations)}


def generate_dataset(root: Path, cfg: GenerateConfig) -> dict:
    """Write the embedded HQSeg-44K stand-in under ``root`` atomically; returns a summary dict."""
    from tqdm import tqdm

    root = Path(root)
    summary: dict = {"sets": {}, "seed": cfg.seed}
    with atomic_path(root) as tmp:
        tmp.mkdir(parents=True)
        total = sum(cfg.train_images_per_set if s.split == "train" else cfg.eval_images_per_set for s in HQSEG_SETS)
        with tqdm(total=total, desc="generate", unit="img") as bar:
            for set_idx, layout in enumerate(HQSEG_SETS):
                n = cfg.train_images_per_set if layout.split == "train" else cfg.eval_images_per_set
                for i in range(n):
                    rng = np.random.default_rng([cfg.seed, set_idx, i])
                    s = generate_sample(rng, layout.style, cfg.min_side, cfg.max_side, cfg.max_distractors)
                    _write_pair(tmp, layout, _stem(layout, i), _jpeg_bytes(s.image), _png_bytes(s.target))
                    bar.update()
                summary["sets"][layout.name] = n
        if cfg.inject_defects:
            summary["defects"] = _inject_defects(tmp, cfg, np.random.default_rng([cfg.seed, 999]))
        summary["coco_synth"] = _write_coco(tmp, cfg)
        (tmp / "GENERATED.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
