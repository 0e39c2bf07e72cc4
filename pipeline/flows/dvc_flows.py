"""Prefect 3 flows over the DVC pipeline (orchestration only: no ML logic here).

- ``pipeline_flow``: every stage of ``dvc.yaml`` (or a chosen few) as a task running ``dvc repro <stage>``,
  its output streamed line by line into the run log; retries only on the network-bound stages
  (``download``, ``base``); the whole run holds the workspace lock (:mod:`pipeline.flows.locking`), so
  two flow runs never run DVC in one workspace at once, and each dvc call waits (bounded) while a plain
  ``dvc`` command started outside the flows holds DVC's own repo lock.
- ``retrain_flow``: the pipeline (or, with overrides, ``dvc exp run --temp -S key=value ...``), whose
  ``track`` stage registers the new model as ``challenger``; then champion/challenger promotion
  (:mod:`pipeline.tracking.promotion`), its decision recorded in MLflow and as a Prefect artifact.
  Overrides are checked by the project's config before anything runs (a bad one fails the flow at once
  with the config's message), run in DVC's temporary experiment folder (the workspace's outputs stay as
  they were, success or failure; MLflow still gets the run: the workspace's tracking URI is passed on),
  and ``params.yaml`` is restored byte for byte whatever the command did.

DVC owns caching, so tasks use ``cache_policy=NO_CACHE``. The command templates are parameters so that
tests can run a stand-in instead of DVC.

    python -m pipeline.flows run pipeline --params params.yaml
    python -m pipeline.flows run retrain --set train.lr=3e-4
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional

import yaml

import pipeline  # noqa: F401  (Prefect home, analytics off, startup timeout: before prefect)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.common.atomic import atomic_write_bytes
from pipeline.config import load_params, replace
from pipeline.flows.commands import (
    DEFAULT_EXP, DEFAULT_REPRO, StageFailed, describe, dvc_stages, exp_command, select_stages, stage_command,
    stream_command,
)
from pipeline.flows.locking import DEFAULT_DVC_LOCK_TIMEOUT_S, run_waiting_for_dvc, workspace_lock

NETWORK_STAGES = ("download", "base")  # the only stages worth retrying: they fetch over the network


@task(name="dvc-stage", cache_policy=NO_CACHE, task_run_name="{stage}")
def run_stage(stage: str, command: list[str], workspace: str,
              dvc_lock_timeout_s: float = DEFAULT_DVC_LOCK_TIMEOUT_S, env: Optional[dict[str, str]] = None) -> str:
    """Run one stage command in ``workspace`` (extra environment ``env``), streaming its output into the task's
    log; while another dvc process (say a plain ``dvc repro``) holds DVC's repo lock, wait up to
    ``dvc_lock_timeout_s``."""
    logger = get_run_logger()
    logger.info("$ %s  (in %s)", describe(command), workspace)
    rc = run_waiting_for_dvc(lambda on_line: stream_command(command, workspace, on_line, env=env), workspace,
                             logger.info, timeout_s=dvc_lock_timeout_s)
    if rc != 0:
        raise StageFailed(f"stage {stage!r}: `{describe(command)}` exited with code {rc} (its output is above)")
    return stage


@task(name="promote", cache_policy=NO_CACHE)
def promote_task(params_path: str) -> dict[str, Any]:
    """Champion/challenger decision for ``tracking.registered_model`` (recorded in MLflow)."""
    from pipeline.tracking.mlflow_adapter import Tracker
    from pipeline.tracking.promotion import promote

    logger = get_run_logger()
    path = Path(params_path).resolve()
    cfg = load_params(path).tracking
    decision = asdict(promote(Tracker.from_config(cfg, path.parent), cfg))
    logger.info("promotion: %s (%s)", "PROMOTED" if decision["promote"] else "kept champion", decision["reason"])
    return decision


def _workspace(params_path: str) -> tuple[Path, Path]:
    path = Path(params_path).resolve()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: params file not found (pass --params of the DVC project)")
    return path, path.parent


@flow(name="pipeline", log_prints=True)
def pipeline_flow(params_path: str = "params.yaml", stages: Optional[list[str]] = None,
                  repro_command: list[str] = list(DEFAULT_REPRO), lock_timeout_s: Optional[float] = None,
                  dvc_lock_timeout_s: float = DEFAULT_DVC_LOCK_TIMEOUT_S) -> list[str]:
    """Run ``stages`` (default: all of ``dvc.yaml``, in file order) with ``repro_command`` (``{stage}`` is
    replaced), holding the workspace lock (waiting up to ``lock_timeout_s``, default forever) and waiting up to
    ``dvc_lock_timeout_s`` for DVC's own lock at each stage. ``params_path``'s folder is the DVC workspace.
    Returns the stages run."""
    logger = get_run_logger()
    path, workspace = _workspace(params_path)
    schedule = load_params(path).schedule
    selected = select_stages(dvc_stages(workspace), stages, str(workspace / "dvc.yaml"))
    with workspace_lock(workspace, timeout_s=lock_timeout_s, on_wait=logger.info, owner="prefect pipeline flow"):
        for stage in selected:
            runner = run_stage
            if stage in NETWORK_STAGES and schedule.network_retries:
                runner = run_stage.with_options(retries=schedule.network_retries,
                                                retry_delay_seconds=schedule.retry_delay_s)
            runner(stage, stage_command(repro_command, stage), str(workspace), dvc_lock_timeout_s)
    return selected


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def parse_override(value: Any) -> Any:
    """An override as DVC reads ``-S key=value`` (YAML 1.2): strings parsed as YAML, and numbers such as
    ``3e-4`` (a string to YAML 1.1) as floats."""
    if not isinstance(value, str):
        return value
    parsed = yaml.safe_load(value) if value else ""
    if isinstance(parsed, str) and _NUMBER.match(parsed.strip()):
        return float(parsed)
    return parsed


def validated_overrides(params_path: Path, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``overrides`` parsed (:func:`parse_override`) and checked against the project's config applied to
    ``params_path``: an unknown key or a bad value raises ``ConfigError`` naming it, before anything runs."""
    parsed = {key: parse_override(value) for key, value in overrides.items()}
    replace(load_params(params_path), **parsed)
    return parsed


@contextlib.contextmanager
def preserved_file(path: Path) -> Iterator[None]:
    """Put ``path``'s bytes back after the block if anything changed them (success or failure)."""
    before = path.read_bytes()
    try:
        yield
    finally:
        if not path.is_file() or path.read_bytes() != before:
            atomic_write_bytes(path, before)


def _tracking_env(params_path: Path) -> dict[str, str]:
    """``MLFLOW_TRACKING_URI`` of the workspace, so that a run in DVC's temporary folder logs to it."""
    from pipeline.tracking.mlflow_adapter import resolve_tracking_uri

    cfg = load_params(params_path).tracking
    return {"MLFLOW_TRACKING_URI": resolve_tracking_uri(cfg.tracking_uri, params_path.parent)}


def _decision_markdown(decision: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in decision.items())
    verdict = "promoted to champion" if decision.get("promote") else "champion kept"
    return f"# Retrain: {verdict}\n\n| field | value |\n|---|---|\n{rows}\n"


@flow(name="retrain", log_prints=True)
def retrain_flow(params_path: str = "params.yaml", overrides: Optional[dict[str, Any]] = None,
                 stages: Optional[list[str]] = None, promote: bool = True,
                 repro_command: list[str] = list(DEFAULT_REPRO), exp_command_prefix: list[str] = list(DEFAULT_EXP),
                 lock_timeout_s: Optional[float] = None,
                 dvc_lock_timeout_s: float = DEFAULT_DVC_LOCK_TIMEOUT_S) -> dict[str, Any]:
    """Retrain: the pipeline (``overrides`` -> one isolated ``dvc exp run --temp -S k=v ...``), then promotion.

    Returns the promotion decision (``{"promote": False, "reason": "promotion disabled"}`` with ``promote=False``).
    """
    logger = get_run_logger()
    path, workspace = _workspace(params_path)
    if overrides:
        cmd = exp_command(exp_command_prefix, validated_overrides(path, overrides))
        env = _tracking_env(path)
        with workspace_lock(workspace, timeout_s=lock_timeout_s, on_wait=logger.info, owner="prefect retrain flow"), \
                preserved_file(path):
            run_stage.with_options(task_run_name="dvc-exp-run")("exp-run", cmd, str(workspace), dvc_lock_timeout_s,
                                                                env)
    else:
        pipeline_flow(str(path), stages, repro_command, lock_timeout_s, dvc_lock_timeout_s)
    if not promote:
        return {"promote": False, "reason": "promotion disabled"}
    decision = promote_task(str(path))
    create_markdown_artifact(markdown=_decision_markdown(decision), key="promotion-decision",
                             description="champion/challenger decision of this retrain run")
    return decision


__all__ = ["NETWORK_STAGES", "parse_override", "pipeline_flow", "preserved_file", "promote_task", "retrain_flow",
           "run_stage", "validated_overrides"]
