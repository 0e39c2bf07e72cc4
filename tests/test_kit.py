"""The test kit's own rules, checked on the source of every tests/*.py.

- No test module imports another test module: shared fixtures live in tests/conftest.py, shared helpers in
  tests/fakes.py (a test file imported elsewhere runs its tests twice and couples unrelated files).
- Tests run on the checked-in test profile (tests/params_test.yaml), not on the live params.yaml, whose
  values a user may change (e.g. ``cp params-full.yaml params.yaml``). Only the files that check the live
  files themselves may name them.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TEST_FILES = sorted(TESTS.glob("*.py"))
# `from tests.test_x import ...` inside a string (a script run with `python -c`)
_SCRIPT_IMPORT = re.compile(r"^\s*(?:from|import)\s+(tests\.test_\w+)", re.MULTILINE)
# files that check the live params.yaml / dvc.yaml themselves (they load them, never rely on their values)
LIVE_PARAMS_ALLOWED = {"test_config.py", "test_dvc_deps.py", "test_stage_cli.py"}
ROOT_NAMES = {"PROJECT_ROOT", "ROOT", "PROJECT"}
LIVE_PARAMS = "params" + ".yaml"  # assembled, so that this file does not name it itself


def _is_test_module(name: str | None) -> bool:
    return bool(name) and (name.startswith("tests.test_") or name.startswith("test_"))


def imported_test_modules(source: str, filename: str = "<source>") -> list[str]:
    """The ``tests.test_*`` modules that ``source`` imports (statements, ``import_module`` calls, -c scripts)."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # `from .test_x import y` / `from . import test_x`
                names = [module] if module else [a.name for a in node.names]
                found += [f"tests.{n}" for n in names if n.startswith("test_")]
            elif module == "tests":
                found += [f"tests.{a.name}" for a in node.names if a.name.startswith("test_")]
            elif _is_test_module(module):
                found.append(module)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            fname = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if fname in {"import_module", "__import__"} and _is_test_module(str(node.args[0].value)):
                found.append(str(node.args[0].value))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            found += _SCRIPT_IMPORT.findall(node.value)
    return found


def live_params_reads(source: str, filename: str = "<source>") -> list[int]:
    """Lines where ``source`` names the live params file: ``"params.yaml"`` bare (relative to the project root
    as the working directory) or joined to the project root; ``tmp_path / "params.yaml"`` is a test's own file."""
    tree = ast.parse(source, filename)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    lines = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Constant) and node.value == LIVE_PARAMS):
            continue
        parent = parents.get(node)
        if isinstance(parent, ast.BinOp) and isinstance(parent.op, ast.Div) and parent.right is node:
            left = parent.left
            base = left.id if isinstance(left, ast.Name) else getattr(left, "attr", "")
            if base not in ROOT_NAMES and "__file__" not in ast.unparse(left):
                continue
        lines.append(node.lineno)
    return sorted(lines)


@pytest.mark.parametrize("path", TEST_FILES, ids=[p.name for p in TEST_FILES])
def test_no_test_module_imports_another(path: Path) -> None:
    bad = imported_test_modules(path.read_text(encoding="utf-8"), str(path))
    assert not bad, (f"{path.name} imports test module(s) {sorted(set(bad))}: move the shared fixture to "
                     "tests/conftest.py or the helper to tests/fakes.py and import it from there")


@pytest.mark.parametrize("path", [p for p in TEST_FILES if p.name not in LIVE_PARAMS_ALLOWED],
                         ids=[p.name for p in TEST_FILES if p.name not in LIVE_PARAMS_ALLOWED])
def test_tests_use_the_test_profile_not_the_live_params(path: Path) -> None:
    lines = live_params_reads(path.read_text(encoding="utf-8"), str(path))
    assert not lines, (f"{path.name} reads the live params.yaml at line(s) {lines}: use the `test_params` / "
                       "`test_params_path` fixtures (tests/conftest.py) or tests.fakes.load_test_params / "
                       "write_test_params")


def test_the_guards_catch_what_they_guard() -> None:
    """Each way of importing a test module, and of naming the live params file, is caught; their fixes are not.

    (The snippets are assembled at run time, so that this file does not trip its own checks.)"""
    mod, live = "tests." + "test_views", LIVE_PARAMS
    for snippet in (f"import {mod}", f"from {mod} import small_index", "from tests import " + mod[6:],
                    f"from .{mod[6:]} import small_index", f"importlib.import_module({mod!r})",
                    f'SCRIPT = """\nimport sys\nfrom {mod} import tiny_sam\n"""'):
        assert imported_test_modules(snippet) == [mod], snippet
    assert imported_test_modules("from tests.fakes import small_index\nimport tests.conftest") == []
    for snippet in (f'load_params("{live}")', f'load_params(PROJECT_ROOT / "{live}")',
                    f'main(["--params", "{live}"])', f'x = Path(__file__).resolve().parents[1] / "{live}"'):
        assert live_params_reads(snippet) == [1], snippet
    assert live_params_reads(f'p = tmp_path / "{live}"\nq = ws["tmp"] / "{live}"') == []
