"""Champion/challenger promotion in the MLflow model registry (aliases, not stages).

The ``track`` stage registers each new model version with alias ``challenger``. Promotion compares the
challenger's ``tracking.promote_metric`` (a metric on the version's run, e.g.
``hq_mean.stable_sam.noisy_box.miou``) with the ``champion``'s: the challenger becomes champion when
there is no champion, when the champion has no value for the metric, or when
``challenger >= champion + tracking.promote_margin``; otherwise the champion stays. Either way the
decision and its reason are recorded as tags on the challenger's model version and run, plus a metric
``promotion.promoted`` (1/0) on the run.

    python -m pipeline.tracking.promotion --params params.yaml [--out reports/promotion.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

from pipeline.common.atomic import atomic_write_json
from pipeline.config import TrackingConfig

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Decision:
    """The outcome of one promotion check."""

    promote: bool
    reason: str
    metric: str
    margin: float
    challenger_version: Optional[str] = None
    champion_version: Optional[str] = None  # before the decision
    challenger_value: Optional[float] = None
    champion_value: Optional[float] = None


def _finite(value: Optional[float]) -> Optional[float]:
    return None if value is None or not math.isfinite(float(value)) else float(value)


def decide(challenger: Optional[float], champion: Optional[float], margin: float, *,
           has_champion: bool) -> tuple[bool, str]:
    """Pure rule: (promote?, reason). ``None``/NaN values mean "metric missing"."""
    challenger, champion = _finite(challenger), _finite(champion)
    if challenger is None:
        return False, "the challenger has no value for the metric: kept the champion"
    if not has_champion:
        return True, "no champion yet: the challenger becomes champion"
    if champion is None:
        return True, "the champion has no value for the metric: the challenger replaces it"
    if challenger >= champion + margin:
        return True, f"challenger {challenger:.6g} >= champion {champion:.6g} + margin {margin:g}"
    return False, f"challenger {challenger:.6g} < champion {champion:.6g} + margin {margin:g}: kept the champion"


def promote(tracker, cfg: TrackingConfig) -> Decision:
    """Apply :func:`decide` to the registry's ``challenger`` and ``champion`` of ``cfg.registered_model``.

    ``tracker`` is a :class:`pipeline.tracking.mlflow_adapter.Tracker`. Moves alias ``champion`` when
    promoting and records the decision in MLflow (version tags, run tags, ``promotion.promoted`` metric).
    """
    name, metric, margin = cfg.registered_model, cfg.promote_metric, cfg.promote_margin
    challenger = tracker.version_by_alias(name, CHALLENGER)
    if challenger is None:
        return Decision(False, f"no version of {name!r} has alias {CHALLENGER!r} (run the track stage)", metric, margin)
    champion = tracker.version_by_alias(name, CHAMPION)
    if champion is not None and champion.version == challenger.version:
        return Decision(False, f"version {challenger.version} is already the champion", metric, margin,
                        challenger.version, champion.version)

    def value(run_id: Optional[str]) -> Optional[float]:
        return None if not run_id else (tracker.get_run(run_id).metrics or {}).get(metric)

    ch_value = value(challenger.run_id)
    cp_value = value(champion.run_id) if champion is not None else None
    ok, reason = decide(ch_value, cp_value, margin, has_champion=champion is not None)
    decision = Decision(ok, reason, metric, margin, challenger.version,
                        champion.version if champion else None, _finite(ch_value), _finite(cp_value))
    if ok:
        tracker.set_alias(name, CHAMPION, challenger.version)
        if champion is not None:
            tracker.set_version_tags(name, champion.version, {"promotion.replaced_by": challenger.version})
    record = {
        "promotion.decision": "promoted" if ok else "kept",
        "promotion.reason": reason,
        "promotion.metric": metric,
        "promotion.margin": margin,
        "promotion.champion_version": decision.champion_version or "none",
        "promotion.champion_value": "none" if decision.champion_value is None else decision.champion_value,
    }
    tracker.set_version_tags(name, challenger.version, record)
    if challenger.run_id:
        tracker.set_tags(challenger.run_id, record)
        tracker.log_metrics(challenger.run_id, {"promotion.promoted": float(ok)}, skip_existing=False)
    log.info("promotion of %s v%s: %s", name, challenger.version, reason)
    return decision


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=None, help="also write the decision as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from pipeline.config import load_params
    from pipeline.tracking.mlflow_adapter import Tracker

    cfg = load_params(args.params).tracking
    decision = promote(Tracker.from_config(cfg, Path(args.params).resolve().parent), cfg)
    print(json.dumps(asdict(decision), indent=2))
    if args.out:
        atomic_write_json(args.out, asdict(decision))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["CHALLENGER", "CHAMPION", "Decision", "decide", "promote"]
