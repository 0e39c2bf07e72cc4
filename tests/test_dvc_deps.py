"""dvc.yaml must list every project module a stage imports, or `dvc repro` misses code changes.

For each stage whose command is ``python -m stages.<name>``, the test walks the import statements of the
stage module and of every project module it reaches (module- and function-level, statically) and fails
naming the files that no ``deps`` entry (file or folder) covers.

    .venv/bin/pytest tests/test_dvc_deps.py -q
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import PROJECT_ROOT

PACKAGES = ("pipeline", "stages")


def _module_file(name: str) -> Path | None:
    base = PROJECT_ROOT.joinpath(*name.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _imported_names(path: Path, module: str) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return {n for n in names if n.split(".")[0] in PACKAGES}


def imported_files(module: str) -> set[Path]:
    """Project files (repo-relative) that ``python -m <module>`` imports, package ``__init__`` files excluded."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__.py and a/b/__init__.py too
            sub = ".".join(parts[:i])
            f = _module_file(sub)
            if f is not None and f not in files:
                files.add(f)
                todo.extend(_imported_names(f, sub))
    return {f.relative_to(PROJECT_ROOT) for f in files if f.name != "__init__.py"}


def _stages() -> list[tuple[str, str, list[str]]]:
    spec = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())
    out = []
    for name, stage in spec["stages"].items():
        body = stage.get("do", stage)
        match = re.search(r"python -m (stages\.\w+)", body["cmd"])
        if match:
            out.append((name, match.group(1), [str(d) for d in body.get("deps", [])]))
    return out


@pytest.mark.parametrize("stage,module,deps", _stages(), ids=[s[0] for s in _stages()])
def test_stage_deps_cover_the_code_it_imports(stage: str, module: str, deps: list[str]) -> None:
    def covered(path: Path) -> bool:
        return any(path == Path(d) or Path(d) in path.parents for d in deps)

    missing = sorted(str(p) for p in imported_files(module) if not covered(p))
    assert not missing, f"dvc.yaml stage {stage!r} imports {missing} but does not list them in deps"


def test_the_check_can_fail() -> None:
    files = imported_files("stages.train")
    assert Path("pipeline/training/train.py") in files and Path("pipeline/inference/prompts.py") in files
    assert not any(p.name == "__init__.py" for p in files)


def test_tracking_and_evaluation_depend_on_what_they_must() -> None:
    """`track` runs on every repro / exp run (one MLflow parent run per pipeline run; DVC must not skip it).
    Each user-dataset evaluate stage depends on its own method's plugin file, not on every method's; an HQ
    set's evaluate stage scores every method in one process, so it depends on the plugins folder and the method
    list, and keeps its outputs (persist) for the reuse of unchanged methods (tests/test_evaluate.py)."""
    stages = yaml.safe_load((PROJECT_ROOT / "dvc.yaml").read_text())["stages"]
    assert stages["track"].get("always_changed") is True
    for name in ("evaluate_folder", "evaluate_coco"):
        deps = stages[name]["deps"]
        assert "models/plugins/${item.method}.pt" in deps and "models/plugins" not in deps, name
    hq = stages["evaluate"]["do"]
    assert "--all-methods" in hq["cmd"] and "models/plugins" in hq["deps"] and "evaluate.methods" in hq["params"]
    outs = {next(iter(o)): o[next(iter(o))] for o in hq["outs"]}
    assert set(outs) == {"data/predictions/${item}", "metrics/eval/${item}"}
    assert all(o.get("persist") is True for o in outs.values())


def test_dvc_lock_holds_only_the_stages_of_dvc_yaml() -> None:
    """DVC never prunes the dvc.lock entry of a stage that dvc.yaml renamed or removed; a stale entry misleads
    whoever reads the lock (it records outputs nothing makes any more), so the committed lock holds only live stages."""
    names = subprocess.run([sys.executable, "-m", "dvc", "stage", "list", "--name-only"], cwd=PROJECT_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    assert "embed" in names and "evaluate@COIFT" in names, names
    locked = yaml.safe_load((PROJECT_ROOT / "dvc.lock").read_text())["stages"]
    stale = sorted(set(locked) - set(names))
    assert not stale, f"dvc.lock has entries for stages dvc.yaml does not define: {stale}; delete them from dvc.lock"
