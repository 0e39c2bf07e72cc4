"""`dvc plots show` works offline: the project's HTML template inlines the pinned vega libraries, DVC uses it
(.dvc/config), and every chart of a rendered page draws to SVG with only those libraries (node, no network).

    .venv/bin/pytest -q tests/test_plots_offline.py
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pipeline import PROJECT_ROOT
from pipeline.common.cli import StageError
from pipeline.evaluation.plots_template import LIBRARIES, VendoredLibrary, fetch_library

TEMPLATE = PROJECT_ROOT / "docs" / "dvc_plots.html"
DVC = Path(sys.executable).with_name("dvc")
NODE = shutil.which("node")
_SCRIPT = re.compile(r'<script type="text/javascript">\n([\s\S]*?)\n    </script>')


def test_committed_template_inlines_exactly_the_pinned_libraries() -> None:
    html = TEMPLATE.read_text(encoding="utf-8")
    codes = [c.replace("<\\/script", "</script") for c in _SCRIPT.findall(html)]
    assert [hashlib.sha256(c.encode()).hexdigest() for c in codes] == [lib.sha256 for lib in LIBRARIES]
    assert "{plot_divs}" in html and "{scripts}" not in html  # no placeholder for DVC's CDN tags
    assert not re.search(r'<script[^>]+src="https?:', html)
    assert "[plots]" in (PROJECT_ROOT / ".dvc" / "config").read_text()


def _fake_registry(root: Path, lib: VendoredLibrary, code: bytes) -> str:
    folder = root / lib.name / "-"
    folder.mkdir(parents=True)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in ((lib.member, code), ("package/LICENSE", b"licence text")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (folder / f"{lib.name}-{lib.version}.tgz").write_bytes(buf.getvalue())
    return root.as_uri()


def test_fetch_refuses_a_library_whose_checksum_differs(tmp_path: Path) -> None:
    good = VendoredLibrary("demo", "1.0.0", "package/build/demo.min.js", hashlib.sha256(b"var a;").hexdigest())
    registry = _fake_registry(tmp_path / "ok", good, b"var a;")
    assert fetch_library(good, registry) == ("var a;", "licence text")
    tampered = _fake_registry(tmp_path / "bad", good, b"var evil;")
    with pytest.raises(StageError, match=r"demo\.min\.js has sha256 .* expected"):
        fetch_library(good, tampered)
    with pytest.raises(StageError, match="cannot download demo"):
        fetch_library(good, (tmp_path / "absent").as_uri())


@pytest.mark.slow
@pytest.mark.skipif(not DVC.is_file(), reason="dvc is not installed in the venv")
def test_dvc_plots_show_page_renders_offline(tmp_path: Path) -> None:
    """A scratch DVC repo with the project's .dvc/config: the page has no external script, and (with node)
    its chart renders to SVG from the inlined libraries alone."""
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    subprocess.run([str(DVC), "init", "-q"], cwd=repo, check=True)
    (repo / ".dvc" / "config").write_text(f"[core]\n    analytics = false\n[plots]\n    html_template = {TEMPLATE}\n")
    (repo / "loss.csv").write_text("step,loss\n" + "".join(f"{i},{1.0 / (i + 1):.4f}\n" for i in range(20)))
    (repo / "dvc.yaml").write_text("plots:\n  - loss.csv:\n      x: step\n      y: loss\n")
    out = tmp_path / "page"
    res = subprocess.run([str(DVC), "plots", "show", "-o", str(out)], cwd=repo, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    html = (out / "index.html").read_text(encoding="utf-8")
    assert not re.search(r'<script[^>]+src="https?:', html) and "vegaEmbed('#" in html
    if NODE is None:
        pytest.skip("node is not installed: the page is offline-clean, its drawing was not executed")
    res = subprocess.run([NODE, str(PROJECT_ROOT / "tests" / "render_vega.js"), str(out / "index.html")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["specs"] == 1 and report["external_scripts"] == []
    assert report["rendered"][0]["marks"] > 20  # the 20-point line and its axes were drawn
