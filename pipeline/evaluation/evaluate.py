"""The ``evaluate`` stages: score methods on a benchmark with the stored, identical prompts.

An HQ set's stage (``evaluate@<set>``) scores every ``evaluate.methods`` entry in one process
(:func:`evaluate_all_methods`), keeping the finished outputs of methods whose inputs did not change
(:mod:`pipeline.evaluation.reuse`); a user dataset has one stage per method (:func:`evaluate_benchmark`).

Benchmarks (``--benchmark``):

- an HQ eval set of the embedding cache (DIS5K-VD, COIFT, HRSOD, ThinObject5K-TE): cached embeddings +
  ``data/prompts/eval.parquet`` (every method sees the identical prompts);
- the name of an ``evaluate.folders`` entry (a user's images + masks): encoded on the fly, prompts made
  with :func:`pipeline.prompts.synthesis.eval_prompts` (same seeds and types as the prompts stage);
- the name of an ``evaluate.coco`` entry: see :mod:`pipeline.evaluation.coco`.

A user dataset (folder or COCO) is validated like the HQ sets by the index stage before it is scored
(:mod:`pipeline.evaluation.user_datasets`); only its valid pairs/images are scored.

Outputs (written atomically): ``<out>/<benchmark>/<method>.json`` =
``{prompt_type: {"miou", "mbiou", "st", "alpha1" (DRP methods only, a fraction 0-1 like the paper's
Table 6), "n" (scored prompts)}}`` with miou/mbiou/st in percent (COCO: ``{key: {"map", "map50",
"miou", "n"}}``; NaN is written as null) and ``<predictions>/<benchmark>/<method>.parquet`` with one row per
prompt (view_id, prompt_type, draw, iou, biou, alpha1, pred_rle, score, height, width, st).

Resumable: results are flushed every ``evaluate.flush_every`` images to
``<predictions>/<benchmark>/.<method>.partial/``; a re-run with the same inputs skips finished images
(a changed method checkpoint, base, prompts file or evaluate params starts afresh).

    python -m stages.evaluate --params params.yaml --benchmark COIFT --method stable_sam \
        --embeddings data/embeddings --prompts data/prompts/eval.parquet --base models/base \
        --plugins models/plugins --out metrics/eval --predictions data/predictions
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn
from tqdm import tqdm

from pipeline.common.atomic import atomic_path, atomic_write_json, finite_json
from pipeline.common.hashing import sha256_bytes, sha256_file
from pipeline.config import Params
from pipeline.data import rle
from pipeline.evaluation.predict import (
    EvaluationError, load_predictor, predict_and_score, resolve_device, stability_from_rles,
)
from pipeline.evaluation.reuse import (
    FINGERPRINT_KEY, encode_fingerprint, method_fingerprint, remove_unlisted, reusable, shared_inputs,
)
from pipeline.evaluation.user_datasets import check_entry, resolve_benchmark, validate_folder, write_user_index
from pipeline.inference.predictor import Predictor, resolve_bf16
from pipeline.inference.prompts import Prompt
from pipeline.modeling.transforms import input_size

log = logging.getLogger(__name__)

PREDICTION_SCHEMA = pa.schema([
    ("view_id", pa.string()),
    ("prompt_type", pa.string()),
    ("draw", pa.int32()),
    ("iou", pa.float64()),
    ("biou", pa.float64()),
    ("alpha1", pa.float64()),
    ("pred_rle", pa.string()),
    ("score", pa.float64()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("st", pa.float64()),
])


@dataclass(frozen=True)
class EvalItem:
    """One image to score: its embedding ``[C, g, g]``, sizes, GT ``bool [H, W]`` and prompts."""

    view_id: str
    embedding: torch.Tensor
    input_hw: tuple[int, int]
    gt: np.ndarray
    prompts: list[Prompt]


# ------------------------------------------------------------------------------------- entry point
def evaluate_benchmark(
    params: Params,
    benchmark: str,
    method: str,
    *,
    embeddings: Path,
    prompts: Path,
    base: Path,
    plugins: Path | None,
    out: Path,
    predictions: Path,
    progress: bool = True,
    fingerprint: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the base SAM and ``method``'s weights, score ``benchmark``, write the JSON + parquet; return the metrics.

    ``fingerprint``: what the outputs are made from (see :func:`evaluate_with_predictor`). By default, for an HQ
    set, :func:`hq_fingerprint` (what :func:`evaluate_all_methods` compares to reuse finished outputs); for a COCO
    or folder entry, the method, the base checkpoint's sha256 and the plugin file's sha256."""
    predictor = load_predictor(params, method, Path(base), plugins)
    plugin = Path(plugins) / f"{method}.pt" if plugins is not None else None
    if fingerprint is None and resolve_benchmark(params, benchmark)[0] == "cache":
        shared = shared_inputs(benchmark, embeddings=Path(embeddings), prompts=Path(prompts), base=Path(base))
        fingerprint = hq_fingerprint(params, shared, method, plugin, bf16=predictor.bf16)
    elif fingerprint is None:
        fingerprint = {"method": method, "base": predictor.info.get("checkpoint_sha256", "")}
        if plugin is not None and plugin.is_file() and predictor.decoder.num_trainable > 0:
            fingerprint["plugin"] = sha256_file(plugin)
    return evaluate_with_predictor(
        params, benchmark, method, predictor,
        embeddings=embeddings, prompts=prompts, out=out, predictions=predictions,
        fingerprint=fingerprint, progress=progress,
    )


def hq_fingerprint(params: Params, shared: dict[str, Any], method: str, plugin: Path | None, *,
                   bf16: bool) -> dict[str, Any]:
    """Everything ``method``'s scores on an HQ set are a function of: the set's ``shared`` inputs
    (:func:`pipeline.evaluation.reuse.shared_inputs`), the plugin file when there is one, the score-changing params
    and bf16 (:func:`pipeline.evaluation.reuse.method_fingerprint`)."""
    return method_fingerprint(shared, method, plugin if plugin is not None and plugin.is_file() else None,
                              evaluate_params=result_params(params), plugin_params=params.to_dict()["plugin"],
                              bf16=bf16)


def evaluate_all_methods(
    params: Params,
    benchmark: str,
    *,
    embeddings: Path,
    prompts: Path,
    base: Path,
    plugins: Path | None,
    out: Path,
    predictions: Path,
    progress: bool = True,
) -> dict[str, dict[str, Any]]:
    """Score every ``evaluate.methods`` entry on the HQ set ``benchmark`` in this process (one ``evaluate@B``
    stage); a method whose finished outputs were made from the same inputs is reused, not scored again
    (:mod:`pipeline.evaluation.reuse`), and outputs of methods no longer listed are removed.
    Returns {method: metrics}."""
    kind, _ = resolve_benchmark(params, benchmark)
    if kind != "cache":
        raise ValueError(f"{benchmark}: scoring every method in one process is for the HQ sets of the embedding "
                         "cache; a COCO / folder entry has one stage per method (evaluate_coco / evaluate_folder)")
    methods = list(params.evaluate.methods)
    for path in [*remove_unlisted(Path(out) / benchmark, ".json", methods),
                 *remove_unlisted(Path(predictions) / benchmark, ".parquet", methods)]:
        log.info("%s: removed %s (its method is not in evaluate.methods)", benchmark, path)
    bf16 = resolve_bf16(params.evaluate.bf16, resolve_device(params.evaluate.device))
    shared = shared_inputs(benchmark, embeddings=Path(embeddings), prompts=Path(prompts), base=Path(base))
    results: dict[str, dict[str, Any]] = {}
    for method in methods:
        plugin = Path(plugins) / f"{method}.pt" if plugins is not None else None
        fp = hq_fingerprint(params, shared, method, plugin, bf16=bf16)
        json_path = Path(out) / benchmark / f"{method}.json"
        if reusable(json_path, Path(predictions) / benchmark / f"{method}.parquet", fp):
            log.info("%s / %s: inputs unchanged, kept %s", benchmark, method, json_path)
            results[method] = json.loads(json_path.read_text(encoding="utf-8"))
            continue
        results[method] = evaluate_benchmark(params, benchmark, method, embeddings=Path(embeddings),
                                             prompts=Path(prompts), base=Path(base), plugins=plugins, out=Path(out),
                                             predictions=Path(predictions), progress=progress,
                                             fingerprint=fp)
    return results


def run_evaluate(
    params: Params,
    benchmark: str,
    method: str | None,
    *,
    entry: dict[str, str | None] | None = None,
    index_only: bool = False,
    index_dir: Path = Path("data/eval_index"),
    embeddings: Path = Path("data/embeddings"),
    prompts: Path = Path("data/prompts/eval.parquet"),
    base: Path = Path("models/base"),
    plugins: Path | None = Path("models/plugins"),
    out: Path = Path("metrics/eval"),
    predictions: Path | None = None,
    fresh: bool = False,
    progress: bool = True,
    all_methods: bool = False,
) -> dict[str, Any]:
    """The ``evaluate`` stage: check the command line's ``entry`` fields against params, then either validate a
    user dataset (``index_only``: its index + quarantine list), score ``method`` on ``benchmark``, or
    (``all_methods``, HQ sets) score every ``evaluate.methods`` entry with :func:`evaluate_all_methods`; prints a
    summary and returns the index JSON, the metrics, or {method: metrics}."""
    check_entry(params, benchmark, entry or {})
    if index_only:
        doc = write_user_index(params, benchmark, out=Path(out), index_dir=Path(index_dir))
        reasons = ", ".join(f"{n} {k}" for k, n in doc["reasons"].items()) or "-"
        print(f"{benchmark}: {doc['valid']} valid, {doc['quarantined']} quarantined ({reasons}) -> "
              f"{Path(out) / benchmark / 'index.json'}, {Path(index_dir) / benchmark}")
        return doc
    if all_methods:
        if method is not None or predictions is None:
            raise ValueError("evaluate: all_methods scores every evaluate.methods entry: give no method, and a "
                             "predictions folder")
        if fresh:
            for m in params.evaluate.methods:
                shutil.rmtree(Path(predictions) / benchmark / f".{m}.partial", ignore_errors=True)
        results = evaluate_all_methods(params, benchmark, embeddings=Path(embeddings), prompts=Path(prompts),
                                       base=Path(base), plugins=plugins, out=Path(out),
                                       predictions=Path(predictions), progress=progress)
        for m, metrics in results.items():
            _print_summary(benchmark, m, metrics, Path(out))
        return results
    if method is None or predictions is None:
        raise ValueError("evaluate: a method and a predictions folder are needed to score (or use index_only)")
    if fresh:
        shutil.rmtree(Path(predictions) / benchmark / f".{method}.partial", ignore_errors=True)
    metrics = evaluate_benchmark(params, benchmark, method, embeddings=Path(embeddings), prompts=Path(prompts),
                                 base=Path(base), plugins=plugins, out=Path(out), predictions=Path(predictions),
                                 progress=progress)
    _print_summary(benchmark, method, metrics, Path(out))
    return metrics


def _print_summary(benchmark: str, method: str, metrics: dict[str, Any], out: Path) -> None:
    print(f"{benchmark} / {method}:")
    for ptype, vals in sorted(metrics.items()):
        print(f"  {ptype:14s} " + "  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in vals.items()))
    print(json.dumps({"benchmark": benchmark, "method": method, "out": str(out / benchmark / f"{method}.json")}))


def evaluate_with_predictor(
    params: Params,
    benchmark: str,
    method: str,
    predictor: Predictor,
    *,
    embeddings: Path | None,
    prompts: Path | None,
    out: Path,
    predictions: Path,
    fingerprint: dict[str, Any] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Score an already-built ``predictor`` (e.g. with a forced α in tests) and write the outputs under ``method``.

    ``fingerprint`` (what the caller knows the scores depend on, e.g. :func:`hq_fingerprint`) is stored in the
    predictions file, which is written after the metrics JSON, so a finished predictions file means finished
    outputs made from those inputs. With the benchmark, the evaluate params, the prompts and the cache's
    metadata added, it also keys the resume folder of an interrupted run."""
    kind, entry = resolve_benchmark(params, benchmark)
    sam = predictor.model
    json_path = Path(out) / benchmark / f"{method}.json"
    pred_path = Path(predictions) / benchmark / f"{method}.parquet"
    if kind == "coco":
        from pipeline.evaluation.coco import run_coco_benchmark

        metrics, rows = run_coco_benchmark(params, entry, predictor, progress=progress)  # type: ignore[arg-type]
        table = pa.Table.from_pylist(rows)
    else:
        fp = {**(fingerprint or {}), "benchmark": benchmark, "evaluate": result_params(params), "bf16": predictor.bf16,
              "prompts": params.to_dict()["prompts"] if kind == "folder" else None,
              "entry": entry, "index": params.to_dict()["index"] if kind == "folder" else None}
        if kind == "cache":
            if embeddings is None or prompts is None:
                raise ValueError(f"{benchmark}: an HQ benchmark needs --embeddings and --prompts")
            from pipeline.data.embedding_format import read_cache_meta

            cache_meta = read_cache_meta(Path(embeddings))
            check_cache(cache_meta, sam, params.evaluate.postprocess, Path(embeddings),
                        predictor.info.get("checkpoint_sha256"))
            fp["prompts_sha256"] = sha256_file(prompts) if Path(prompts).is_file() else None
            fp["cache"] = cache_meta
        partial = PartialResults(pred_path.parent / f".{method}.partial", fp)
        done = partial.done_views()
        if kind == "cache":
            items = _cache_items(params, benchmark, Path(embeddings), Path(prompts), sam, done)  # type: ignore[arg-type]
        else:
            items = _folder_items(params, entry, predictor, done)  # type: ignore[arg-type]
        _score_items(params, items, predictor, partial, progress=progress, desc=f"{benchmark} [{method}]")
        table = partial.read_all()
        if table.num_rows == 0:
            raise EvaluationError(f"{benchmark}: nothing was evaluated (no images with prompts; see warnings above)")
        metrics = summarize(table)
    atomic_write_json(json_path, finite_json(metrics))
    if fingerprint is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               FINGERPRINT_KEY: encode_fingerprint(fingerprint)})
    with atomic_path(pred_path) as tmp:
        pq.write_table(table, tmp)
    if kind != "coco":
        partial.remove()
    log.info("%s / %s -> %s", benchmark, method, json_path)
    return metrics


RESULT_KEYS = ("postprocess", "boundary_dilation_ratio", "batch_size", "device", "bf16")


def result_params(params: Params) -> dict[str, Any]:
    """The ``evaluate`` params that change a benchmark's scores (not the lists of benchmarks/methods/datasets)."""
    ev = params.to_dict()["evaluate"]
    return {k: ev[k] for k in RESULT_KEYS}


# -------------------------------------------------------------------------------------- summarising
def summarize(table: pa.Table) -> dict[str, dict[str, float]]:
    """Per prompt type: miou, mbiou (means over all scored prompts, percent), st (mean over images of
    the per-image ST, percent), alpha1 (mean, only when the method has one), n (scored prompts)."""
    cols = {c: table.column(c).to_numpy(zero_copy_only=False) for c in ("view_id", "prompt_type", "iou", "biou", "alpha1", "st")}
    out: dict[str, dict[str, float]] = {}
    for ptype in sorted(set(cols["prompt_type"].tolist())):
        sel = cols["prompt_type"] == ptype
        views = cols["view_id"][sel]
        _, first = np.unique(views, return_index=True)
        res: dict[str, float] = {
            "miou": float(np.mean(cols["iou"][sel]) * 100.0),
            "mbiou": float(np.mean(cols["biou"][sel]) * 100.0),
            "st": float(np.mean(cols["st"][sel][first])),
            "n": int(sel.sum()),
        }
        alpha = cols["alpha1"][sel].astype(np.float64)
        if np.isfinite(alpha).any():
            res["alpha1"] = float(np.nanmean(alpha))
        out[ptype] = res
    return out


def _score_items(params: Params, items: Iterator[EvalItem], predictor: Predictor, partial: "PartialResults",
                 *, progress: bool, desc: str) -> None:
    ev = params.evaluate
    buffer: list[dict[str, Any]] = []
    n_images = 0
    bar = tqdm(items, desc=desc, unit="img", disable=not progress)
    for item in bar:
        predictor.set_embedding(item.embedding, item.gt.shape, item.input_hw)
        s = predict_and_score(predictor, item.prompts, item.gt, dilation_ratio=ev.boundary_dilation_ratio,
                              batch_size=ev.batch_size)
        by_type: dict[str, list[int]] = {}
        for i, pr in enumerate(item.prompts):
            by_type.setdefault(pr.prompt_type, []).append(i)
        st = {t: stability_from_rles([s.rles[i] for i in idx]) for t, idx in by_type.items()}
        h, w = item.gt.shape
        for i, pr in enumerate(item.prompts):
            buffer.append({
                "view_id": item.view_id, "prompt_type": pr.prompt_type, "draw": pr.draw,
                "iou": float(s.iou[i]), "biou": float(s.biou[i]),
                "alpha1": float("nan") if s.alpha1 is None else float(s.alpha1[i]),
                "pred_rle": s.rles[i]["counts"], "score": float(s.score[i]), "height": h, "width": w,
                "st": st[pr.prompt_type],
            })
        n_images += 1
        if n_images % ev.flush_every == 0:
            partial.flush(buffer)
            buffer = []
    partial.flush(buffer)


# ------------------------------------------------------------------------------------------- resume
class PartialResults:
    """Prediction rows flushed in parts to a folder keyed by a fingerprint of everything that matters."""

    def __init__(self, folder: Path, fingerprint: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.key = sha256_bytes(json.dumps(fingerprint, sort_keys=True, default=str).encode())
        stamp = self.folder / "fingerprint.txt"
        if self.folder.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != self.key):
            log.info("%s: inputs changed since the interrupted run; starting afresh", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(self.key + "\n")
        self._next = len(self._parts())

    def _parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def done_views(self) -> set[str]:
        done: set[str] = set()
        for part in self._parts():
            done.update(pq.read_table(part, columns=["view_id"]).column("view_id").to_pylist())
        if done:
            log.info("%s: resuming, %d images already scored", self.folder, len(done))
        return done

    def flush(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        with atomic_path(self.folder / f"part-{self._next:05d}.parquet") as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=PREDICTION_SCHEMA), tmp)
        self._next += 1

    def read_all(self) -> pa.Table:
        parts = [pq.read_table(p) for p in self._parts()]
        return pa.concat_tables(parts) if parts else PREDICTION_SCHEMA.empty_table()

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# ------------------------------------------------------------------------------------- cache items
def _load_prompts(path: Path, dataset: str) -> dict[str, list[Prompt]]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: eval prompts not found; run `dvc repro prompts`")
    table = pq.read_table(path, columns=["view_id", "prompt_type", "draw", "box", "points", "point_labels"])
    table = table.filter(pc.starts_with(table.column("view_id"), f"{dataset}/"))
    grouped: dict[str, list[Prompt]] = {}
    for row in table.to_pylist():
        grouped.setdefault(row["view_id"], []).append(Prompt.from_row(row, where=str(path)))
    return grouped


def check_cache(meta: dict[str, Any], sam: nn.Module, mode: str, root: Path, base_sha256: str | None = None) -> None:
    """The cache must come from this base model (grid, input size, checkpoint) and the evaluation's preprocessing."""
    enc_size = int(sam.image_encoder.img_size)
    grid = int(sam.prompt_encoder.image_embedding_size[0])
    if int(meta["img_size"]) != enc_size or int(meta["grid"]) != grid:
        raise ValueError(f"{root}: embeddings are for img_size {meta['img_size']} / grid {meta['grid']}, the base "
                         f"model has {enc_size} / {grid}; re-run `dvc repro embed`")
    if base_sha256 and meta.get("checkpoint_sha256") != base_sha256:
        raise ValueError(f"{root}: embeddings were made by checkpoint {str(meta.get('checkpoint_sha256'))[:12]}..., the "
                         f"base is {base_sha256[:12]}...; the cache is stale: re-run `dvc repro embed`")
    cache_mode = "squash" if "squash" in str(meta.get("preprocessing", "")) else "sam"
    if cache_mode != mode:
        raise ValueError(f"{root}: embeddings were made with {meta.get('preprocessing')!r} preprocessing but "
                         f"evaluate.postprocess is {mode!r}; set evaluate.postprocess: {cache_mode} or re-embed")


def _cache_items(params: Params, dataset: str, root: Path, prompts_path: Path, sam: nn.Module,
                 done: set[str]) -> Iterator[EvalItem]:
    """Eval views of ``dataset`` from the cache, in stored order, with their prompts (``done`` skipped)."""
    from pipeline.data.embedding_reader import iter_views

    mode = params.evaluate.postprocess
    prompts = _load_prompts(prompts_path, dataset)
    if not prompts:
        raise ValueError(f"{prompts_path}: no prompts for {dataset!r}; re-run `dvc repro prompts`")
    img_size = int(sam.image_encoder.img_size)
    seen: set[str] = set()
    try:
        rows = iter_views(root, "eval", datasets=[dataset])
        for row in rows:
            view = row["view_id"]
            seen.add(view)
            if view in done:
                continue
            if view not in prompts:
                raise ValueError(f"{root}: view {view!r} has no eval prompts in {prompts_path}; "
                                 "the prompts are stale: re-run `dvc repro prompts`")
            h, w = int(row["height"]), int(row["width"])
            in_hw = (int(row["input_h"]), int(row["input_w"]))
            if in_hw != tuple(input_size((h, w), img_size, mode)):
                raise ValueError(f"{root}: view {view!r} has input size {in_hw}, evaluate.postprocess={mode!r} "
                                 f"expects {input_size((h, w), img_size, mode)}; re-embed or change the param")
            gt = rle.decode(row["mask_rle"], h, w)
            yield EvalItem(view, row["embedding"], in_hw, gt, prompts[view])
    except KeyError as exc:  # the cache has no eval shards of this dataset
        raise ValueError(f"{root}: {exc.args[0]}; is {dataset!r} in data.eval_sets? run `dvc repro embed`") from None
    missing = sorted(set(prompts) - seen)
    if missing:
        raise ValueError(f"{prompts_path}: {len(missing)} {dataset} views with prompts are not in the cache "
                         f"(e.g. {missing[0]!r}); re-run `dvc repro embed prompts`")


def _folder_items(params: Params, entry: dict[str, Any], predictor: Predictor, done: set[str]) -> Iterator[EvalItem]:
    """A user's image/mask folder: its valid pairs (:func:`validate_folder`) encoded on the fly, prompts from
    the prompts module's eval synthesis."""
    from pipeline.data.images import load_image, load_mask
    from pipeline.prompts.synthesis import eval_prompts

    name = entry["name"]
    pairs = validate_folder(entry, params.index).rows
    if not pairs:
        raise EvaluationError(f"{name}: no valid image/mask pair in {entry['images']} / {entry['masks']} "
                              "(see the quarantine warnings above)")
    if params.data.max_images_per_set:
        pairs = pairs[: params.data.max_images_per_set]
    for row in pairs:
        view = f"{row.sample_id}#0"
        if view in done:
            continue
        image = load_image(row.image_path)
        gt = load_mask(row.mask_path, params.index.mask_threshold)
        prompts = [Prompt.from_row(r, where=row.mask_path) for r in eval_prompts(view, gt, params.prompts)]
        predictor.set_image(image)
        yield EvalItem(view, predictor.get_image_embedding()[0], predictor.input_size, gt, prompts)  # type: ignore[arg-type]


__all__ = [
    "EvalItem",
    "PREDICTION_SCHEMA",
    "PartialResults",
    "evaluate_all_methods",
    "evaluate_benchmark",
    "evaluate_with_predictor",
    "check_cache",
    "hq_fingerprint",
    "summarize",
    "result_params",
    "run_evaluate",
]
