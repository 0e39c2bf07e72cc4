"""Serve the flows as Prefect deployments: ``retrain`` on the cron schedule of ``params.yaml``
(``schedule.cron`` in ``schedule.timezone``) and ``pipeline`` on demand. Blocks until interrupted.

    prefect server start --host 127.0.0.1 &          # or any Prefect API; PREFECT_API_URL points at it
    python -m pipeline.flows serve --params params.yaml
    prefect deployment run 'retrain/weekly'
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pipeline  # noqa: F401  (before prefect)
from prefect import serve
from prefect.schedules import Cron
from prefect.types.entrypoint import EntrypointType

from pipeline.config import load_params
from pipeline.flows.dvc_flows import pipeline_flow, retrain_flow


def deployments(params_path: str = "params.yaml", *, name: str = "weekly", cron: Optional[str] = None,
                timezone: Optional[str] = None, parameters: Optional[dict[str, Any]] = None) -> list:
    """The ``retrain/<name>`` (scheduled) and ``pipeline/manual`` deployments, with ``params_path`` absolute.

    ``parameters`` are extra default flow parameters of ``retrain`` (e.g. ``{"overrides": {...}}``).
    """
    path = Path(params_path).resolve()
    schedule = load_params(path).schedule
    base = {"params_path": str(path)}
    retrain = retrain_flow.to_deployment(
        name=name, schedules=[Cron(cron or schedule.cron, timezone=timezone or schedule.timezone)],
        parameters={**base, **(parameters or {})}, tags=["stable-sam"],
        description="scheduled retraining: DVC pipeline, MLflow tracking, champion/challenger promotion",
        entrypoint_type=EntrypointType.MODULE_PATH)
    manual = pipeline_flow.to_deployment(
        name="manual", parameters=base, tags=["stable-sam"], description="the DVC pipeline, on demand",
        entrypoint_type=EntrypointType.MODULE_PATH)
    return [retrain, manual]


def serve_flows(params_path: str = "params.yaml", **kwargs: Any) -> None:
    """Serve :func:`deployments` in this process (runs flow runs as subprocesses) until interrupted."""
    serve(*deployments(params_path, **kwargs))


__all__ = ["deployments", "serve_flows"]
