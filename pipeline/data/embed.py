"""The ``embed`` stage: every view through the frozen SAM image encoder, into resumable Parquet shards.

For each view (sorted by dataset, split, view_id): :func:`pipeline.data.view_render.render_view` ->
:func:`pipeline.modeling.transforms.preprocess` -> batched ``sam.image_encoder`` under
``torch.inference_mode`` (bf16 autocast when ``embed.bf16``) -> fp16 -> shard files (format:
:mod:`pipeline.data.embedding_format`). ``embed.render_workers`` threads render batches ahead of the encoder
(auto: none on CPU, where they would compete with it for cores), and one thread writes the finished
shard while the next one encodes.

Executors: :func:`embed_shards` is the one shard function; :func:`embed_views` (this process) runs it
over every missing shard, torchrun ranks (:mod:`pipeline.data.embed_shards`) and Dask workers
(:mod:`pipeline.flows.embed_dask`) over their share, and all of them plan with :func:`prepare_cache` and
finish with :func:`finish_cache` (every shard verified, then ``CACHE.json``).

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
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

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
from pipeline.data.view_render import SourceCache, render_view
from pipeline.data.views import read_views
from pipeline.modeling.transforms import preprocess_into

log = logging.getLogger(__name__)

# Test hooks: exit the process (no cleanup) right after this many shards were written in this run; die
# once while writing one shard ("<shard rel>@<marker file>", see _die_in_shard).
EXIT_AFTER_SHARDS_ENV = "STABLE_SAM_EMBED_EXIT_AFTER_SHARDS"
DIE_IN_SHARD_ENV = "STABLE_SAM_EMBED_DIE_IN_SHARD"
DIE_EXIT_CODE = 23
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


def _shard_problem(found: Mapping[str, Any], meta: CacheMeta, plan: ShardPlan | None) -> str | None:
    """Why a shard with metadata ``found`` does not belong to the planned shard ``plan`` of this cache, or None."""
    diffs = meta.differences(CacheMeta.from_dict(found))
    if diffs:
        return diffs[0]
    if plan is None or found.get("views_sha256") != plan.views_sha256 or found.get("rows") != plan.rows:
        return "were made from different views (views.parquet changed)"
    return None


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
        problem = _shard_problem(read_shard_meta(f), meta, planned.get(rel))
        if problem:
            stale(f, f"({rel}) {problem}")
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
    """Render + SAM-preprocess views -> (``[B, 3, img_size, img_size]``, [(input_h, input_w)]).

    Source files shared by views of the batch (the views of one image, occluders) are decoded once, and each
    view is preprocessed straight into its row of one batch buffer (numpy only: no torch op per view).
    """
    buf = np.empty((len(rows), 3, img_size, img_size), dtype=np.float32)
    hws = []
    sources: SourceCache = {}
    for i, row in enumerate(rows):
        image, _ = render_view(row, None, root, with_mask=False, sources=sources)
        if image.shape[:2] != (row["height"], row["width"]):
            raise StaleCacheError(f"view {row['view_id']}: rendered {image.shape[:2]}, views.parquet says "
                                  f"{(row['height'], row['width'])}; re-run `dvc repro views`")
        hws.append(preprocess_into(image, buf[i], img_size))
    return torch.from_numpy(buf), hws


def _batch_jobs(work: Sequence[ShardWork], batch_size: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """(position in ``work``, rows) per encoder batch; batches never cross shards (so shard bytes never
    depend on resume or on which process embeds the shard)."""
    for k, item in enumerate(work):
        rows = item.rows.to_pylist()
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


@dataclass(frozen=True)
class ShardWork:
    """One shard to embed: its plan and its rows of the :func:`sort_views`-sorted views table."""

    plan: ShardPlan
    rows: pa.Table

    @classmethod
    def of(cls, views: pa.Table, plan: ShardPlan) -> "ShardWork":
        """The shard's rows copied out of ``views`` (a zero-copy slice would pickle the whole table to a worker)."""
        return cls(plan, views.take(pa.array(range(plan.start, plan.stop), pa.int64())))


@dataclass
class ShardEncoder:
    """What every shard of one cache is embedded with: the frozen image encoder on ``device``, the cache
    metadata it must produce, the ``embed`` params and the dataset root the views are rendered from."""

    encoder: nn.Module
    device: torch.device
    meta: CacheMeta
    cfg: EmbedConfig
    root: Path


def _die_in_shard(plan: ShardPlan) -> None:
    """Test hook (:data:`DIE_IN_SHARD_ENV` = ``<shard rel>@<marker file>``): the first process to write that
    shard dies (no cleanup) after its temporary file is written and before the rename; the marker makes it once."""
    spec = os.environ.get(DIE_IN_SHARD_ENV, "")
    rel, _, marker = spec.partition("@")
    if rel == plan.rel() and marker:
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.close(fd)
        os._exit(DIE_EXIT_CODE)


def embed_shards(
    enc: ShardEncoder,
    work: Sequence[ShardWork],
    out: str | os.PathLike[str],
    *,
    on_rows: Callable[[int], Any] | None = None,
) -> dict[str, list[int | None]]:
    """THE shard function: embed ``work`` into ``out``, each shard written atomically; returns
    {shard rel path: verified embedding offsets}.

    Every executor calls it: the single process with all missing shards, a torchrun rank with every
    N-th of them, a Dask task with one. A shard's bytes depend only on its rows (batches never cross
    shards), so any split of the shards over processes gives the same files. ``embed.render_workers``
    threads render ahead of the encoder (across shard boundaries) and one thread writes a finished shard
    while the next one encodes. ``on_rows(n)`` is called after each encoded batch (progress).
    """
    out = Path(out)
    meta, cfg = enc.meta, enc.cfg
    workers = resolve_render_workers(cfg.render_workers, enc.device)
    exit_after = int(os.environ.get(EXIT_AFTER_SHARDS_ENV, "0") or 0)

    def render(job: tuple[int, list[dict[str, Any]]]) -> Batch:
        k, rows = job
        x, hws = render_batch(rows, enc.root, meta.img_size)
        return Batch(k, x, hws)

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

    encoder = enc.encoder.to(enc.device).eval()
    try:
        for batch in ordered_map(render, _batch_jobs(work, cfg.batch_size), workers):
            y = encode(encoder, batch.x, enc.device, cfg.bf16)
            if tuple(y.shape[1:]) != meta.shape:
                raise ValueError(f"the encoder outputs {tuple(y.shape[1:])}, base.json says {meta.shape}; fix models/base")
            pending.setdefault(batch.shard, []).append((y, batch.input_hw))
            if on_rows is not None:
                on_rows(len(batch.input_hw))
            item = work[batch.shard]
            if sum(len(h) for _, h in pending[batch.shard]) == item.plan.rows:
                settle()
                in_flight = writer.submit(_write, out, item, pending.pop(batch.shard), meta, cfg.row_group_size)
        settle()
    finally:
        writer.shutdown(wait=True)
    return offsets


def prepare_cache(
    views: pa.Table, out: str | os.PathLike[str], meta: CacheMeta, cfg: EmbedConfig, on_stale: str = "refuse"
) -> tuple[pa.Table, list[ShardPlan], list[ShardWork]]:
    """Sort and check ``views``, plan the shards and validate what ``out`` holds (:func:`check_existing`).

    Returns (sorted views, every shard's plan, the shards still to embed). When some are missing,
    CACHE.json is removed first: the cache is incomplete until :func:`finish_cache` rewrites it.
    Only one process may call this for a cache at a time (it deletes stale shards and temporaries).
    """
    out = Path(out)
    views = sort_views(views)
    _check_view_ids(views)
    _warn_canvas(views, meta.img_size)
    plans = plan_shards(views, cfg.shard_rows)
    done = check_existing(out, plans, meta, on_stale)
    todo = [ShardWork.of(views, p) for p in plans if p.rel() not in done]
    if todo:
        (out / CACHE_FILE).unlink(missing_ok=True)
    log.info("embed: %d shards (%d views) to do, %d reused", len(todo), sum(w.plan.rows for w in todo), len(done))
    return views, plans, todo


def finish_cache(
    out: str | os.PathLike[str], plans: Sequence[ShardPlan], meta: CacheMeta,
    offsets: Mapping[str, list[int | None]] | None = None,
) -> dict[str, Any]:
    """Verify that every planned shard exists and belongs to this cache, then write CACHE.json (last).

    Called once all executors have finished (the single process, torchrun's rank 0 after the barrier,
    the Dask flow after every task). Raises :class:`StaleCacheError` naming a missing or foreign shard.
    """
    out = Path(out)
    for plan in plans:
        path = plan.path(out)
        if not path.is_file():
            raise StaleCacheError(f"{path} is missing although every shard was embedded (a worker lost its "
                                  f"output?); re-run the embed stage: it redoes only the missing shards")
        problem = _shard_problem(read_shard_meta(path), meta, plan)
        if problem:
            raise _refusal(out, f"({plan.rel()}) {problem}")
    for tmp in out.glob("*/*/.part-*.tmp"):  # left by killed workers; no writer runs any more
        tmp.unlink()
    cache = _cache_summary(out, list(plans), meta, offsets or {})
    atomic_write_json(out / CACHE_FILE, cache)
    return cache


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
    """Embed every row of ``views`` into ``out`` in this process (resuming); returns the CACHE.json contents.

    ``on_stale``: what to do with shards made by another base/preprocessing/views (see check_existing).

    ``sam`` is a frozen SAM (only ``sam.image_encoder`` is used); ``info`` its base info
    (variant, checkpoint_sha256, img_size, grid, channels).
    """
    from tqdm import tqdm  # noqa: PLC0415

    out = Path(out)
    meta = CacheMeta.from_info(info)
    _, plans, todo = prepare_cache(views, out, meta, cfg, on_stale)
    enc = ShardEncoder(sam.image_encoder, resolve_device(cfg.device), meta, cfg, Path(root))
    n = sum(w.plan.rows for w in todo)
    log.info("embed: device %s, bf16 %s, %d render threads", enc.device, cfg.bf16,
             resolve_render_workers(cfg.render_workers, enc.device))
    t0 = time.perf_counter()
    with tqdm(total=n, desc="embed", unit="img", disable=not progress) as bar:
        offsets = embed_shards(enc, todo, out, on_rows=bar.update)
    elapsed = time.perf_counter() - t0
    cache = finish_cache(out, plans, meta, offsets)
    log.info("embed: %d views in %.1f s (%.2f img/s)", n, elapsed, n / elapsed if elapsed else float("nan"))
    return cache


def _all_finite(array: np.ndarray) -> bool:
    """No inf/nan in ``array``; for float16 a test of the exponent bits (all ones = inf/nan), ~7x faster."""
    if array.dtype != np.float16:
        return bool(np.isfinite(array).all())
    return not bool(np.any((array.reshape(-1).view(np.uint16) & np.uint16(0x7C00)) == np.uint16(0x7C00)))


def _write(out: Path, item: ShardWork, parts: list, meta: CacheMeta,
           row_group_size: int) -> tuple[str, list[int | None]]:
    """Write one shard atomically; returns (its relative path, its verified embedding offsets)."""
    plan = item.plan
    emb = np.concatenate([y.numpy() for y, _ in parts])  # numpy: a torch op would wake the encoder's threads
    if not _all_finite(emb):
        raise FloatingPointError(f"non-finite embeddings in {plan.rel()} (fp16 overflow?); run with embed.bf16: false")
    hws = [hw for _, h in parts for hw in h]
    names = ("view_id", "sample_id", "dataset", "split", "height", "width", "mask_rle")
    columns = {c: item.rows.column(c).to_pylist() for c in names}
    columns["input_h"] = [h for h, _ in hws]
    columns["input_w"] = [w for _, w in hws]
    extra = {"views_sha256": plan.views_sha256, "dataset": plan.dataset, "split": plan.split,
             "shard": plan.index, "rows": plan.rows}
    with atomic_path(plan.path(out)) as tmp:
        write_shard(tmp, columns, emb, meta, extra, row_group_size)
        _die_in_shard(plan)
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
) -> dict[str, Any] | None:
    """The stage: load the frozen base (``load_base``) and :func:`embed_views` every view. Started by torchrun
    (``RANK``/``WORLD_SIZE`` set), this process is one rank of
    :func:`pipeline.data.embed_shards.run_embed_torchrun` instead (returns None on ranks other than 0)."""
    from pipeline.data.embed_shards import dist_env, run_embed_torchrun  # noqa: PLC0415 - imports this module
    from pipeline.modeling.backbones import load_base  # noqa: PLC0415

    env = dist_env()
    if env is not None:
        return run_embed_torchrun(params, views_path, root, base_dir, out, env, progress=progress, on_stale=on_stale)
    sam, info = load_base(Path(base_dir))
    cache = embed_views(read_views(views_path), root, sam, info, out, params.embed, progress=progress,
                        on_stale=on_stale)
    print(f"wrote {out}: {cache['rows']} embeddings in {len(cache['shards'])} shards "
          f"({cache['variant']}, checkpoint {cache['checkpoint_sha256'][:12]}..., grid {cache['grid']})")
    return cache


__all__ = [
    "Batch", "DIE_IN_SHARD_ENV", "EXIT_AFTER_SHARDS_ENV", "ShardEncoder", "ShardPlan", "ShardWork", "check_existing",
    "embed_shards", "embed_views", "encode", "finish_cache", "ordered_map", "plan_shards", "prepare_cache",
    "render_batch", "resolve_device", "resolve_render_workers", "run_embed", "sort_views", "views_hash",
]
