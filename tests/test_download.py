"""Download stage: resumable verified HTTP/file download, safe atomic unzip, HQSeg-44K acquisition.

One module (~400 lines): the probes share the loopback server fixture and the fixture archive.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import stat
import types
import zipfile
from pathlib import Path

import pytest
from PIL import Image

import pipeline.common.http as http_mod
from pipeline.common.archive import ArchiveError, CorruptArchiveError, UnsafeArchiveError, safe_extract_zip
from pipeline.common.http import ChecksumError, DownloadError, download_file, part_path
from pipeline.config import Params, replace
from pipeline.data.download import MANIFEST_NAME, SUMS_NAME, acquire_dataset, download_hqseg44k
from pipeline.data.layout import ARCHIVES, HQSEG_SETS
from tests.fakes import load_test_params, write_test_params
from tests.fixtures_http import LoopbackServer


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries in these tests must not sleep."""
    monkeypatch.setattr(http_mod, "time", types.SimpleNamespace(sleep=lambda s: None))


def _jpg(seed: int) -> bytes:
    img = Image.new("RGB", (12, 8), (seed * 40 % 256, 90, 200))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def _png(seed: int) -> bytes:
    img = Image.new("L", (12, 8), 0)
    img.paste(255, (2, 2, 8 + seed % 3, 6))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _zip(members: dict[str, bytes], *, stored: bool = False) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return buf.getvalue()


def _layout_members(archive: str) -> dict[str, bytes]:
    """One tiny image/mask pair per set shipped by ``archive``, in the real HQSeg-44K folders."""
    members: dict[str, bytes] = {}
    for i, s in enumerate(HQSEG_SETS):
        if s.archive == archive:
            stem = f"{s.name.lower()}_{i}"
            members[f"{s.image_dir}/{stem}.jpg"] = _jpg(i)
            members[f"{s.mask_dir}/{stem}.png"] = _png(i)
    return members


@pytest.fixture(scope="module")
def archives() -> dict[str, bytes]:
    return {name: _zip(_layout_members(name)) for name in ARCHIVES}


def _params(endpoint: str, cache: Path, **extra: object) -> Params:
    return load_test_params(**{
        "data.source": "hqseg44k", "download.endpoint": endpoint, "download.cache_dir": str(cache),
        "download.retries": 1, "download.timeout_s": 10.0, **extra,
    })


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------------------------------- download_file
def test_download_file_file_url(tmp_path: Path) -> None:
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    dest = tmp_path / "out" / "copy.bin"
    digest = download_file(src.as_uri(), dest, expected_sha256=_sha(src.read_bytes()), expected_size=3000)
    assert digest == _sha(src.read_bytes()) and dest.read_bytes() == src.read_bytes()
    assert not part_path(dest).exists()
    # a resumed file:// download appends the missing tail
    dest2 = tmp_path / "out" / "resumed.bin"
    part_path(dest2).write_bytes(src.read_bytes()[:1000])
    assert download_file(src.as_uri(), dest2) == digest
    # wrong checksum: nothing under the final name, the .part is gone
    bad = tmp_path / "out" / "bad.bin"
    with pytest.raises(ChecksumError, match="sha256 mismatch") as err:
        download_file(src.as_uri(), bad, expected_sha256="0" * 64)
    assert "bad.bin" in str(err.value) and "0" * 64 in str(err.value)
    assert not bad.exists() and not part_path(bad).exists()
    with pytest.raises(DownloadError, match="no such file"):
        download_file((tmp_path / "missing.bin").as_uri(), tmp_path / "x.bin")
    with pytest.raises(DownloadError, match="unsupported URL scheme"):
        download_file("ftp://example.org/x", tmp_path / "x.bin")


def test_download_file_resumes_with_range(http_server: LoopbackServer, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    url = http_server.add("big.bin", data)
    dest = tmp_path / "big.bin"
    http_server.cut_after, http_server.cut_times = 70_000, 1
    with pytest.raises(DownloadError, match="re-run to resume"):
        download_file(url, dest, retries=0)
    assert not dest.exists() and part_path(dest).stat().st_size == 70_000
    digest = download_file(url, dest, expected_sha256=_sha(data), retries=0)
    assert http_server.range_requests("/big.bin") == ["bytes=70000-"]
    assert dest.read_bytes() == data and digest == _sha(data) and not part_path(dest).exists()
    # a cut within one call is retried and resumed automatically
    dest2 = tmp_path / "big2.bin"
    http_server.cut_after, http_server.cut_times = 50_000, 1
    assert download_file(url, dest2, expected_size=len(data), retries=2) == _sha(data)
    assert "bytes=50000-" in http_server.range_requests("/big.bin")


def test_download_file_server_ignoring_range_restarts(http_server: LoopbackServer, tmp_path: Path) -> None:
    data = os.urandom(50_000)
    url = http_server.add("f.bin", data)
    dest = tmp_path / "f.bin"
    part_path(dest).write_bytes(b"stale bytes from another version")
    http_server.ignore_range = True
    assert download_file(url, dest, expected_sha256=_sha(data)) == _sha(data)
    assert http_server.range_requests() == ["bytes=32-"]  # asked, got a 200, started over
    assert dest.read_bytes() == data


def test_download_file_server_answering_another_range_is_an_error(http_server: LoopbackServer, tmp_path: Path) -> None:
    """A 206 for bytes nobody asked for: one plain refetch, then a DownloadError (it used to recurse
    until RecursionError)."""
    data = os.urandom(20_000)
    url = http_server.add("lie.bin", data)
    dest = tmp_path / "lie.bin"
    part_path(dest).write_bytes(data[:100])
    http_server.wrong_range_start = 7
    with pytest.raises(DownloadError, match="byte ranges it was not asked for"):
        download_file(url, dest, expected_sha256=_sha(data), retries=2)
    assert http_server.requests == [("/lie.bin", "bytes=100-"), ("/lie.bin", None)]  # at 100, then once from 0
    assert not dest.exists()


def test_download_file_complete_part_and_existing_dest(http_server: LoopbackServer, tmp_path: Path) -> None:
    data = os.urandom(10_000)
    url = http_server.add("g.bin", data)
    dest = tmp_path / "g.bin"
    part_path(dest).write_bytes(data)  # killed after the last byte, before the rename
    assert download_file(url, dest) == _sha(data)  # server answers 416 */10000: the part is complete
    assert dest.read_bytes() == data
    n = len(http_server.requests)
    assert download_file(url, dest, expected_sha256=_sha(data)) == _sha(data)
    assert len(http_server.requests) == n  # already there and verified: no network at all
    dest.write_bytes(b"corrupted")
    assert download_file(url, dest, expected_sha256=_sha(data)) == _sha(data)  # re-fetched
    assert dest.read_bytes() == data


def test_download_file_http_errors(http_server: LoopbackServer, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_file(http_server.url("nope.bin"), tmp_path / "nope.bin", retries=3)
    assert len(http_server.requests) == 1  # a 404 is not retried
    url = http_server.add("h.bin", b"hello")
    http_server.fail_status, http_server.fail_times = 503, 2
    assert download_file(url, tmp_path / "h.bin", retries=2) == _sha(b"hello")
    assert len(http_server.requests) == 4


# ---------------------------------------------------------------------------------------------- safe_extract_zip
def test_safe_extract_zip_refuses_zip_slip(tmp_path: Path) -> None:
    target = tmp_path / "work" / "target"
    for name in ("../evil.txt", "ok/../../evil.txt", str(tmp_path / "abs_evil.txt"), "..\\evil.txt", "C:/evil.txt"):
        arc = tmp_path / "slip.zip"
        arc.write_bytes(_zip({"good/a.txt": b"fine", name: b"pwned"}))
        with pytest.raises(UnsafeArchiveError, match="refusing member"):
            safe_extract_zip(arc, target)
        assert not target.exists()
        assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "work" / "evil.txt").exists()
        assert not (tmp_path / "abs_evil.txt").exists()
    work = tmp_path / "work"
    assert not work.exists() or not any(work.iterdir())  # refused before writing: no temp folder left


def _zip_with_links(links: dict[str, str], files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        for name, link in links.items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, link)
    return buf.getvalue()


def test_safe_extract_zip_symlinks(tmp_path: Path) -> None:
    arc = tmp_path / "links.zip"
    target = tmp_path / "t"
    cases = [
        ({"d/out": "../../outside"}, "points outside"),  # refused before extracting anything
        ({"d/abs": "/etc/passwd"}, "points outside"),
        ({"y": ".", "x": "y/.."}, "through other links"),  # lexically inside, really the parent
    ]
    for links, why in cases:
        arc.write_bytes(_zip_with_links(links, {"d/a.txt": b"a"}))
        with pytest.raises(UnsafeArchiveError, match=why):
            safe_extract_zip(arc, target)
        assert not target.exists()
    arc.write_bytes(_zip_with_links({"d/link.txt": "a.txt"}, {"d/a.txt": b"a"}))
    assert safe_extract_zip(arc, target) == ["d/a.txt"]
    assert (target / "d" / "link.txt").is_symlink() and (target / "d" / "link.txt").read_bytes() == b"a"


def test_safe_extract_zip_corrupt_and_atomic(tmp_path: Path) -> None:
    good = _zip({"top/a.txt": b"A" * 5000, "top/sub/b.txt": b"B" * 5000}, stored=True)
    arc = tmp_path / "a.zip"
    target = tmp_path / "t"
    arc.write_bytes(good[: len(good) // 2])  # truncated: no central directory
    with pytest.raises(CorruptArchiveError, match=r"a\.zip.*delete .*re-run"):
        safe_extract_zip(arc, target)
    flipped = bytearray(good)
    flipped[good.index(b"B" * 100) + 10] ^= 0xFF  # one bad byte in the second member: CRC error
    arc.write_bytes(bytes(flipped))
    with pytest.raises(CorruptArchiveError, match="delete"):
        safe_extract_zip(arc, target)
    assert not target.exists()  # the first member was extracted, but only into a temp folder
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    arc.write_bytes(good)
    assert safe_extract_zip(arc, target) == ["top/a.txt", "top/sub/b.txt"]
    assert (target / "top" / "sub" / "b.txt").read_bytes() == b"B" * 5000
    with pytest.raises(ArchiveError, match="not found"):
        safe_extract_zip(tmp_path / "missing.zip", target)


# ---------------------------------------------------------------------------------------------- HQSeg-44K
def _serve(server: LoopbackServer, archives: dict[str, bytes]) -> None:
    for name, data in archives.items():
        server.add(f"data/{name}", data)


def _assert_tree(out: Path) -> None:
    for s in HQSEG_SETS:
        assert any((out / s.image_dir).glob("*.jpg")), s.name
        assert any((out / s.mask_dir).glob("*.png")), s.name
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["DIS5K", "thin_object_detection", "cascade_psp", MANIFEST_NAME]
    )


def test_hqseg44k_happy_path_records_and_reuses(
    http_server: LoopbackServer, archives: dict[str, bytes], tmp_path: Path
) -> None:
    _serve(http_server, archives)
    cfg = _params(http_server.url("data"), tmp_path / "cache")
    out = tmp_path / "data" / "hqseg44k"
    summary = acquire_dataset(cfg, out)
    assert summary["source"] == "hqseg44k" and not summary["skipped"] and summary["missing_sets"] == []
    _assert_tree(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    sums = json.loads((tmp_path / "cache" / SUMS_NAME).read_text())
    for name, data in archives.items():
        assert manifest["archives"][name]["sha256"] == _sha(data) == sums[name]["sha256"]
        assert manifest["archives"][name]["size"] == len(data) == sums[name]["size"]
        assert manifest["archives"][name]["files"] == len(_layout_members(name))
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["hqseg44k"]  # staging cleaned up
    n = len(http_server.requests)
    assert download_hqseg44k(cfg, out)["skipped"] is True  # complete: no network, no work
    shutil.rmtree(out)  # e.g. `dvc repro` removed the output: cached zips are verified and reused
    assert download_hqseg44k(cfg, out)["skipped"] is False
    assert len(http_server.requests) == n
    _assert_tree(out)
    # the cached zip changed on disk: the recorded sha256 catches it and it is fetched again
    (tmp_path / "cache" / "DIS5K.zip").write_bytes(b"garbage")
    shutil.rmtree(out)
    download_hqseg44k(cfg, out)
    assert (tmp_path / "cache" / "DIS5K.zip").read_bytes() == archives["DIS5K.zip"]
    _assert_tree(out)


def test_hqseg44k_checksum_mismatch_then_clean_run(
    http_server: LoopbackServer, archives: dict[str, bytes], tmp_path: Path
) -> None:
    _serve(http_server, archives)
    cache, out = tmp_path / "cache", tmp_path / "hq"
    bad = _params(http_server.url("data"), cache, **{"download.expected_sha256": {"cascade_psp.zip": "a" * 64}})
    with pytest.raises(ChecksumError) as err:
        download_hqseg44k(bad, out)
    msg = str(err.value)
    assert "cascade_psp.zip" in msg and "a" * 64 in msg and _sha(archives["cascade_psp.zip"]) in msg
    assert "download.expected_sha256.cascade_psp.zip" in msg
    assert not (cache / "cascade_psp.zip").exists() and not part_path(cache / "cascade_psp.zip").exists()
    assert not out.exists()
    good = _params(http_server.url("data"), cache, **{
        "download.expected_sha256": {"cascade_psp.zip": _sha(archives["cascade_psp.zip"])}})
    download_hqseg44k(good, out)
    _assert_tree(out)
    # upstream changes after the sums were recorded: a clear error naming SHA256SUMS.json
    shutil.rmtree(out)
    (cache / "DIS5K.zip").unlink()
    http_server.add("data/DIS5K.zip", _zip({"DIS5K/DIS-TR/im/new.jpg": _jpg(7)}))
    with pytest.raises(ChecksumError, match=SUMS_NAME):
        download_hqseg44k(good, out)
    assert not out.exists()


def test_hqseg44k_zip_slip_archive_refused(
    http_server: LoopbackServer, archives: dict[str, bytes], tmp_path: Path
) -> None:
    evil = dict(_layout_members("thin_object_detection.zip"))
    evil["../../evil.txt"] = b"pwned"
    _serve(http_server, {**archives, "thin_object_detection.zip": _zip(evil)})
    out = tmp_path / "a" / "hq"
    with pytest.raises(UnsafeArchiveError, match="thin_object_detection.zip"):
        download_hqseg44k(_params(http_server.url("data"), tmp_path / "cache"), out)
    assert not out.exists()
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "a" / "evil.txt").exists()
    assert "thin_object_detection.zip" not in json.loads((tmp_path / "cache" / SUMS_NAME).read_text())


def test_hqseg44k_truncated_archive_then_retry(
    http_server: LoopbackServer, archives: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    full = archives["thin_object_detection.zip"]
    _serve(http_server, {**archives, "thin_object_detection.zip": full[: len(full) - 200]})
    cache, out = tmp_path / "cache", tmp_path / "hq"
    cfg = _params(http_server.url("data"), cache)
    with pytest.raises(CorruptArchiveError) as err:
        download_hqseg44k(cfg, out)
    assert str(cache / "thin_object_detection.zip") in str(err.value) and "delete" in str(err.value)
    assert not out.exists()
    assert "thin_object_detection.zip" not in json.loads((cache / SUMS_NAME).read_text())
    (cache / "thin_object_detection.zip").unlink()  # what the error says to do
    http_server.add("data/thin_object_detection.zip", full)
    before = len(http_server.requests)
    extracted: list[str] = []

    def counting_extract(archive: Path, target: Path) -> list[str]:
        extracted.append(archive.name)
        return safe_extract_zip(archive, target)

    monkeypatch.setattr("pipeline.data.download.safe_extract_zip", counting_extract)
    download_hqseg44k(cfg, out)
    assert extracted == ["thin_object_detection.zip", "cascade_psp.zip"]  # DIS5K's extraction survived
    _assert_tree(out)
    # DIS5K.zip (verified in the cache, extracted in staging) was not fetched again
    assert [p for p, _ in http_server.requests[before:]] == [
        "/data/thin_object_detection.zip", "/data/cascade_psp.zip"]


def test_hqseg44k_file_url_and_stage_cli(archives: dict[str, bytes], tmp_path: Path, test_params: Params) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    for name, data in archives.items():
        (mirror / name).write_bytes(data)
    params_file = write_test_params(tmp_path / "params.yaml", test_params, **{
        "data.source": "hqseg44k", "download.endpoint": mirror.as_uri(), "download.cache_dir": str(tmp_path / "cache")})
    from stages.download import main

    out = tmp_path / "hq"
    assert main(["--params", str(params_file), "--out", str(out)]) == 0
    _assert_tree(out)
    (mirror / "cascade_psp.zip").unlink()
    shutil.rmtree(out)
    (tmp_path / "cache" / "cascade_psp.zip").unlink()
    assert main(["--params", str(params_file), "--out", str(out)]) == 2  # one error line, no traceback
    assert not out.exists()


def test_acquire_dataset_embedded_generates_the_layout(tmp_path: Path, test_params: Params) -> None:
    cfg = replace(test_params, **{
        "data.source": "embedded", "download.endpoint": "http://127.0.0.1:9/unreachable",
        "generate.train_images_per_set": 1, "generate.eval_images_per_set": 1,
        "generate.min_side": 64, "generate.max_side": 64, "generate.inject_defects": False,
    })
    out = tmp_path / "hq"
    summary = acquire_dataset(cfg, out)
    assert summary["source"] == "embedded" and summary["root"] == str(out)
    for s in HQSEG_SETS:
        assert len(list((out / s.image_dir).glob("*.jpg"))) == 1, s.name


def test_hqseg44k_accepts_wrapped_or_unwrapped_archives(archives: dict[str, bytes], tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    dis, thin = _layout_members("DIS5K.zip"), _layout_members("thin_object_detection.zip")
    variants = {
        "DIS5K.zip": _zip({k.removeprefix("DIS5K/"): v for k, v in dis.items()}),  # no top folder
        "thin_object_detection.zip": _zip({f"data/{k}": v for k, v in thin.items()}),  # one wrapper folder
        "cascade_psp.zip": _zip({**_layout_members("cascade_psp.zip"), "__MACOSX/._x": b"junk", "README.txt": b"hi"}),
    }
    for name, data in variants.items():
        (mirror / name).write_bytes(data)
    out = tmp_path / "hq"
    download_hqseg44k(_params(mirror.as_uri(), tmp_path / "cache"), out)
    _assert_tree(out)  # exactly the three top folders + MANIFEST.json; junk left out
    (mirror / "DIS5K.zip").write_bytes(_zip({"other/a.jpg": _jpg(1)}))
    shutil.rmtree(out)
    with pytest.raises(ArchiveError, match=r"DIS5K\.zip: none of the expected top folders.*found: other"):
        download_hqseg44k(_params(mirror.as_uri(), tmp_path / "cache2"), out)
    assert not out.exists()
