"""The embedded generator: exact HQSeg-44K layout, determinism, planted defects, COCO set."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import Params, replace
from pipeline.data.layout import HQSEG_SETS
from pipeline.data.synthetic import generate_dataset, generate_sample


@pytest.fixture(scope="module")
def small_cfg(test_params: Params):
    params = test_params
    return replace(params, **{"generate.train_images_per_set": 2, "generate.eval_images_per_set": 2}).generate


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(tmp_path, small_cfg):
    generate_dataset(tmp_path / "a", small_cfg)
    generate_dataset(tmp_path / "b", small_cfg)
    a, b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert a == b and len(a) > 40


def test_other_seed_other_bytes(tmp_path, small_cfg):
    from dataclasses import replace as dc_replace

    generate_dataset(tmp_path / "a", small_cfg)
    generate_dataset(tmp_path / "b", dc_replace(small_cfg, seed=small_cfg.seed + 1))
    a, b = _tree_digest(tmp_path / "a"), _tree_digest(tmp_path / "b")
    assert a.keys() == b.keys()
    assert sum(a[k] != b[k] for k in a) > len(a) // 2


def test_exact_layout_and_pairs(tmp_path, small_cfg):
    root = tmp_path / "hq"
    summary = generate_dataset(root, small_cfg)
    for layout in HQSEG_SETS:
        images = sorted((root / layout.image_dir).glob("*.jpg"))
        masks = sorted((root / layout.mask_dir).glob("*.png"))
        assert len(images) >= 2, layout.name
        for img_path in images[:2]:
            mask_path = root / layout.mask_dir / (img_path.stem + ".png")
            img, mask = Image.open(img_path), Image.open(mask_path)
            assert img.format == "JPEG" and mask.format == "PNG"
            assert img.size == mask.size
            m = np.asarray(mask)
            assert set(np.unique(m)) <= {0, 255} and (m > 128).sum() > 0
        if layout.side_by_side:
            assert layout.image_dir == layout.mask_dir
        assert len(masks) >= 2
    assert {d["set"] for d in summary["defects"]} <= {s.name for s in HQSEG_SETS if s.split == "train"}
    coco = json.loads((root / "coco_synth/annotations/instances_synth.json").read_text())
    assert len(coco["images"]) == 16 and len(coco["annotations"]) > len(coco["images"])


def test_scenes_vary_and_have_distractors():
    sizes, n_instances = set(), []
    for i in range(12):
        s = generate_sample(np.random.default_rng([3, i]), "thin" if i % 2 else "salient", 160, 320, 4)
        sizes.add(s.image.shape[:2])
        n_instances.append(len(s.instances))
        assert s.target.any() and s.image.dtype == np.uint8
        # the target's visible mask is one of the annotated instances
        assert any((m == s.target).all() for _, m in s.instances)
    assert len(sizes) >= 10  # varied sizes / aspect ratios
    assert np.mean(n_instances) >= 2  # distractors present
