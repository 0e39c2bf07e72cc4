"""The ``embed`` stage over several processes: torchrun ranks (here) or Dask workers (:mod:`pipeline.flows.embed_dask`).

Every executor runs the same shard function, :func:`pipeline.data.embed.embed_shards`, on a share of the
shards that :func:`pipeline.data.embed.prepare_cache` left to do, and one process writes ``CACHE.json``
with :func:`pipeline.data.embed.finish_cache` once every shard exists. A shard's bytes depend only on
its rows, so the cache is the one the single process writes, file for file and byte for byte (on CPU,
when every process uses the same number of intra-op threads: float sums must be ordered alike).

torchrun (``python -m stages.embed`` notices ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``)::

    torchrun --nproc_per_node=2 -m stages.embed --params params.yaml --views data/views/views.parquet \\
        --root data/hqseg44k --base models/base --out data/embeddings

Rank 0 validates the existing cache (stale shards, temporaries of killed runs) and sends the list of
finished shards to every rank; rank ``r`` embeds the missing shards ``r, r+N, r+2N, ...``; after a
barrier (``all_gather_object`` of the shards' offsets) rank 0 verifies every shard and writes
``CACHE.json``. Backend: gloo on CPU; nccl with ``cuda:LOCAL_RANK`` on GPUs. A rank that dies makes
torchrun stop the others; re-running (or ``torchrun --max-restarts=1``) redoes only the missing shards.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Mapping

import torch

from pipeline.common.cli import StageError
from pipeline.config import EmbedConfig, Params
from pipeline.data.embed import (
    ShardEncoder,
    ShardWork,
    embed_shards,
    finish_cache,
    plan_shards,
    prepare_cache,
    resolve_device,
    sort_views,
)
from pipeline.data.embedding_format import CacheMeta, StaleCacheError
from pipeline.data.views import read_views

log = logging.getLogger(__name__)

# Cache-wide collectives wait this long for the slowest rank (a rank embeds its shards between two of them).
COLLECTIVE_TIMEOUT = timedelta(hours=12)


@dataclass(frozen=True)
class DistEnv:
    """The process's place in a torchrun job (from the ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` variables)."""

    rank: int
    world_size: int
    local_rank: int


def dist_env(environ: Mapping[str, str] | None = None) -> DistEnv | None:
    """The torchrun environment of this process, or None when it was not started by torchrun."""
    env = os.environ if environ is None else environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    try:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", env["RANK"]))
    except ValueError:
        raise StageError(f"RANK/WORLD_SIZE/LOCAL_RANK must be integers, got {env.get('RANK')!r}/"
                         f"{env.get('WORLD_SIZE')!r}/{env.get('LOCAL_RANK')!r}; start the stage with torchrun") from None
    if not 0 <= rank < world:
        raise StageError(f"RANK={rank} is outside WORLD_SIZE={world}; start the stage with torchrun")
    return DistEnv(rank, world, local)


def process_device(name: str, index: int) -> torch.device:
    """``embed.device`` for one of several processes: ``cuda:index`` (modulo the visible GPUs) when CUDA is
    used, else the CPU. A process that sees a single GPU (``CUDA_VISIBLE_DEVICES`` set per process) uses it."""
    device = resolve_device(name)
    if device.type != "cuda":
        return device
    return torch.device("cuda", index % torch.cuda.device_count())


def read_base_info(base_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """``base.json`` of the base folder (what the cache metadata is made of), without loading the weights."""
    path = Path(base_dir) / "base.json"
    if not path.is_file():
        raise StageError(f"{path}: no base model here (run `dvc repro base`)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise StageError(f"{path}: not a base description ({exc}); re-run `dvc repro base`") from None


_LOADED: dict[tuple[str, str], tuple[torch.nn.Module, dict[str, Any]]] = {}
_LOAD_LOCK = threading.Lock()


def load_shard_encoder(
    base_dir: str | os.PathLike[str], root: str | os.PathLike[str], cfg: EmbedConfig, device: torch.device,
    expect: CacheMeta | None = None,
) -> ShardEncoder:
    """The frozen base's image encoder on ``device``, loaded once per process (Dask workers run many tasks).

    ``expect``: the metadata the coordinating process planned with; a base that changed since is refused.
    """
    from pipeline.modeling.backbones import load_base  # noqa: PLC0415

    key = (str(Path(base_dir).resolve()), json.dumps(read_base_info(base_dir), sort_keys=True))
    with _LOAD_LOCK:
        if key not in _LOADED:
            _LOADED.clear()  # one base per process
            _LOADED[key] = load_base(Path(base_dir))
        sam, info = _LOADED[key]
    meta = CacheMeta.from_info(info)
    if expect is not None and meta != expect:
        raise StaleCacheError(f"{base_dir} changed while the cache was being embedded "
                              f"({'; '.join(expect.differences(meta))}); re-run the embed stage")
    return ShardEncoder(sam.image_encoder, device, meta, cfg, Path(root))


def run_embed_torchrun(
    params: Params,
    views_path: str | os.PathLike[str],
    root: str | os.PathLike[str],
    base_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    env: DistEnv,
    *,
    progress: bool = True,
    on_stale: str = "refuse",
) -> dict[str, Any] | None:
    """One torchrun rank of the embed stage; returns the CACHE.json contents on rank 0, None elsewhere."""
    import torch.distributed as dist  # noqa: PLC0415
    from tqdm import tqdm  # noqa: PLC0415

    cfg = params.embed
    out = Path(out)
    device = process_device(cfg.device, env.local_rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=COLLECTIVE_TIMEOUT,
                            device_id=device if device.type == "cuda" else None)
    try:
        enc = load_shard_encoder(base_dir, root, cfg, device)
        views = read_views(views_path)
        verdict: list[Any] = [None]
        if env.rank == 0:
            try:
                _, plans, todo = prepare_cache(views, out, enc.meta, cfg, on_stale)
                verdict = [("ok", [w.plan.rel() for w in todo])]
            except Exception as exc:  # every rank must hear of it, or the others wait in the broadcast
                verdict = [("error", str(exc))]
                dist.broadcast_object_list(verdict, src=0)
                raise
        dist.broadcast_object_list(verdict, src=0)
        status, payload = verdict[0]
        if status == "error":
            raise StageError(f"rank 0 could not prepare {out}: {payload}")
        if env.rank != 0:  # the same plan, without touching the files rank 0 has just checked
            views = sort_views(views)
            plans = plan_shards(views, cfg.shard_rows)
            by_rel = {p.rel(): p for p in plans}
            todo = [ShardWork.of(views, by_rel[rel]) for rel in payload]
        mine = todo[env.rank::env.world_size]
        n = sum(w.plan.rows for w in mine)
        log.info("embed rank %d/%d on %s: %d of %d missing shards (%d views)", env.rank, env.world_size, device,
                 len(mine), len(todo), n)
        t0 = time.perf_counter()
        with tqdm(total=n, desc=f"embed rank {env.rank}", unit="img", disable=not progress or env.rank != 0) as bar:
            offsets = embed_shards(enc, mine, out, on_rows=bar.update)
        log.info("embed rank %d: %d views in %.1f s", env.rank, n, time.perf_counter() - t0)
        gathered: list[Any] = [None] * env.world_size
        dist.all_gather_object(gathered, offsets)  # also the barrier: every rank's shards are renamed into place
        if env.rank != 0:
            return None
        merged = {rel: offs for part in gathered for rel, offs in part.items()}
        cache = finish_cache(out, plans, enc.meta, merged)
        print(f"wrote {out}: {cache['rows']} embeddings in {len(cache['shards'])} shards by {env.world_size} ranks "
              f"({cache['variant']}, checkpoint {cache['checkpoint_sha256'][:12]}..., grid {cache['grid']})")
        return cache
    finally:
        dist.destroy_process_group()


__all__ = ["DistEnv", "dist_env", "load_shard_encoder", "process_device", "read_base_info", "run_embed_torchrun"]
