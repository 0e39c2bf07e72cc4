"""The ``embed`` stage: every view through the frozen SAM image encoder, into resumable Parquet shards.

For each view (sorted by dataset, split, view_id): :func:`pipeline.data.view_render.render_view` ->
:func:`pipeline.modeling.transforms.preprocess` -> batched ``sam.image_encoder`` under
``torch.inference_mode`` (bf16 autocast when ``embed.bf16``) -> fp16 -> shard files (format:
:mod:`pipeline.data.embedding_format`). ``embed.render_workers`` threads render batches ahead of the encoder
(auto: none on CPU, where they would compete with it for cores), and one thread writes the finished
shard while the next one encodes.

Resume: a shard is a fixed chunk of ``embed.shard_rows`` views of one (dataset, split); batches never
cross shards, so a shard's bytes do not depend on which run wrote it. Shards are written to a temporary
name and renamed; finished shards whose metadata matches (same checkpoint sha256, preprocessing, format,
views hash) are kept, anything else is REFUSED (never mixed). ``CACHE.json`` is written last.

    python -m stages.embed --params params.yaml --views data/views/views.parquet --root data/hqseg44k \
        --base models/base --out data/embeddings
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torch import nn

from pipeline.common.atomic import atomic_path, atomic_write_json
from pipeline.config import EmbedConfig, Params
from pipeline.data.embedding_format import (
    CACHE_FILE,
    CacheMeta,
    StaleCacheError,
    cache_summary,
    locate_embeddings,
    read_shard_meta,
    shard_path,
    write_shard,
)
from pipeline.data.view_render import render_view
from pipeline.data.views import read_views
from pipeline.modeling.transforms import preprocess

log = logging.getLogger(__name__)

# Test hook: exit the process (no cleanup) right after this many shards were written in this run.
EXIT_AFTER_SHARDS_ENV = "STABLE_SAM_EMBED_EXIT_AFTER_SHARDS"
_HASHED_VIEW_COLUMNS = ("view_id", "spec", "height", "width", "mask_rle")


@dataclass(frozen=True)
class ShardPlan:
    """Rows ``[start, stop)`` of the sorted views table form shard ``index`` of ``(dataset, split)``."""

    dataset: str
    split: str
    index: int
    start: int
    stop: int
    views_sha256: str

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def path(self, out: str | os.PathLike[str]) -> Path:
        return shard_path(out, self.dataset, self.split, self.index)

    def rel(self) -> str:
        return f"{self.dataset}/{self.split}/part-{self.index:05d}.parquet"


def sort_views(views: pa.Table) -> pa.Table:
    """The views table in cache order: dataset, split, view_id."""
    return views.sort_by([("dataset", "ascending"), ("split", "ascending"), ("view_id", "ascending")])


def views_hash(views: pa.Table) -> str:
    """sha256 of the rows that determine an embedding and its stored columns (view_id, spec, size, GT)."""
    digest = hashlib.sha256()
    cols = [views.column(c).to_pylist() for c in _HASHED_VIEW_COLUMNS]
    for values in zip(*cols):
        digest.update(json.dumps(values, separators=(",", ":")).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def plan_shards(views: pa.Table, shard_rows: int) -> list[ShardPlan]:
    """Cut a :func:`sort_views`-sorted table into shards of at most ``shard_rows`` rows per (dataset, split)."""
    ds = views.column("dataset").to_pylist()
    sp = views.column("split").to_pylist()
    plans: list[ShardPlan] = []
    start = 0
    n = len(ds)
    while start < n:
        key = (ds[start], sp[start])
        end = start
        while end < n and (ds[end], sp[end]) == key:
            end += 1
        for k, s in enumerate(range(start, end, shard_rows)):
            e = min(s + shard_rows, end)
            plans.append(ShardPlan(key[0], key[1], k, s, e, views_hash(views.slice(s, e - s))))
        start = end
    return plans


def _refusal(out: Path, what: str) -> StaleCacheError:
    return StaleCacheError(f"embeddings in {out} {what}; delete {out} and re-run `dvc repro embed` "
                           "(the cache is resumable, so DVC keeps it between runs)")


def check_existing(out: str | os.PathLike[str], plans: list[ShardPlan], meta: CacheMeta,
                   on_stale: str = "refuse") -> set[str]:
    """Validate what a previous run left in ``out``; returns the relative paths of reusable shards.

    A shard (or CACHE.json) made by another base model, preprocessing or format, or from other views,
    raises :class:`StaleCacheError` (``on_stale="refuse"``), or is deleted with a logged reason
    (``on_stale="rebuild"``, what ``dvc repro`` uses once DVC has seen a dependency change): stale
    shards are never mixed with new ones. Removes our own temporary files of killed runs.
    """
    out = Path(out)
    planned = {p.rel(): p for p in plans}

    def stale(path: Path, what: str) -> None:
        if on_stale != "rebuild":
            raise _refusal(out, what)
        log.warning("discarding stale %s: %s", path, what)
        path.unlink()

    cache_file = out / CACHE_FILE
    if cache_file.is_file():
        diffs = meta.differences(CacheMeta.from_dict(json.loads(cache_file.read_text())))
        if diffs:
            stale(cache_file, diffs[0])
    done: set[str] = set()
    for f in sorted(out.glob("*/*/part-*.parquet")):
        rel = f.relative_to(out).as_posix()
        found = read_shard_meta(f)
        diffs = meta.differences(CacheMeta.from_dict(found))
        if diffs:
            stale(f, f"({rel}) {diffs[0]}")
            continue
        plan = planned.get(rel)
        if plan is None or found.get("views_sha256") != plan.views_sha256 or found.get("rows") != plan.rows:
            stale(f, f"({rel}) were made from different views (views.parquet changed)")
            continue
        done.add(rel)
    for tmp in out.glob("*/*/.part-*.tmp"):
        tmp.unlink()
    return done


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("embed.device is 'cuda' but no CUDA device is visible; set embed.device: auto or cpu")
    return torch.device(name)


# --------------------------------------------------------------------------------------------------
# Input pipeline
@dataclass
class Batch:
    """One encoder batch: ``x [B, 3, S, S]`` float32 and the rows' (input_h, input_w)."""

    shard: int
    x: torch.Tensor
    input_hw: list[tuple[int, int]]


def render_batch(rows: list[Mapping[str, Any]], root: Path, img_size: int) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Render + SAM-preprocess views -> (``[B, 3, img_size, img_size]``, [(input_h, input_w)])."""
    xs, hws = [], []
    for row in rows:
        image, _ = render_view(row, None, root, with_mask=False)
        if image.shape[:2] != (row["height"], row["width"]):
            raise StaleCacheError(f"view {row['view_id']}: rendered {image.shape[:2]}, views.parquet says "
                                  f"{(row['height'], row['width'])}; re-run `dvc repro views`")
        x, hw = preprocess(image, img_size)
        xs.append(x)
        hws.append(hw)
    return torch.stack(xs), hws


def _batch_jobs(
    views: pa.Table, todo: list[tuple[int, ShardPlan]], batch_size: int
) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(shard number, rows) per encoder batch; batches never cross shards (so shard bytes never depend on resume)."""
    for k, plan in todo:
        rows = views.slice(plan.start, plan.rows).to_pylist()
        for s in range(0, len(rows), batch_size):
            yield k, rows[s:s + batch_size]


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, depth: int | None = None) -> Iterator[Any]:
    """``map(fn, items)`` computed by ``workers`` threads up to ``depth`` items ahead, yielded in order.

    ``workers == 0`` runs inline. PIL decoding, OpenCV and torch release the GIL, so threads do help.
    """
    if workers <= 0:
        yield from map(fn, items)
        return
    depth = depth if depth is not None else 2 * workers
    pool = ThreadPoolExecutor(workers, thread_name_prefix="embed-render")
    window: collections.deque[Future] = collections.deque()
    try:
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) > depth:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def resolve_render_workers(n: int, device: torch.device) -> int:
    """``embed.render_workers``: -1 = 0 on CPU (threads would steal the encoder's cores), else min(8, cores - 1)."""
    if n >= 0:
        return n
    return 0 if device.type == "cpu" else max(1, min(8, (os.cpu_count() or 2) - 1))


# --------------------------------------------------------------------------------------------------
def encode(encoder: nn.Module, x: torch.Tensor, device: torch.device, bf16: bool) -> torch.Tensor:
    """``[B, 3, S, S]`` -> fp16 ``[B, C, g, g]`` on the CPU (bf16 autocast when asked)."""
    with torch.inference_mode(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
        y = encoder(x.to(device, non_blocking=True))
    return y.to(torch.float16).cpu()


def embed_views(
    views: pa.Table,
    root: str | os.PathLike[str],
    sam: nn.Module,
    info: Mapping[str, Any],
    out: str | os.PathLike[str],
    cfg: EmbedConfig,
    *,
    progress: bool = True,
    on_stale: str = "refuse",
) -> dict[str, Any]:
    """Embed every row of ``views`` into ``out`` (resuming); returns the CACHE.json contents.

    ``on_stale``: what to do with shards made by another base/preprocessing/views (see check_existing).

    ``sam`` is a frozen SAM (only ``sam.image_encoder`` is used); ``info`` its base info
    (variant, checkpoint_sha256, img_size, grid, channels).
    """
    from tqdm import tqdm  # noqa: PLC0415

    out, root = Path(out), Path(root)
    meta = CacheMeta.from_info(info)
    views = sort_views(views)
    _check_view_ids(views)
    _warn_canvas(views, meta.img_size)
    plans = plan_shards(views, cfg.shard_rows)
    done = check_existing(out, plans, meta, on_stale)
    todo = [(k, p) for k, p in enumerate(plans) if p.rel() not in done]
    if todo:
        (out / CACHE_FILE).unlink(missing_ok=True)  # the cache is incomplete until CACHE.json is rewritten
    device = resolve_device(cfg.device)
    encoder = sam.image_encoder.to(device).eval()
    workers = resolve_render_workers(cfg.render_workers, device)
    exit_after = int(os.environ.get(EXIT_AFTER_SHARDS_ENV, "0") or 0)
    log.info("embed: %d shards (%d views) to do, %d reused; device %s, bf16 %s, %d render threads",
             len(todo), sum(p.rows for _, p in todo), len(done), device, cfg.bf16, workers)

    def render(job: tuple[int, list[dict[str, Any]]]) -> Batch:
        k, rows = job
        x, hws = render_batch(rows, root, meta.img_size)
        return Batch(k, x, hws)

    bar = tqdm(total=sum(p.rows for _, p in todo), desc="embed", unit="img", disable=not progress)
    pending: dict[int, list[tuple[torch.Tensor, list[tuple[int, int]]]]] = {}
    written = 0
    offsets: dict[str, list[int | None]] = {}  # located while each new shard is still in the page cache
    writer = ThreadPoolExecutor(1, thread_name_prefix="embed-write")  # one shard written while the next encodes
    in_flight: Future | None = None

    def settle() -> None:
        nonlocal in_flight, written
        if in_flight is not None:
            rel, offs = in_flight.result()
            offsets[rel] = offs
            in_flight = None
            written += 1
            if exit_after and written >= exit_after:
                os._exit(17)  # test hook: die like a killed run, right after a finished shard

    t0 = time.perf_counter()
    try:
        for batch in ordered_map(render, _batch_jobs(views, todo, cfg.batch_size), workers):
            y = encode(encoder, batch.x, device, cfg.bf16)
            if tuple(y.shape[1:]) != meta.shape:
                raise ValueError(f"the encoder outputs {tuple(y.shape[1:])}, base.json says {meta.shape}; fix models/base")
            pending.setdefault(batch.shard, []).append((y, batch.input_hw))
            bar.update(len(batch.input_hw))
            plan = plans[batch.shard]
            if sum(len(h) for _, h in pending[batch.shard]) == plan.rows:
                settle()
                in_flight = writer.submit(_write, out, views, plan, pending.pop(batch.shard), meta, cfg.row_group_size)
        settle()
    finally:
        writer.shutdown(wait=True)
        bar.close()
    elapsed = time.perf_counter() - t0
    cache = _cache_summary(out, plans, meta, offsets)
    atomic_write_json(out / CACHE_FILE, cache)
    n = sum(p.rows for _, p in todo)
    log.info("embed: %d views in %.1f s (%.2f img/s)", n, elapsed, n / elapsed if elapsed else float("nan"))
    return cache


def _write(out: Path, views: pa.Table, plan: ShardPlan, parts: list, meta: CacheMeta,
           row_group_size: int) -> tuple[str, list[int | None]]:
    """Write one shard atomically; returns (its relative path, its verified embedding offsets)."""
    emb = torch.cat([y for y, _ in parts]).numpy()
    if not np.isfinite(emb).all():
        raise FloatingPointError(f"non-finite embeddings in {plan.rel()} (fp16 overflow?); run with embed.bf16: false")
    hws = [hw for _, h in parts for hw in h]
    rows = views.slice(plan.start, plan.rows)
    names = ("view_id", "sample_id", "dataset", "split", "height", "width", "mask_rle")
    columns = {c: rows.column(c).to_pylist() for c in names}
    columns["input_h"] = [h for h, _ in hws]
    columns["input_w"] = [w for _, w in hws]
    extra = {"views_sha256": plan.views_sha256, "dataset": plan.dataset, "split": plan.split,
             "shard": plan.index, "rows": plan.rows}
    with atomic_path(plan.path(out)) as tmp:
        write_shard(tmp, columns, emb, meta, extra, row_group_size)
        offs = locate_embeddings(tmp, meta)  # positions survive the rename
    return plan.rel(), offs


def _cache_summary(
    out: Path, plans: list[ShardPlan], meta: CacheMeta, offsets: Mapping[str, list[int | None]]
) -> dict[str, Any]:
    shards = [{"path": p.rel(), "dataset": p.dataset, "split": p.split, "rows": p.rows,
               "views_sha256": p.views_sha256, "bytes": p.path(out).stat().st_size,
               "embedding_offsets": offsets.get(p.rel()) or locate_embeddings(p.path(out), meta)} for p in plans]
    return cache_summary(meta, shards)


def _check_view_ids(views: pa.Table) -> None:
    ids = views.column("view_id")
    if pc.count_distinct(ids).as_py() != len(ids):
        raise ValueError("views.parquet has duplicate view_id values; re-run `dvc repro views`")


def _warn_canvas(views: pa.Table, img_size: int) -> None:
    jitter = views.filter(pc.equal(views.column("kind"), "jitter"))
    sizes = {json.loads(s)["canvas"] for s in jitter.column("spec").to_pylist()[:1000]}
    if sizes and sizes != {img_size}:
        log.warning("jitter views have canvas %s but the encoder input is %d: set views.output_size to match",
                    sorted(sizes), img_size)


def run_embed(
    params: Params,
    views_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    progress: bool = True,
    on_stale: str = "refuse",
) -> dict[str, Any]:
    """The stage: load the frozen base (``load_base``) and :func:`embed_views` every view."""
    from pipeline.modeling.backbones import load_base  # noqa: PLC0415

    sam, info = load_base(Path(base_dir))
    cache = embed_views(read_views(views_path), root, sam, info, out, params.embed, progress=progress,
                        on_stale=on_stale)
    print(f"wrote {out}: {cache['rows']} embeddings in {len(cache['shards'])} shards "
          f"({cache['variant']}, checkpoint {cache['checkpoint_sha256'][:12]}..., grid {cache['grid']})")
    return cache


__all__ = [
    "Batch", "EXIT_AFTER_SHARDS_ENV", "ShardPlan", "check_existing", "embed_views", "encode", "ordered_map",
    "plan_shards", "render_batch", "resolve_device", "resolve_render_workers", "run_embed", "sort_views", "views_hash",
]
