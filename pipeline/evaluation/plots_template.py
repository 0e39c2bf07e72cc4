"""An HTML template for ``dvc plots show`` that works offline.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so offline only the PNG plots appear.
This module builds ``docs/dvc_plots.html``: the same page with the three libraries (the versions DVC's
renderer targets) inlined from their npm packages, each checked against a pinned sha256, with their BSD
licence notices kept. The template has no ``{scripts}`` placeholder, so DVC adds no CDN tags;
``.dvc/config`` points ``plots.html_template`` at it. Rebuilding needs the npm registry once:

    python -m pipeline.evaluation.plots_template --out docs/dvc_plots.html
"""
from __future__ import annotations

import argparse
import hashlib
import io
import sys
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline.common.atomic import atomic_write_text
from pipeline.common.cli import StageError, run_stage

DEFAULT_REGISTRY = "https://registry.npmjs.org"


@dataclass(frozen=True)
class VendoredLibrary:
    """One npm package file inlined into the template."""

    name: str
    version: str
    member: str  # path inside the package tarball
    sha256: str  # of that file

    def tarball_url(self, registry: str) -> str:
        return f"{registry.rstrip('/')}/{self.name}/-/{self.name}-{self.version}.tgz"


# The versions dvc-render's VegaRenderer loads from the CDN.
LIBRARIES = (
    VendoredLibrary("vega", "5.20.2", "package/build/vega.min.js",
                    "4794d0169cb1f3ebad8117fe98ba5bd652dd725905ec0384e832391dbccb03be"),
    VendoredLibrary("vega-lite", "5.2.0", "package/build/vega-lite.min.js",
                    "d73157451b3978015ab31dacd55ff90d986ab8663fc0abed50f97b3cd90002cb"),
    VendoredLibrary("vega-embed", "6.18.2", "package/build/vega-embed.min.js",
                    "1ba9826431ddc9805e815ad92acc811c819f2bfd32bda2a128b8c4b5070fab5e"),
)

_PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC plots (offline)</title>
{libraries}
    <style>
        table {{ border-spacing: 15px; }}
        body {{ font-family: sans-serif; }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def fetch_library(lib: VendoredLibrary, registry: str = DEFAULT_REGISTRY, timeout_s: float = 60.0) -> tuple[str, str]:
    """(the library's JavaScript, its LICENSE text) from its npm tarball; the file must match the pinned sha256."""
    url = lib.tarball_url(registry)
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:  # noqa: S310 - https registry or file://
            data = resp.read()
    except OSError as exc:
        raise StageError(f"{url}: cannot download {lib.name} {lib.version} ({exc}); check the npm registry "
                         "(--registry) or your network") from None
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            code = _member(tar, lib.member)
            licence = _member(tar, "package/LICENSE")
    except (tarfile.TarError, KeyError) as exc:
        raise StageError(f"{url}: not the expected npm package ({exc})") from None
    digest = hashlib.sha256(code).hexdigest()
    if digest != lib.sha256:
        raise StageError(f"{url}: {lib.member} has sha256 {digest}, expected {lib.sha256}; refusing to inline it")
    return code.decode("utf-8"), licence.decode("utf-8")


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    """A regular file's bytes, read in memory (nothing is extracted to disk)."""
    info = tar.getmember(name)
    stream = tar.extractfile(info) if info.isfile() else None
    if stream is None:
        raise KeyError(f"{name} is not a regular file")
    return stream.read()


def render_template(scripts: list[tuple[VendoredLibrary, str, str]]) -> str:
    """The page: each library inlined in a ``<script>`` after a comment with its licence."""
    blocks = []
    for lib, code, licence in scripts:
        notice = licence.replace("--", "- -").strip()  # "--" may not appear inside an HTML comment
        safe_code = code.replace("</script", "<\\/script")  # the code cannot close its own tag
        blocks.append(f"    <!-- {lib.name} {lib.version} (npm), licence:\n{notice}\n    -->\n"
                      f"    <script type=\"text/javascript\">\n{safe_code}\n    </script>")
    return _PAGE.format(libraries="\n".join(blocks), refresh_tag="{refresh_tag}", plot_divs="{plot_divs}")


def build_template(out: Path, registry: str = DEFAULT_REGISTRY) -> Path:
    """Fetch the pinned libraries and write the template to ``out`` atomically."""
    scripts = [(lib, *fetch_library(lib, registry)) for lib in LIBRARIES]
    atomic_write_text(out, render_template(scripts))
    print(f"wrote {out} ({Path(out).stat().st_size // 1024} KiB): "
          + ", ".join(f"{lib.name} {lib.version}" for lib in LIBRARIES))
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluation.plots_template",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs/dvc_plots.html"), help="template to write")
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help="npm registry (or a file:// mirror)")
    args = parser.parse_args(argv)
    return run_stage("plots_template", lambda: build_template(args.out, args.registry))


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["LIBRARIES", "VendoredLibrary", "build_template", "fetch_library", "render_template"]
