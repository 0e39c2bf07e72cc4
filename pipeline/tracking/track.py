"""The ``track`` stage's logic: log one whole pipeline run to MLflow from the files the stages wrote.

One PARENT run per pipeline run (all of ``params.yaml`` flattened, tags: git commit, DVC output md5s,
DVC experiment name, profile; every eval metric; artifacts), one CHILD run per trained method (its
training metrics, its loss curve as a stepped metric, its eval metrics under the full
``<benchmark>.<method>.<prompt>.<metric>`` key) and one per benchmark. The method named in
``tracking.promote_metric`` is logged as an MLflow model and registered under
``tracking.registered_model`` with alias ``challenger``; promotion is a separate step
(:mod:`pipeline.tracking.promotion`).

Re-running after a crash resumes the same parent run (matched by a key over all inputs), skips
children already finished and never re-registers a model; see :mod:`pipeline.tracking.mlflow_adapter`.

    python -m stages.track --params params.yaml
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional

from pipeline.common.atomic import atomic_write_json
from pipeline.config import Params, TrackingConfig
from pipeline.tracking.collect import (
    CollectedRun, PipelineOutputs, collect, eval_metrics_for_method, numeric_leaves,
)
from pipeline.tracking.mlflow_adapter import RUN_KEY_TAG, RunRef, Tracker

if TYPE_CHECKING:  # pragma: no cover
    from pipeline.tracking.serving import ServingModel

log = logging.getLogger(__name__)

KIND_TAG = "stable_sam.kind"
CHALLENGER = "challenger"
ModelBuilder = Callable[[str], "ServingModel"]


@dataclass
class TrackResult:
    """What was logged (also written as JSON by the stage)."""

    tracking_uri: str
    experiment: str
    parent_run_id: str
    resumed: bool
    method_runs: dict[str, str] = field(default_factory=dict)
    benchmark_runs: dict[str, str] = field(default_factory=dict)
    registered_model: str = ""
    registered_method: str = ""
    model_version: str = ""
    model_format: str = ""


def registered_method(cfg: TrackingConfig) -> str:
    """The method whose model is registered: the ``<method>`` part of ``tracking.promote_metric``."""
    return cfg.promote_metric.split(".")[1]


def default_model_builder(params: Params, outputs: PipelineOutputs) -> ModelBuilder:
    """Base SAM from ``models/base`` + ``models/plugins/<method>.pt`` as a pyfunc :class:`ServingModel`."""
    def build(method: str) -> "ServingModel":
        from pipeline.tracking.serving import build_serving_model

        return build_serving_model(method, outputs.base, outputs.plugins / f"{method}.pt")
    return build


def _children(tracker: Tracker, parent: RunRef) -> dict[str, RunRef]:
    """Existing child runs of a resumed parent, by run name (the newest wins)."""
    if not parent.resumed:
        return {}
    out: dict[str, RunRef] = {}
    for run in tracker.find_runs({}, parent_run_id=parent.run_id, max_results=1000):
        out.setdefault(run.name, run)
    return out


def _child(tracker: Tracker, existing: dict[str, RunRef], name: str, parent: RunRef, kind: str,
           key: str) -> Optional[RunRef]:
    """Start (or resume) child ``name``; None when a finished child of that name already exists."""
    old = existing.get(name)
    if old is not None and old.status == "FINISHED":
        log.info("child run %s already finished: skipped", name)
        return None
    return tracker.start_run(name, tags={KIND_TAG: kind}, parent_run_id=parent.run_id, resume_key=f"{key}/{name}")


def _log_method(tracker: Tracker, run: RunRef, method: str, collected: CollectedRun, params: Params,
                build_model: ModelBuilder, result: TrackResult) -> None:
    tracker.log_params(run.run_id, {"method": method})
    tracker.set_tags(run.run_id, {"method": method})
    metrics = dict(collected.train_metrics[method])
    metrics.update(eval_metrics_for_method(collected.evaluation, method))
    tracker.log_metrics(run.run_id, metrics)
    for column, (steps, values) in collected.loss_curves[method].items():
        tracker.log_metric_series(run.run_id, f"train/{column}", steps, values)
    if method != result.registered_method:
        return
    done = tracker.get_run(run.run_id).tags or {}
    if done.get("registered.version"):  # an earlier attempt registered it already
        result.model_version = done["registered.version"]
        result.model_format = done.get("model.format", "")
        return
    uri, model_id = tracker.log_pyfunc_model(run.run_id, build_model(method), name="model")
    fmt = "pyfunc"
    version = tracker.register_model(
        params.tracking.registered_model, uri, run.run_id, model_id=model_id, alias=CHALLENGER,
        tags={"method": method, "git.commit": collected.tags.get("git.commit", "none"),
              "profile": collected.tags.get("profile", ""), RUN_KEY_TAG: collected.run_key})
    tracker.set_tags(run.run_id, {"registered.model": version.name, "registered.version": version.version})
    result.model_version, result.model_format = version.version, fmt
    log.info("registered %s version %s (%s) as %r", version.name, version.version, fmt, CHALLENGER)


def track_pipeline(params: Params, outputs: PipelineOutputs, *, tracker: Optional[Tracker] = None,
                   model_builder: Optional[ModelBuilder] = None, exp_name: Optional[str] = None,
                   out_json: Optional[Path] = None) -> TrackResult:
    """Log the pipeline run whose outputs are under ``outputs`` (see the module docstring).

    ``exp_name`` defaults to env ``DVC_EXP_NAME`` (set by ``dvc exp run``); ``out_json`` receives the
    :class:`TrackResult`. Input problems raise before anything is logged.
    """
    exp_name = os.environ.get("DVC_EXP_NAME", "") if exp_name is None else exp_name
    methods = list(params.train.methods)
    collected = collect(outputs, params.to_dict(), methods, exp_name=exp_name,
                        exclude=[out_json] if out_json else [])
    tracker = tracker or Tracker.from_config(params.tracking, outputs.root)
    build_model = model_builder or default_model_builder(params, outputs)
    reg_method = registered_method(params.tracking)
    if reg_method not in methods:
        log.warning("tracking.promote_metric names method %r, which is not in train.methods %s: "
                    "no model is registered", reg_method, methods)
        reg_method = ""

    name = exp_name or time.strftime("pipeline-%Y%m%d-%H%M%S")
    parent = tracker.start_run(name, tags={**collected.tags, KIND_TAG: "pipeline"}, resume_key=collected.run_key)
    result = TrackResult(tracker.tracking_uri, tracker.experiment_name, parent.run_id, parent.resumed,
                         registered_model=params.tracking.registered_model if reg_method else "",
                         registered_method=reg_method)
    try:
        tracker.log_params(parent.run_id, collected.params)
        tracker.set_tags(parent.run_id, collected.tags)
        metrics = numeric_leaves(collected.evaluation)
        for method, values in collected.train_metrics.items():
            metrics.update({f"train.{method}.{k}": v for k, v in values.items()})
        tracker.log_metrics(parent.run_id, metrics)

        existing = _children(tracker, parent)
        for method in methods:
            child = _child(tracker, existing, f"train/{method}", parent, "train", collected.run_key)
            if child is None:
                run = existing[f"train/{method}"]
                result.method_runs[method] = run.run_id
                if method == reg_method:
                    result.model_version = (run.tags or {}).get("registered.version", "")
                    result.model_format = (run.tags or {}).get("model.format", "")
                continue
            result.method_runs[method] = child.run_id
            try:
                _log_method(tracker, child, method, collected, params, build_model, result)
            except BaseException:
                tracker.finish_run(child.run_id, "FAILED")
                raise
            tracker.finish_run(child.run_id)

        for bench, per_method in collected.evaluation.items():
            child = _child(tracker, existing, f"eval/{bench}", parent, "evaluate", collected.run_key)
            if child is None:
                result.benchmark_runs[bench] = existing[f"eval/{bench}"].run_id
                continue
            result.benchmark_runs[bench] = child.run_id
            tracker.log_params(child.run_id, {"benchmark": bench})
            tracker.log_metrics(child.run_id, numeric_leaves(per_method))
            tracker.finish_run(child.run_id)

        for art in collected.artifacts:
            tracker.log_artifact(parent.run_id, art.path, art.artifact_dir)
        if result.model_version:
            tracker.set_tags(parent.run_id, {"registered.model": result.registered_model,
                                             "registered.version": result.model_version})
    except BaseException:
        tracker.finish_run(parent.run_id, "FAILED")
        raise
    tracker.finish_run(parent.run_id)
    if out_json is not None:
        atomic_write_json(out_json, asdict(result))
    log.info("logged pipeline run %s to %s (experiment %r)", parent.run_id, tracker.tracking_uri,
             tracker.experiment_name)
    return result


def run_track(params: Params, outputs: PipelineOutputs, *, exp_name: Optional[str] = None,
              out_json: Optional[Path] = None) -> TrackResult:
    """The ``track`` stage: :func:`track_pipeline` with the default tracker; prints the result's fields."""
    result = track_pipeline(params, outputs, exp_name=exp_name, out_json=out_json)
    for key, value in asdict(result).items():
        print(f"{key}: {value}")
    return result


__all__ = ["TrackResult", "default_model_builder", "registered_method", "run_track", "track_pipeline"]
