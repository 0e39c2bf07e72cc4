"""Stage ``seeds``: the headline deltas and recovery ratios as mean ± std over training seeds.

A single training run of a 78 K-parameter plugin moves the HQ mean by about a mIoU point from seed to
seed, as much as many of the differences it is meant to show. This stage retrains ``seeds.methods``
with each seed of ``seeds.extra`` (the pipeline's own ``seed`` run is the first sample: its plugin and
its scores come from the ``train``/``evaluate`` stages, never recomputed), scores every retrained plugin
on the HQ eval sets with the identical stored prompts through the evaluate stage's own code, and writes
per method and prompt type the mean, sample std and per-seed values of mIoU, the delta against
``report.baseline`` and the recovery ratio (``metrics/seeds.json``), plus α1 per prompt type.

Training and evaluation resume (``--resume auto`` checkpoints, partial evaluation parts) under
``<work>/seed<k>/``, so a killed stage loses at most one checkpoint interval.

    python -m stages.seeds --params params.yaml --embeddings data/embeddings --prompts data/prompts \\
        --base models/base --eval-dir metrics/eval --work models/seeds --out metrics/seeds.json
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.common.atomic import atomic_write_json, finite_json
from pipeline.config import Params, replace
from pipeline.evaluation.aggregate import add_recovery, hq_benchmarks, hq_mean, read_method_json

log = logging.getLogger(__name__)

METRICS = ("miou", "delta", "recovery", "alpha1")


def _seed_dir(work: Path, seed: int) -> Path:
    return Path(work) / f"seed{seed}"


def run_extra_seed(params: Params, seed: int, method: str, *, embeddings: Path, prompts: Path, base: Path,
                   work: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Train ``method`` with ``seed`` and score it on the HQ sets; returns ``{benchmark: {prompt: metrics}}``."""
    from pipeline.evaluation.evaluate import evaluate_benchmark
    from pipeline.training.train import train

    p = replace(params, **{"seed": seed, "seeds.extra": []})  # this run's seed is its own
    d = _seed_dir(work, seed)
    train(p, method, embeddings=embeddings, prompts=Path(prompts) / "train.parquet", base=base, out=d / "plugins",
          metrics=d / "train", plots=d / "train", resume="auto", checkpoints=d / "checkpoints")
    out: dict[str, dict[str, dict[str, float]]] = {}
    for bench in hq_benchmarks(p):
        out[bench] = evaluate_benchmark(p, bench, method, embeddings=embeddings, prompts=Path(prompts) / "eval.parquet",
                                        base=base, plugins=d / "plugins", out=d / "eval", predictions=d / "predictions",
                                        progress=False)
    return out


def seed_sample(per_bench: Mapping[str, Mapping[str, Mapping[str, float]]], baseline: Mapping[str, Mapping[str, Any]],
                base_name: str, hq_sets: Sequence[str]) -> dict[str, dict[str, float]]:
    """One seed's hq_mean row per prompt (miou, alpha1) with its delta and recovery against ``baseline``
    (the baseline's own hq_mean rows)."""
    mean = hq_mean({b: {"m": per_bench[b]} for b in hq_sets if b in per_bench}, hq_sets).get("m", {})
    block = {"m": {k: dict(v) for k, v in mean.items()}, base_name: {k: dict(v) for k, v in baseline.items()}}
    add_recovery(block, base_name)
    out: dict[str, dict[str, float]] = {}
    for prompt, row in block["m"].items():
        cell = {k: row[k] for k in ("miou", "alpha1", "recovery") if k in row}
        b = baseline.get(prompt, {}).get("miou")
        if b is not None:
            cell["delta"] = row["miou"] - b
        out[prompt] = cell
    return out


def aggregate(samples: Mapping[int, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{seed: {prompt: {metric: v}}}`` -> ``{prompt: {metric: {"mean", "std" (ddof 1; 0 for one seed),
    "min", "n", "values": {seed: v}}}}``."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    prompts = sorted({p for s in samples.values() for p in s})
    for prompt in prompts:
        for metric in METRICS:
            vals = {seed: s[prompt][metric] for seed, s in samples.items() if metric in s.get(prompt, {})}
            if not vals:
                continue
            arr = np.array(list(vals.values()), dtype=np.float64)
            out.setdefault(prompt, {})[metric] = {
                "mean": round(float(arr.mean()), 4), "std": round(float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, 4),
                "min": round(float(arr.min()), 4), "n": int(len(arr)),
                "values": {str(k): round(float(v), 4) for k, v in sorted(vals.items())},
            }
    return out


def run_seeds(params: Params, *, embeddings: Path, prompts: Path, base: Path, eval_dir: Path, work: Path,
              out: Path) -> dict[str, Any]:
    """Write ``out`` (metrics/seeds.json); returns its content. ``work`` (a DVC output) holds the extra seeds'
    runs and is created even when ``seeds.extra`` is empty (one seed: std 0, ``n`` 1)."""
    hq_sets = hq_benchmarks(params)
    base_name = params.report.baseline
    baseline_runs = {b: read_method_json(Path(eval_dir) / b / f"{base_name}.json") for b in hq_sets}
    baseline = hq_mean({b: {base_name: r} for b, r in baseline_runs.items()}, hq_sets).get(base_name, {})
    if not baseline:
        raise FileNotFoundError(f"{eval_dir}: no {base_name} results on the HQ sets; run `dvc repro evaluate` first")
    Path(work).mkdir(parents=True, exist_ok=True)  # after the input checks: a refused run writes nothing
    result: dict[str, Any] = {"seeds": [params.seed, *params.seeds.extra], "baseline": base_name,
                              "hq_sets": list(hq_sets), "methods": {}}
    for method in params.seeds.methods:
        samples: dict[int, dict[str, dict[str, float]]] = {}
        main = {b: read_method_json(Path(eval_dir) / b / f"{method}.json") for b in hq_sets}
        samples[params.seed] = seed_sample(main, baseline, base_name, hq_sets)
        for seed in params.seeds.extra:
            log.info("seeds: training and scoring %s with seed %d", method, seed)
            per_bench = run_extra_seed(params, seed, method, embeddings=embeddings, prompts=prompts, base=base, work=work)
            samples[seed] = seed_sample(per_bench, baseline, base_name, hq_sets)
        result["methods"][method] = aggregate(samples)
    atomic_write_json(out, finite_json(result))
    for method, block in result["methods"].items():
        for prompt in ("noisy_box", "point_1"):
            r = block.get(prompt, {}).get("recovery")
            if r:
                print(f"{method} R_{prompt}: {r['mean']:.3f} ± {r['std']:.3f} over {r['n']} seeds")
    print(json.dumps({"out": str(out), "seeds": result["seeds"]}))
    return result


__all__ = ["aggregate", "run_extra_seed", "run_seeds", "seed_sample"]
