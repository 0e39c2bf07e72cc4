"""Shared storage (docs/SHARED_STORAGE.md): outputs made in one clone are `dvc push`ed to a DVC remote and
`dvc pull`ed in another clone, where DVC then finds every stage up to date and re-runs none.

One small project (the project's code, copied by :func:`pipeline.rehearsal.copy_project`, on the test profile
shrunk to two images per set and two training steps) runs the stages up to ``train@stable_sam`` and one
evaluate stage, not the whole pipeline: its ~26 stages take over 10 minutes on 2 cores, and the stages past
them add no kind of output (cached directories, cached files, `persist: true` embeddings, `cache: false`
metrics) that these do not already have. 2-3.5 min on 2 cores (the whole pipeline: 12 min).

    .venv/bin/pytest -q tests/test_remote.py
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from pipeline.rehearsal import copy_project
from tests.fakes import write_test_params

pytestmark = pytest.mark.slow

DVC = Path(sys.executable).with_name("dvc")
# The stages run (with their upstream): embeddings, base, prompts, a trained plugin and one evaluation.
TARGETS = ("train@stable_sam", "evaluate@COIFT")
# The test profile shrunk to what every stage still exercises (seconds per stage instead of minutes).
SHRINK = {"generate.train_images_per_set": 2, "generate.eval_images_per_set": 2, "train.max_steps": 2,
          "train.batch_size": 4, "train.sanity_views": 4, "prompts.eval_draws": 1}
PLUGIN = "models/plugins/stable_sam.pt"
GIT_ID = ["-c", "user.name=stable-sam tests", "-c", "user.email=tests@example.invalid"]


def _env() -> dict[str, str]:
    """The venv's `python` first on PATH (the stage commands call `python -m stages.<name>`), analytics off."""
    return {**os.environ, "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
            "PATH": os.pathsep.join([str(DVC.parent), os.environ.get("PATH", "")])}


def run(cwd: Path, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``cwd`` (stdout and stderr together in ``.stdout``); with ``check``, fail showing the output."""
    res = subprocess.run(list(cmd), cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=1200)
    if check:
        assert res.returncode == 0, f"{' '.join(cmd)} failed in {cwd} (exit {res.returncode}):\n{res.stdout}"
    return res


def dvc(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The venv's ``dvc`` with ``args`` in ``cwd`` (see :func:`run`)."""
    return run(cwd, str(DVC), *args, check=check)


def git_clone(source: Path, dest: Path) -> Path:
    """``git clone source dest``; returns ``dest``."""
    run(source.parent, "git", "clone", "-q", str(source), str(dest))
    return dest


def lock_outs(project: Path) -> dict[str, list[str]]:
    """{stage: its output paths} from ``dvc.lock``."""
    lock = yaml.safe_load((project / "dvc.lock").read_text(encoding="utf-8"))
    return {stage: [o["path"] for o in entry.get("outs", [])] for stage, entry in lock["stages"].items()}


def files_under(project: Path, outs: list[str]) -> Iterator[Path]:
    """Every file of the outputs ``outs`` (files or directories), as paths relative to ``project``."""
    for out in outs:
        path = project / out
        if path.is_dir():
            yield from (p.relative_to(project) for p in sorted(path.rglob("*")) if p.is_file())
        elif path.is_file():
            yield path.relative_to(project)


def digests(project: Path, outs: list[str]) -> dict[str, str]:
    """{relative path: sha256} of every file of ``outs``."""
    return {rel.as_posix(): hashlib.sha256((project / rel).read_bytes()).hexdigest()
            for rel in files_under(project, outs)}


def mtimes(project: Path, outs: list[str]) -> dict[str, int]:
    """{relative path: mtime in ns} of every file of ``outs``."""
    return {rel.as_posix(): (project / rel).stat().st_mtime_ns for rel in files_under(project, outs)}


@dataclass(frozen=True)
class Pushed:
    """A project whose outputs are committed (dvc.lock, `cache: false` files) and pushed to ``remote``."""

    project: Path
    remote: Path
    outs: dict[str, list[str]]

    @property
    def all_outs(self) -> list[str]:
        """Every output path of every stage run."""
        return sorted({o for outs in self.outs.values() for o in outs})


@pytest.fixture(scope="module")
def pushed(tmp_path_factory: pytest.TempPathFactory) -> Pushed:
    """The "GPU machine": run the stages, commit, add a local-directory remote as the default and push."""
    if not DVC.is_file():
        pytest.skip("dvc is not installed in the venv")
    root = tmp_path_factory.mktemp("shared")
    project, remote = root / "producer", root / "remote"
    project.mkdir()
    copy_project(project)
    write_test_params(project / "params.yaml", **SHRINK)
    dvc(project, "repro", *TARGETS)
    dvc(project, "remote", "add", "-f", "-d", "shared", str(remote))  # -f: the copied config may have one
    run(project, "git", "add", "-A")
    run(project, "git", *GIT_ID, "commit", "-q", "-m", "pipeline outputs")
    dvc(project, "push")
    return Pushed(project, remote, lock_outs(project))


def test_pulled_clone_is_up_to_date_and_runs_no_stage(pushed: Pushed, tmp_path: Path) -> None:
    clone = git_clone(pushed.project, tmp_path / "consumer")
    assert not (clone / PLUGIN).exists()  # git carries the code, dvc.lock and `cache: false` files only
    dvc(clone, "pull", "--with-deps", *TARGETS)

    status = dvc(clone, "status", "--json", "--with-deps", *TARGETS)
    assert status.stdout.strip() in ("{}", ""), f"dvc status after the pull:\n{status.stdout}"
    expected = digests(pushed.project, pushed.all_outs)
    for key in (PLUGIN, "models/base/sam.pt", "data/embeddings/CACHE.json", "data/prompts/train.parquet",
                "metrics/eval/COIFT/stable_sam.json"):
        assert key in expected, f"{key} is not an output of the stages run: {sorted(expected)[:20]}"
    assert any(k.startswith("data/embeddings/") and k.endswith(".parquet") for k in expected)
    assert digests(clone, pushed.all_outs) == expected  # byte-identical, every file of every output

    before = mtimes(clone, pushed.all_outs)
    repro = dvc(clone, "repro", *TARGETS)
    assert "Running stage" not in repro.stdout, repro.stdout
    for stage in pushed.outs:
        assert f"Stage '{stage}' didn't change" in repro.stdout, f"{stage}:\n{repro.stdout}"
    assert mtimes(clone, pushed.all_outs) == before  # nothing rewritten
    assert run(clone, "git", "status", "--porcelain").stdout.strip() == ""  # dvc.lock unchanged


def test_pull_with_an_object_missing_from_the_remote_names_the_file(pushed: Pushed, tmp_path: Path) -> None:
    remote = tmp_path / "damaged-remote"
    shutil.copytree(pushed.remote, remote)
    lock = yaml.safe_load((pushed.project / "dvc.lock").read_text(encoding="utf-8"))
    md5 = next(o["md5"] for o in lock["stages"]["train@stable_sam"]["outs"] if o["path"] == PLUGIN)
    obj = remote / "files" / "md5" / md5[:2] / md5[2:]
    assert obj.is_file(), f"{PLUGIN} is not in the remote at {obj}"
    obj.unlink()

    clone = git_clone(pushed.project, tmp_path / "consumer")
    dvc(clone, "remote", "modify", "--local", "shared", "url", str(remote))  # this clone's own remote
    pull = dvc(clone, "pull", "--with-deps", *TARGETS, check=False)
    assert pull.returncode != 0, pull.stdout
    assert PLUGIN in pull.stdout and md5 in pull.stdout, pull.stdout
    assert not (clone / PLUGIN).exists() and (clone / "models/base/sam.pt").is_file()  # the rest was pulled
    status = dvc(clone, "status", "--json", "--with-deps", *TARGETS)
    assert PLUGIN in status.stdout, status.stdout
