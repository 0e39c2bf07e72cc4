"""Tests of the index stage (pipeline.data.index, pipeline.data.images, stages.index) on a tiny tree."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.config import Params, replace
from pipeline.data import images as images_mod
from pipeline.data import index as index_mod
from pipeline.data import pairs as pairs_mod
from pipeline.data.index import IndexBuildError, build_index, read_index, write_index
from pipeline.data.layout import get_set
from tests.fakes import image_bytes, load_test_params, png_bytes, put_file, rect_mask, write_test_params

W, H = 40, 32
DIS, FSS, COIFT = get_set("DIS5K-TR"), get_set("FSS"), get_set("COIFT")


def _params(**extra: object) -> Params:
    over = {"data.train_sets": ["DIS5K-TR", "FSS"], "data.eval_sets": ["COIFT"], "data.max_images_per_set": 0,
            "index.mask_threshold": 128, "index.min_mask_pixels": 16}
    over.update(extra)
    return load_test_params(**over)


@pytest.fixture()
def tree(tmp_path: Path) -> Path:
    """DIS5K-TR (separate folders) with every defect, FSS (side by side) and COIFT (eval)."""
    root = tmp_path / "hqseg44k"
    im, gt = DIS.image_dir, DIS.mask_dir
    put_file(root, im, "good.jpg", image_bytes())
    put_file(root, gt, "good.png", png_bytes(rect_mask()))
    put_file(root, im, "corrupt.jpg", np.random.default_rng(1).bytes(500))
    put_file(root, gt, "corrupt.png", png_bytes(rect_mask()))
    noisy = np.where(np.random.default_rng(2).random((H, W)) > 0.5, 255, 0).astype(np.uint8)
    full = png_bytes(noisy)
    put_file(root, im, "truncated.jpg", image_bytes())
    put_file(root, gt, "truncated.png", full[: len(full) // 2])
    put_file(root, im, "size.jpg", image_bytes())
    put_file(root, gt, "size.png", png_bytes(rect_mask(w=30)))
    put_file(root, im, "empty.jpg", image_bytes())
    put_file(root, gt, "empty.png", png_bytes(np.full((H, W), 128, np.uint8)))  # 128 is not > 128
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., :3] = 255  # constant colour: the shape is in alpha
    rgba[..., 3] = rect_mask()
    put_file(root, im, "rgba.jpg", image_bytes())
    put_file(root, gt, "rgba.png", png_bytes(rgba))
    sixteen = np.zeros((H, W), np.uint16)
    sixteen[5:15, 10:30] = 40000  # /257 = 155.6 > 128: foreground
    sixteen[20:30, 0:40] = 30000  # /257 = 116.7: background (raw value is > 128!)
    put_file(root, im, "sixteen.jpg", image_bytes())
    put_file(root, gt, "sixteen.png", png_bytes(sixteen))
    pal = Image.frombytes("P", (W, H), np.where(rect_mask() > 0, 1, 2).astype(np.uint8).tobytes())
    pal.putpalette([0, 0, 0, 255, 255, 255, 10, 10, 10] + [0] * 759)  # index 1 = white, 2 = near black
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    put_file(root, im, "palette.jpg", image_bytes())
    put_file(root, gt, "palette.png", buf.getvalue())
    put_file(root, im, "gray.jpg", image_bytes("L"))
    put_file(root, gt, "gray.png", png_bytes(rect_mask()))
    put_file(root, im, "cmyk.jpg", image_bytes("CMYK"))
    put_file(root, gt, "cmyk.png", png_bytes(rect_mask()))
    put_file(root, im, "pngimage.png", image_bytes(fmt="PNG"))
    put_file(root, gt, "pngimage.png", png_bytes(rect_mask()))
    put_file(root, im, "nomask.jpg", image_bytes())
    put_file(root, gt, "orphan.png", png_bytes(rect_mask()))
    put_file(root, im, "readme.txt", b"hello")
    put_file(root, gt, "Thumbs.db", b"\0\0")

    put_file(root, FSS.image_dir, "a.jpg", image_bytes())
    put_file(root, FSS.image_dir, "a.png", png_bytes(rect_mask()))
    put_file(root, FSS.image_dir, "b.jpeg", image_bytes())
    put_file(root, FSS.image_dir, "b.png", png_bytes(rect_mask()))
    put_file(root, FSS.image_dir, "c.png", png_bytes(rect_mask()))  # in a side-by-side set a lone .png is a mask
    put_file(root, FSS.image_dir, ".DS_Store", b"\0")

    put_file(root, COIFT.image_dir, "x.jpg", image_bytes())
    put_file(root, COIFT.mask_dir, "x.png", png_bytes(rect_mask()))
    return root


EXPECTED_IDS = {
    "DIS5K-TR/good", "DIS5K-TR/rgba", "DIS5K-TR/sixteen", "DIS5K-TR/palette", "DIS5K-TR/gray",
    "DIS5K-TR/cmyk", "DIS5K-TR/pngimage", "FSS/a", "FSS/b", "COIFT/x",
}
EXPECTED_QUARANTINE = {  # path -> reason substring
    f"{DIS.image_dir}/corrupt.jpg": "image not decodable",
    f"{DIS.mask_dir}/truncated.png": "mask not decodable",
    f"{DIS.mask_dir}/size.png": "mask size 30x32 != image size 40x32",
    f"{DIS.mask_dir}/empty.png": "empty mask (0 px > 128",
    f"{DIS.image_dir}/nomask.jpg": "no mask for image",
    f"{DIS.mask_dir}/orphan.png": "no image for mask",
    f"{DIS.image_dir}/readme.txt": "stray file",
    f"{DIS.mask_dir}/Thumbs.db": "stray file",
    f"{FSS.image_dir}/c.png": "no image for mask",
    f"{FSS.image_dir}/.DS_Store": "stray file",
}


def test_index_and_quarantine_exact(tree: Path) -> None:
    result = build_index(tree, _params(), progress=False)
    assert {r.sample_id for r in result.rows} == EXPECTED_IDS
    got = {q.path: q.reason for q in result.quarantine}
    assert set(got) == set(EXPECTED_QUARANTINE)
    for path, needle in EXPECTED_QUARANTINE.items():
        assert needle in got[path], (path, got[path])
    rows = {r.sample_id: r for r in result.rows}
    # every accepted mask encodes the same rectangle, whatever its PNG mode
    for sid in EXPECTED_IDS:
        r = rows[sid]
        assert (r.height, r.width) == (H, W), sid
        assert r.mask_area == 200, sid
        assert r.box == (10.0, 5.0, 29.0, 14.0), sid
    assert rows["COIFT/x"].split == "eval" and rows["FSS/a"].split == "train"
    assert rows["FSS/b"].image_path == f"{FSS.image_dir}/b.jpeg"
    assert rows["DIS5K-TR/good"].mask_path == f"{DIS.mask_dir}/good.png"
    m = result.metrics()
    assert m["DIS5K-TR"] == {"pairs": 7, "quarantined": 8}
    assert m["FSS"] == {"pairs": 2, "quarantined": 2}
    assert m["total"] == {"pairs": 10, "quarantined": 10}
    assert "DIS5K-TR" in result.summary_table()


def test_content_hash_is_of_both_files(tree: Path) -> None:
    import hashlib

    row = next(r for r in build_index(tree, _params(), progress=False).rows if r.sample_id == "FSS/a")
    expect = hashlib.sha256((tree / row.image_path).read_bytes() + (tree / row.mask_path).read_bytes()).hexdigest()
    assert row.content_sha256 == expect


def test_box_for_irregular_mask() -> None:
    m = np.zeros((20, 30), bool)
    m[3, 7] = m[11, 25] = m[19, 0] = True
    assert index_mod.mask_box(m) == (0.0, 3.0, 25.0, 19.0)
    with pytest.raises(ValueError):
        index_mod.mask_box(np.zeros((4, 4), bool))


def test_set_with_no_valid_pair_is_an_error(tree: Path) -> None:
    # every rectangle (200 px) is now below index.min_mask_pixels
    with pytest.raises(IndexBuildError, match=r"(?s)set DIS5K-TR: 0 valid pairs.*set FSS: 0 valid pairs"):
        build_index(tree, _params(**{"index.min_mask_pixels": 201}), progress=False)


def test_missing_set_folder_is_an_error(tree: Path) -> None:
    params = _params(**{"data.eval_sets": ["COIFT", "HRSOD"]})
    with pytest.raises(IndexBuildError, match="HRSOD.*not found") as exc:
        build_index(tree, params, progress=False)
    assert "download" in str(exc.value)
    with pytest.raises(IndexBuildError, match="dataset root not found"):
        build_index(tree / "nope", _params(), progress=False)


def test_cap_keeps_first_valid_pairs_by_stem(tree: Path) -> None:
    result = build_index(tree, _params(**{"data.max_images_per_set": 2}), progress=False)
    dis = [r.sample_id for r in result.rows if r.dataset == "DIS5K-TR"]
    assert dis == ["DIS5K-TR/cmyk", "DIS5K-TR/good"]  # corrupt.jpg (sorted between them) is skipped
    assert result.sets["DIS5K-TR"].capped and not result.sets["COIFT"].capped
    assert result.metrics()["DIS5K-TR"]["pairs"] == 2


def test_write_read_roundtrip_and_metrics(tree: Path, tmp_path: Path) -> None:
    result = build_index(tree, _params(), progress=False)
    out, metrics = tmp_path / "index", tmp_path / "metrics" / "index.json"
    write_index(result, out, metrics)
    table = read_index(out)
    assert table.schema.field("box").type == pa.list_(pa.float32(), 4)
    assert table.schema.field("height").type == pa.int32() and table.schema.field("mask_area").type == pa.int64()
    assert table.num_rows == len(EXPECTED_IDS)
    assert table.column("sample_id").to_pylist() == [r.sample_id for r in result.rows]
    assert index_mod.index_metadata(table)["mask_threshold"] == 128
    q = pq.read_table(out / "quarantine.parquet")
    assert q.column_names == ["path", "dataset", "reason"] and q.num_rows == len(EXPECTED_QUARANTINE)
    assert json.loads(metrics.read_text()) == result.metrics()
    assert not list(tmp_path.glob(".index.*"))  # no temporary left behind


def test_journal_resume_skips_validated_pairs(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = tmp_path / "journal.jsonl"
    first = build_index(tree, _params(), journal=journal, progress=False)
    with open(journal, "a") as fh:
        fh.write('{"key": "torn')  # a killed run's last line
    monkeypatch.setattr(index_mod, "validate_pair", lambda *a, **k: pytest.fail("pair re-validated"))
    second = build_index(tree, _params(), journal=journal, progress=False)
    assert second.rows == first.rows and second.quarantine == first.quarantine
    # other params invalidate the journal
    monkeypatch.undo()
    third = build_index(tree, _params(**{"index.mask_threshold": 0}), journal=journal, progress=False)
    assert {r.sample_id: r.mask_area for r in third.rows}["DIS5K-TR/sixteen"] == 200 + 400


def test_cli(tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from stages import index as stage

    params_file = write_test_params(tmp_path / "params.yaml", _params())
    out, metrics = tmp_path / "out" / "index", tmp_path / "metrics.json"
    rc = stage.main(["--params", str(params_file), "--root", str(tree), "--out", str(out),
                     "--metrics", str(metrics), "--quiet"])
    assert rc == 0
    assert read_index(out).num_rows == len(EXPECTED_IDS)
    assert json.loads(metrics.read_text())["total"]["quarantined"] == len(EXPECTED_QUARANTINE)
    assert "FSS" in capsys.readouterr().out
    assert not stage.default_journal(out).exists()
    rc = stage.main(["--params", str(params_file), "--root", str(tmp_path / "missing"), "--out", str(out), "--quiet"])
    assert rc == 2 and "download" in capsys.readouterr().err


# ---- pipeline.data.images -------------------------------------------------------------------------
def test_load_mask_modes(tmp_path: Path) -> None:
    rect = rect_mask() > 0
    one = tmp_path / "one.png"
    Image.fromarray(rect).convert("1").save(one)
    assert Image.open(one).mode == "1" and (images_mod.load_mask(one, 128) == rect).all()
    rgb = tmp_path / "rgb.png"
    arr = np.zeros((H, W, 3), np.uint8)
    arr[rect] = (0, 255, 0)  # luminance 150 > 128; the red channel alone would say 0
    Image.fromarray(arr).save(rgb)
    assert (images_mod.load_mask(rgb, 128) == rect).all()
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[rect] = (255, 255, 255, 255)  # colour varies: luminance, not alpha
    rgba[~rect, 3] = 255
    p = tmp_path / "rgba.png"
    Image.fromarray(rgba).save(p)
    assert (images_mod.load_mask(p, 128) == rect).all()


def test_load_image_is_uint8_rgb_and_names_bad_file(tmp_path: Path) -> None:
    for mode in ("L", "RGBA", "P", "CMYK"):
        p = tmp_path / f"{mode}.{'jpg' if mode in ('L', 'CMYK') else 'png'}"
        p.write_bytes(image_bytes(mode, "JPEG" if mode in ("L", "CMYK") else "PNG"))
        img = images_mod.load_image(p)
        assert img.dtype == np.uint8 and img.shape == (H, W, 3), mode
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(image_bytes()[:200])
    with pytest.raises(images_mod.DecodeError, match="bad.jpg"):
        images_mod.load_image(bad)


# ---- with the embedded generator (another module; skipped if it is not there) --------------------
def test_planted_defects_of_the_generator_are_quarantined(tmp_path: Path, test_params: Params) -> None:
    synthetic = pytest.importorskip("pipeline.data.synthetic")
    cfg = replace(test_params, **{"generate.train_images_per_set": 1, "generate.eval_images_per_set": 1,
                                          "generate.min_side": 64, "generate.max_side": 80,
                                          "generate.inject_defects": True})
    summary = synthetic.generate_dataset(tmp_path / "root", cfg.generate)
    result = build_index(tmp_path / "root", cfg, progress=False)
    quarantined = {(q.dataset, q.path.rsplit("/", 1)[-1]) for q in result.quarantine}
    for d in summary["defects"]:
        assert (d["set"], d["file"]) in quarantined, d
    assert len(result.rows) == len(cfg.data.train_sets) + len(cfg.data.eval_sets)


def test_duplicate_image_stems_are_quarantined(tree: Path) -> None:
    put_file(tree, DIS.image_dir, "good.jpeg", image_bytes(seed=3))
    result = build_index(tree, _params(), progress=False)
    assert "DIS5K-TR/good" not in {r.sample_id for r in result.rows}
    dup = {q.path for q in result.quarantine if "duplicate image" in q.reason or "ambiguous" in q.reason}
    assert dup == {f"{DIS.image_dir}/good.jpg", f"{DIS.image_dir}/good.jpeg", f"{DIS.mask_dir}/good.png"}


def test_pipes_devices_and_huge_files_are_quarantined_not_read(tree: Path, tmp_path: Path) -> None:
    """A named pipe would block `open` forever and a link to /dev/zero never ends: both are refused by
    stat before any read, and a file over the size cap is refused too."""
    import os

    os.mkfifo(tree / DIS.image_dir / "pipe.jpg")
    put_file(tree, DIS.mask_dir, "pipe.png", png_bytes(rect_mask()))
    os.symlink("/dev/zero", tree / DIS.image_dir / "zero.jpg")
    put_file(tree, DIS.mask_dir, "zero.png", png_bytes(rect_mask()))
    result = build_index(tree, _params(), progress=False)
    got = {q.path: q.reason for q in result.quarantine}
    assert "named pipe" in got[f"{DIS.image_dir}/pipe.jpg"]
    assert "device" in got[f"{DIS.image_dir}/zero.jpg"]
    big = tmp_path / "big.bin"
    big.write_bytes(b"0" * 2048)
    with pytest.raises(OSError, match="more than the 1024"):
        pairs_mod.read_regular_file(big, max_bytes=1024)


def test_quarantine_reasons_are_the_same_on_every_run(tree: Path) -> None:
    put_file(tree, DIS.image_dir, "junk.jpg", b"definitely not an image")
    put_file(tree, DIS.mask_dir, "junk.png", png_bytes(rect_mask()))
    reasons = [{q.path: q.reason for q in build_index(tree, _params(), progress=False).quarantine} for _ in range(2)]
    assert reasons[0] == reasons[1]
    junk = reasons[0][f"{DIS.image_dir}/junk.jpg"]
    assert "0x" not in junk and "the file's bytes" in junk
