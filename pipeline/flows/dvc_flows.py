"""Prefect 3 flows over the DVC pipeline (orchestration only: no ML logic here).

- ``pipeline_flow``: every stage of ``dvc.yaml`` (or a chosen few) as a task running ``dvc repro <stage>``,
  its output streamed line by line into the run log; retries only on the network-bound stages
  (``download``, ``base``); the whole run holds the workspace lock (:mod:`pipeline.flows.locking`), so
  two flow runs never run DVC in one workspace at once.
- ``retrain_flow``: the pipeline (or ``dvc exp run -S key=value ...`` with overrides), whose ``track``
  stage registers the new model as ``challenger``; then champion/challenger promotion
  (:mod:`pipeline.tracking.promotion`), its decision recorded in MLflow and as a Prefect artifact.

DVC owns caching, so tasks use ``cache_policy=NO_CACHE``. The command templates are parameters so that
tests can run a stand-in instead of DVC.

    python -m pipeline.flows run pipeline --params params.yaml
    python -m pipeline.flows run retrain --set train.lr=3e-4
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import pipeline  # noqa: F401  (Prefect home, analytics off, startup timeout: before prefect)
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.config import load_params
from pipeline.flows.commands import (
    DEFAULT_EXP, DEFAULT_REPRO, StageFailed, describe, dvc_stages, exp_command, select_stages, stage_command,
    stream_command,
)
from pipeline.flows.locking import workspace_lock

NETWORK_STAGES = ("download", "base")  # the only stages worth retrying: they fetch over the network


@task(name="dvc-stage", cache_policy=NO_CACHE, task_run_name="{stage}")
def run_stage(stage: str, command: list[str], workspace: str) -> str:
    """Run one stage command in ``workspace``, streaming its output into the task's log."""
    logger = get_run_logger()
    logger.info("$ %s  (in %s)", describe(command), workspace)
    rc = stream_command(command, workspace, logger.info)
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
                  repro_command: list[str] = list(DEFAULT_REPRO), lock_timeout_s: Optional[float] = None) -> list[str]:
    """Run ``stages`` (default: all of ``dvc.yaml``, in file order) with ``repro_command`` (``{stage}`` is
    replaced), holding the workspace lock. ``params_path``'s folder is the DVC workspace. Returns the stages run."""
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
            runner(stage, stage_command(repro_command, stage), str(workspace))
    return selected


def _decision_markdown(decision: dict[str, Any]) -> str:
    rows = "\n".join(f"| {k} | {v} |" for k, v in decision.items())
    verdict = "promoted to champion" if decision.get("promote") else "champion kept"
    return f"# Retrain: {verdict}\n\n| field | value |\n|---|---|\n{rows}\n"


@flow(name="retrain", log_prints=True)
def retrain_flow(params_path: str = "params.yaml", overrides: Optional[dict[str, Any]] = None,
                 stages: Optional[list[str]] = None, promote: bool = True,
                 repro_command: list[str] = list(DEFAULT_REPRO), exp_command_prefix: list[str] = list(DEFAULT_EXP),
                 lock_timeout_s: Optional[float] = None) -> dict[str, Any]:
    """Retrain: the pipeline (``overrides`` -> one ``dvc exp run -S k=v ...``), then promotion.

    Returns the promotion decision (``{"promote": False, "reason": "promotion disabled"}`` with ``promote=False``).
    """
    logger = get_run_logger()
    path, workspace = _workspace(params_path)
    if overrides:
        cmd = exp_command(exp_command_prefix, overrides)
        with workspace_lock(workspace, timeout_s=lock_timeout_s, on_wait=logger.info, owner="prefect retrain flow"):
            run_stage.with_options(task_run_name="dvc-exp-run")("exp-run", cmd, str(workspace))
    else:
        pipeline_flow(str(path), stages, repro_command, lock_timeout_s)
    if not promote:
        return {"promote": False, "reason": "promotion disabled"}
    decision = promote_task(str(path))
    create_markdown_artifact(markdown=_decision_markdown(decision), key="promotion-decision",
                             description="champion/challenger decision of this retrain run")
    return decision


__all__ = ["NETWORK_STAGES", "pipeline_flow", "promote_task", "retrain_flow", "run_stage"]
