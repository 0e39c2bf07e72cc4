"""The one module that talks to MLflow: runs, params, metrics, artifacts, models and the registry.

Every call names its run explicitly (``MlflowClient`` with run ids, no fluent "active run"), so it is
safe from Prefect's thread-pool task runner. Logging is retry-safe: params are write-once in MLflow, so
:meth:`Tracker.log_params` skips keys already set to the same value and raises
:class:`ParamConflictError` (naming the key) for a different one; :meth:`Tracker.start_run` with a
``resume_key`` reopens an unfinished run with the same key instead of starting a duplicate.

Tracking URI: ``tracking.tracking_uri``, else env ``MLFLOW_TRACKING_URI``, else
``sqlite:///<project root>/mlflow.db`` (artifacts in ``<project root>/mlruns``).

    python -c "from pipeline.tracking.mlflow_adapter import Tracker; print(Tracker.from_params().experiment_id)"
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import pipeline  # noqa: F401  (sets MLflow's offline switches before mlflow is imported)
import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from pipeline import PROJECT_ROOT

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.config import TrackingConfig
    from pipeline.tracking.serving import ServingModel

log = logging.getLogger(__name__)

_BATCH = 900  # MLflow accepts at most 1000 metrics (100 params) per log_batch call
_PARAM_BATCH = 90
RUN_KEY_TAG = "stable_sam.run_key"
PARENT_TAG = "mlflow.parentRunId"
UNFINISHED = ("RUNNING", "FAILED", "KILLED", "SCHEDULED")


class ParamConflictError(ValueError):
    """A param already logged on a run with a different value (MLflow params are write-once)."""


@dataclass(frozen=True)
class RunRef:
    """A run as the rest of the pipeline sees it (no MLflow types leak out)."""

    run_id: str
    name: str
    status: str
    resumed: bool = False
    start_time: int = 0
    metrics: Mapping[str, float] | None = None
    params: Mapping[str, str] | None = None
    tags: Mapping[str, str] | None = None


@dataclass(frozen=True)
class ModelVersionRef:
    name: str
    version: str
    run_id: str | None
    source: str
    tags: Mapping[str, str]


def resolve_tracking_uri(configured: str = "", root: Path = PROJECT_ROOT) -> str:
    """``configured`` or env ``MLFLOW_TRACKING_URI`` or ``sqlite:///<root>/mlflow.db`` (absolute).

    Inside ``dvc exp run`` (also ``--temp``/``--queue``, which run in a throw-away copy) DVC sets env
    ``DVC_ROOT`` to the real project root, which then wins over ``root``.
    """
    if configured:
        return configured
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = Path(os.environ.get("DVC_ROOT") or root)
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


# The MLflow 3 UI opens an experiment on its GenAI overview ("Traces") unless it is marked as model training.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def default_artifact_location(tracking_uri: str) -> str | None:
    """For a local sqlite store: ``file://<db folder>/mlruns`` (not the caller's cwd); servers decide themselves."""
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri[len("sqlite:///"):])
        return (db.parent / "mlruns").resolve().as_uri()
    return None


class Tracker:
    """An experiment in one tracking store, addressed by explicit run ids."""

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self.experiment_name = experiment
        self.experiment_id = self._experiment_id(experiment)

    @classmethod
    def from_config(cls, cfg: "TrackingConfig", root: Path = PROJECT_ROOT) -> "Tracker":
        return cls(resolve_tracking_uri(cfg.tracking_uri, root), cfg.experiment)

    @classmethod
    def from_params(cls, path: str | Path = "params.yaml") -> "Tracker":
        from pipeline.config import load_params

        return cls.from_config(load_params(path).tracking)

    def _experiment_id(self, name: str) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            if exp.lifecycle_stage == "deleted":
                raise ValueError(f"MLflow experiment {name!r} is deleted in {self.tracking_uri}: restore it "
                                 "(`mlflow experiments restore`) or set tracking.experiment to another name")
            if (exp.tags or {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=default_artifact_location(self.tracking_uri),
                                                 tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException:  # created concurrently by another process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    # -- runs ---------------------------------------------------------------------------------------
    def start_run(self, name: str, *, tags: Mapping[str, str] | None = None, parent_run_id: str | None = None,
                  resume_key: str | None = None) -> RunRef:
        """A new run, or (with ``resume_key``) the unfinished run tagged with that key under the same parent."""
        tags = dict(tags or {})
        if resume_key:
            found = self.find_runs({RUN_KEY_TAG: resume_key}, parent_run_id=parent_run_id)
            for run in found:
                if run.status in UNFINISHED:
                    self.client.update_run(run.run_id, status="RUNNING")
                    log.info("resuming MLflow run %s (%s)", run.run_id, name)
                    return RunRef(run.run_id, run.name, "RUNNING", resumed=True, start_time=run.start_time)
            tags[RUN_KEY_TAG] = resume_key
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return RunRef(run.info.run_id, run.info.run_name, run.info.status, start_time=run.info.start_time)

    def find_runs(self, tags: Mapping[str, str], *, parent_run_id: str | None = None,
                  max_results: int = 100) -> list[RunRef]:
        """Runs of this experiment carrying all ``tags`` (and the given parent), newest first."""
        clauses = [f"tags.`{k}` = '{_quote(v)}'" for k, v in tags.items()]
        if parent_run_id:
            clauses.append(f"tags.`{PARENT_TAG}` = '{_quote(parent_run_id)}'")
        return self.search_runs(" and ".join(clauses), max_results=max_results)

    def search_runs(self, filter_string: str = "", *, max_results: int = 100,
                    order_by: Sequence[str] = ("attributes.start_time DESC",)) -> list[RunRef]:
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string,
                                       max_results=max_results, order_by=list(order_by))
        return [_ref(r) for r in runs]

    def get_run(self, run_id: str) -> RunRef:
        return _ref(self.client.get_run(run_id))

    def finish_run(self, run_id: str, status: Literal["FINISHED", "FAILED", "KILLED"] = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    # -- params, tags, metrics ----------------------------------------------------------------------
    def log_params(self, run_id: str, params: Mapping[str, Any]) -> int:
        """Log params write-once: equal values already present are skipped; a different value raises
        :class:`ParamConflictError`. Returns how many were newly logged."""
        existing = self.client.get_run(run_id).data.params
        new: list[Param] = []
        for key, value in params.items():
            value = str(value)
            if key in existing:
                if existing[key] != value:
                    raise ParamConflictError(
                        f"MLflow run {run_id}: param {key!r} is already {existing[key]!r}, cannot set {value!r} "
                        "(params are write-once): log this attempt in a new run")
                continue
            new.append(Param(key, value))
        for i in range(0, len(new), _PARAM_BATCH):
            self.client.log_batch(run_id, params=new[i:i + _PARAM_BATCH], synchronous=True)
        return len(new)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, tags=items[i:i + _BATCH], synchronous=True)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], *, step: int = 0,
                    skip_existing: bool = True) -> int:
        """Log scalar metrics at ``step``; with ``skip_existing`` a key whose latest value is already equal is
        skipped (a retry does not duplicate history). Returns how many were logged."""
        existing = self.client.get_run(run_id).data.metrics if skip_existing else {}
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if not (k in existing and existing[k] == float(v))]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + _BATCH], synchronous=True)
        return len(items)

    def log_metric_series(self, run_id: str, key: str, steps: Sequence[int], values: Sequence[float]) -> int:
        """A curve (e.g. the training loss) as one metric with steps; skipped if the run already has ``key``."""
        if len(steps) != len(values):
            raise ValueError(f"metric {key!r}: {len(steps)} steps but {len(values)} values")
        if key in self.client.get_run(run_id).data.metrics:
            return 0
        now = int(time.time() * 1000)
        items = [Metric(key, float(v), now, int(s)) for s, v in zip(steps, values)]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(run_id, metrics=items[i:i + _BATCH], synchronous=True)
        return len(items)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]

    # -- artifacts ----------------------------------------------------------------------------------
    def log_artifact(self, run_id: str, path: Path, artifact_dir: str = "") -> None:
        """Upload one file (re-uploading the same path overwrites it: idempotent)."""
        self.client.log_artifact(run_id, str(path), artifact_path=artifact_dir or None)

    def list_artifacts(self, run_id: str, path: str = "") -> list[str]:
        """Artifact paths below ``path`` (recursively)."""
        out: list[str] = []
        for item in self.client.list_artifacts(run_id, path or None):
            out.extend(self.list_artifacts(run_id, item.path) if item.is_dir else [item.path])
        return out

    # -- models and registry ------------------------------------------------------------------------
    def log_pyfunc_model(self, run_id: str, model: "ServingModel", *, name: str = "model") -> tuple[str, str]:
        """Log a :class:`pipeline.tracking.serving.ServingModel` on run ``run_id``; returns (model_uri, model_id).

        The model carries this project's ``pipeline`` package as code and the base + plugin files as
        artifacts, so ``mlflow.pyfunc.load_model`` and ``mlflow models serve`` need no checkout; the signature
        is inferred from the input example (which MLflow runs once, so a broken model fails here).
        """
        import mlflow.models
        import mlflow.pyfunc
        import torch

        mlflow.set_tracking_uri(self.tracking_uri)  # Model.log resolves its store from the global URI
        reqs = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}"]
        # Created here so that it lands in this experiment (MLflow would pick the fluent default one).
        logged = self.client.create_logged_model(self.experiment_id, name=name, source_run_id=run_id,
                                                 tags={"model.format": "pyfunc"})
        try:
            # Model.log (what pyfunc.log_model calls) takes the run explicitly: no fluent active run needed.
            info = mlflow.models.Model.log(
                artifact_path=None, name=name, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id,
                python_model=model.python_model, artifacts=model.artifacts, model_config=model.model_config,
                input_example=model.input_example, code_paths=[str(PROJECT_ROOT / "pipeline")],
                pip_requirements=reqs)
        except BaseException:
            self.client.finalize_logged_model(logged.model_id, "FAILED")
            raise
        self.client.finalize_logged_model(logged.model_id, "READY")
        self.set_tags(run_id, {"model.format": "pyfunc"})
        return info.model_uri, info.model_id

    def register_model(self, name: str, model_uri: str, run_id: str, *, model_id: str | None = None,
                       tags: Mapping[str, str] | None = None, alias: str | None = None) -> ModelVersionRef:
        """New version of registered model ``name`` (created if absent), optionally given ``alias``."""
        try:
            self.client.create_registered_model(name)
        except MlflowException as exc:
            if "already exists" not in str(exc).lower() and getattr(exc, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = self.client.create_model_version(name, source=model_uri, run_id=run_id, model_id=model_id,
                                              tags={k: str(v) for k, v in (tags or {}).items()})
        if alias:
            self.client.set_registered_model_alias(name, alias, mv.version)
        return _version_ref(mv)

    def version_by_alias(self, name: str, alias: str) -> ModelVersionRef | None:
        """The version of ``name`` holding ``alias``, or None (no such model or alias)."""
        try:
            return _version_ref(self.client.get_model_version_by_alias(name, alias))
        except MlflowException as exc:
            if _absent(exc):
                return None
            raise  # e.g. the server is unreachable: never mistake that for "no champion"

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_model_version_tag(name, version, k, str(v))

    def get_version(self, name: str, version: str) -> ModelVersionRef:
        return _version_ref(self.client.get_model_version(name, version))

    def aliases(self, name: str) -> dict[str, str]:
        """alias -> version of registered model ``name`` ({} if absent)."""
        try:
            return {k: str(v) for k, v in (self.client.get_registered_model(name).aliases or {}).items()}
        except MlflowException as exc:
            if _absent(exc):
                return {}
            raise

    def load_model(self, model_uri: str) -> Any:
        """Load a logged model back as a pyfunc (``models:/name@alias`` or ``models:/m-...``)."""
        import mlflow.pyfunc

        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        return mlflow.pyfunc.load_model(model_uri)


def _absent(exc: MlflowException) -> bool:
    """A "no such registered model / alias" answer (sqlite and REST stores alike)."""
    return exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in str(exc)


def _quote(value: str) -> str:
    return str(value).replace("'", "\\'")


def _ref(run: Any) -> RunRef:
    return RunRef(
        run_id=run.info.run_id, name=run.info.run_name or "", status=run.info.status,
        start_time=int(run.info.start_time or 0), metrics=dict(run.data.metrics), params=dict(run.data.params),
        tags=dict(run.data.tags),
    )


def _version_ref(mv: Any) -> ModelVersionRef:
    return ModelVersionRef(name=mv.name, version=str(mv.version), run_id=mv.run_id, source=mv.source,
                           tags=dict(mv.tags or {}))


__all__ = ["ModelVersionRef", "ParamConflictError", "RunRef", "Tracker", "default_artifact_location",
           "resolve_tracking_uri"]
