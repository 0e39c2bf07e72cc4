"""User datasets (evaluate.folders / evaluate.coco): validated like the HQ sets, tracked by DVC, named strictly.

- every bad file of a folder or COCO dataset is a quarantine row with a stable reason, never a crash or a
  silent skip, and the index stage writes its counts (shown in the report);
- dvc.yaml gives each user dataset its own stages whose deps are its files, and no evaluate stage depends
  on the list of benchmarks or on the whole ``evaluate`` section (checked on DVC's own resolution);
- a typo in ``evaluate.benchmarks`` fails at load time naming the key and the valid names.

    .venv/bin/pytest tests/test_user_datasets.py -q
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

from pipeline import PROJECT_ROOT
from pipeline.config import ConfigError, replace
from pipeline.evaluation.coco import validate_coco
from pipeline.evaluation.user_datasets import validate_folder, write_user_index
from pipeline.evaluation.summary_md import read_user_indexes, user_dataset_lines
from tests.fakes import TEST_PARAMS_PATH, load_test_params

DVC = Path(sys.executable).with_name("dvc")


def _img(path: Path, h: int, w: int) -> None:
    Image.fromarray(np.full((h, w, 3), 90, np.uint8)).save(path)


def _mask(path: Path, h: int, w: int, on: bool = True) -> None:
    m = np.zeros((h, w), np.uint8)
    if on:
        m[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 255
    Image.fromarray(m).save(path)


@pytest.fixture()
def folder(tmp_path: Path) -> dict[str, str]:
    """A user folder with one good pair and each kind of defect."""
    im, gt = tmp_path / "im", tmp_path / "gt"
    im.mkdir()
    gt.mkdir()
    _img(im / "good.jpg", 40, 50)
    _mask(gt / "good_mask.png", 40, 50)
    _img(im / "nomask.jpg", 40, 50)                       # image without a mask
    _mask(gt / "noimage_mask.png", 40, 50)                # mask without an image
    (im / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")  # corrupt image
    _mask(gt / "corrupt_mask.png", 40, 50)
    _img(im / "size.jpg", 40, 50)                         # wrong-size mask
    _mask(gt / "size_mask.png", 30, 50)
    _img(im / "empty.jpg", 40, 50)                        # empty mask
    _mask(gt / "empty_mask.png", 40, 50, on=False)
    return {"name": "mine", "images": str(im), "masks": str(gt), "mask_suffix": "_mask.png"}


EXPECTED_FOLDER = {
    "nomask.jpg": ("no_mask", "no mask for image"),
    "noimage_mask.png": ("no_image", "no image for mask"),
    "corrupt.jpg": ("image_undecodable", "image not decodable"),
    "size_mask.png": ("size_mismatch", "mask size 50x30 != image size 50x40"),
    "empty_mask.png": ("empty_mask", "empty mask"),
}


def test_folder_defects_are_quarantined_with_stable_reasons(folder: dict[str, str]) -> None:
    params = load_test_params()
    first = validate_folder(folder, params.index)
    assert [r.sample_id for r in first.rows] == ["mine/good"]
    got = {Path(q.path).name: (q.kind, q.reason) for q in first.quarantine}
    assert set(got) == set(EXPECTED_FOLDER)
    for name, (kind, reason) in EXPECTED_FOLDER.items():
        assert got[name][0] == kind and reason in got[name][1], (name, got[name])
    assert not any(re.search(r"0x[0-9a-fA-F]{6,}", q.reason) for q in first.quarantine)  # no memory address
    again = validate_folder(folder, params.index)
    assert [(q.path, q.reason) for q in again.quarantine] == [(q.path, q.reason) for q in first.quarantine]


def test_index_only_writes_counts_and_quarantine(folder: dict[str, str], tmp_path: Path) -> None:
    params = replace(load_test_params(), **{"evaluate.folders": [folder], "evaluate.coco": []})
    doc = write_user_index(params, "mine", out=tmp_path / "eval", index_dir=tmp_path / "idx")
    assert doc["valid"] == 1 and doc["quarantined"] == len(EXPECTED_FOLDER) and doc["format"] == "folder"
    assert doc["reasons"] == {k: 1 for k, _ in EXPECTED_FOLDER.values()}
    assert json.loads((tmp_path / "eval" / "mine" / "index.json").read_text()) == doc
    q = pq.read_table(tmp_path / "idx" / "mine" / "quarantine.parquet").to_pylist()
    assert sorted(Path(r["path"]).name for r in q) == sorted(EXPECTED_FOLDER)
    assert pq.read_table(tmp_path / "idx" / "mine" / "index.parquet").num_rows == 1
    docs, notes = read_user_indexes(params, tmp_path / "eval")
    md = "\n".join(user_dataset_lines(docs))
    assert docs == [doc] and not notes and "| mine | folder | 1 | 5 |" in md and "no mask for image" in md


def test_index_only_cli_checks_the_entry(folder: dict[str, str], tmp_path: Path) -> None:
    params = yaml.safe_load(TEST_PARAMS_PATH.read_text())
    params["evaluate"]["folders"] = [folder]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    base = [sys.executable, "-m", "stages.evaluate", "--params", str(tmp_path / "params.yaml"), "--index-only",
            "--out", str(tmp_path / "eval"), "--index-dir", str(tmp_path / "idx")]
    entry = [a for k, v in folder.items() for a in (f"--{k}", v)]
    ok = subprocess.run(base + entry, cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "1 valid, 5 quarantined" in ok.stdout
    stale = subprocess.run(base + entry[:-1] + [".png"], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert stale.returncode == 2 and "evaluate.folders[mine].mask_suffix" in stale.stderr


def test_coco_defects_are_quarantined(tmp_path: Path) -> None:
    d = tmp_path / "images"
    d.mkdir()
    _img(d / "1.jpg", 20, 30)
    (d / "2.jpg").write_bytes(b"garbage")
    _img(d / "3.jpg", 25, 30)                             # the json says 20x30
    _img(d / "5.jpg", 20, 30)                             # only an empty instance
    _img(d / "extra.jpg", 20, 30)                         # not in the json
    poly = [[2, 2, 20, 2, 20, 15, 2, 15]]
    images = [{"id": i, "file_name": f"{i}.jpg", "height": 20, "width": 30} for i in (1, 2, 3, 4, 5)]
    anns = [{"id": 10 + i, "image_id": i, "category_id": 1, "segmentation": poly, "area": 200.0,
             "bbox": [2, 2, 18, 13], "iscrowd": 0} for i in (1, 2, 3, 4)]
    anns.append({"id": 15, "image_id": 5, "category_id": 1, "segmentation": {"size": [20, 30], "counts": [600]},
                 "area": 0.0, "bbox": [0, 0, 0, 0], "iscrowd": 0})
    (tmp_path / "inst.json").write_text(json.dumps({"images": images, "annotations": anns,
                                                    "categories": [{"id": 1, "name": "a"}]}))
    entry = {"name": "toy", "images": str(d), "annotations": str(tmp_path / "inst.json"), "box_source": "gt",
             "detections": ""}
    res = validate_coco(entry, load_test_params().index)
    assert [r.sample_id for r in res.rows] == ["toy/1"]
    kinds = sorted(q.kind for q in res.quarantine)
    assert kinds == sorted(["image_undecodable", "size_mismatch", "no_image", "no_mask", "empty_mask",
                            "empty_mask"]), [(q.path, q.reason) for q in res.quarantine]
    assert not any(re.search(r"0x[0-9a-fA-F]{6,}", q.reason) for q in res.quarantine)


# ----------------------------------------------------------------------------------------------- config
def test_benchmark_typo_is_rejected_naming_the_valid_names() -> None:
    params = load_test_params()
    with pytest.raises(ConfigError, match=r"evaluate\.benchmarks: unknown benchmark 'COIFt'.*DIS5K-VD.*COIFT") as exc:
        replace(params, **{"evaluate.benchmarks": ["COIFt"]})
    assert "coco_synth" in str(exc.value)  # the user datasets are named too
    with pytest.raises(ConfigError, match="evaluate.benchmarks: unknown benchmark 'DIS5K-TR'"):
        replace(params, **{"evaluate.benchmarks": ["DIS5K-TR"]})  # a training set has no eval cache
    with pytest.raises(ConfigError, match="evaluate.benchmarks: 'coco_synth' is an evaluate.coco entry"):
        replace(params, **{"evaluate.benchmarks": ["COIFT", "coco_synth"]})


# ------------------------------------------------------------------------------------------------- dvc
def _resolved_stages(repo: Path) -> dict[str, dict[str, Any]]:
    """DVC's own resolution of dvc.yaml (foreach/matrix expanded): {stage: {"deps", "params", "cmd"}}."""
    code = ("import json, sys\nfrom dvc.repo import Repo\nout = {}\nfor s in Repo(sys.argv[1]).index.stages:\n"
            "    params = sorted(k for d in s.deps if hasattr(d, 'params') for k in (d.params or []))\n"
            "    out[s.addressing] = {'deps': [d.def_path for d in s.deps if not hasattr(d, 'params')],\n"
            "                         'params': params, 'cmd': s.cmd}\nprint(json.dumps(out))\n")
    res = subprocess.run([sys.executable, "-c", code, str(repo)], capture_output=True, text=True, cwd=repo)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.fixture()
def scratch_repo(tmp_path: Path) -> Path:
    """A git+dvc repo with the project's dvc.yaml and params.yaml plus one user folder dataset."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(PROJECT_ROOT / "dvc.yaml", repo / "dvc.yaml")
    params = yaml.safe_load(TEST_PARAMS_PATH.read_text())
    params["evaluate"]["folders"] = [{"name": "mine", "images": "user/im", "masks": "user/gt", "mask_suffix": ".png"}]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for sub in ("user/im", "user/gt"):
        (repo / sub).mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=repo, check=True)
    return repo


@pytest.mark.skipif(not DVC.is_file(), reason="dvc is not installed in the venv")
def test_dvc_user_dataset_stages_track_their_files(scratch_repo: Path) -> None:
    stages = _resolved_stages(scratch_repo)
    params = load_test_params()
    coco = params.evaluate.coco[0]
    for method in params.evaluate.methods:
        folder = stages[f"evaluate_folder@ds0-{method}"]
        assert {"user/im", "user/gt"} <= set(folder["deps"]) and "--mask_suffix .png" in folder["cmd"]
        cstage = stages[f"evaluate_coco@ds0-{method}"]
        assert {coco["images"], coco["annotations"]} <= set(cstage["deps"])
    assert {"user/im", "user/gt"} <= set(stages["index_folder@0"]["deps"])
    assert {coco["images"], coco["annotations"]} <= set(stages["index_coco@0"]["deps"])
    for name, st in stages.items():
        assert "evaluate" not in st["params"], f"{name} depends on the whole evaluate section"
        if name.startswith(("evaluate", "index_")):
            # an HQ set's stage scores every listed method (unchanged ones reused), so the list is its param
            lists = ("evaluate.benchmarks", "evaluate.coco", "evaluate.folders") + (
                () if name.startswith("evaluate@") else ("evaluate.methods",))
            assert not any(p.startswith(lists) for p in st["params"]), (name, st["params"])


@pytest.mark.slow  # several dvc subprocesses (~1 min on 2 cores)
@pytest.mark.skipif(not DVC.is_file(), reason="dvc is not installed in the venv")
def test_dvc_status_sees_a_new_image_pair(scratch_repo: Path) -> None:
    repo = scratch_repo
    for code in ("stages", "pipeline"):
        shutil.copytree(PROJECT_ROOT / code, repo / code, ignore=shutil.ignore_patterns("__pycache__"))
    _img(repo / "user/im/a.jpg", 20, 20)
    _mask(repo / "user/gt/a.png", 20, 20)
    (repo / "data/eval_index/mine").mkdir(parents=True)
    (repo / "data/eval_index/mine/index.parquet").write_bytes(b"stand-in")
    (repo / "metrics/eval/mine").mkdir(parents=True)
    (repo / "metrics/eval/mine/index.json").write_text("{}")
    stage = "index_folder@0"
    subprocess.run([str(DVC), "commit", "-f", "-q", stage], cwd=repo, check=True, capture_output=True)

    def changed() -> str:
        res = subprocess.run([str(DVC), "status", "--json", stage], cwd=repo, capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        return res.stdout

    assert json.loads(changed() or "{}") == {}  # committed: up to date
    _img(repo / "user/im/b.jpg", 20, 20)   # a new image pair in the user's folder
    _mask(repo / "user/gt/b.png", 20, 20)
    after = changed()
    assert "user/im" in after and "user/gt" in after, after
