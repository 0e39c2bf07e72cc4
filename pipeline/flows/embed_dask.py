"""The ``embed`` stage on a Dask cluster: a Prefect flow mapping the shard function over Dask workers.

The flow (driver) validates the cache and plans the missing shards (:func:`pipeline.data.embed.prepare_cache`);
each missing shard becomes one Prefect task run on a Dask worker (prefect-dask's ``DaskTaskRunner``),
which calls the same :func:`pipeline.data.embed.embed_shards` as the single-process stage; once every
task has finished, the driver verifies every shard and writes ``CACHE.json``
(:func:`pipeline.data.embed.finish_cache`). The cache equals the single process's, byte for byte.

Faults: a task that raises is retried by Prefect (``--retries``); a worker that dies (killed, out of
memory) is restarted by its nanny and Dask runs its shard again elsewhere (``distributed.scheduler.
allowed-failures`` times). Shards are renamed into place only when complete, so a dead worker leaves
at most a temporary file, which the shard's next write (or the final check) removes.

Cluster: by default a ``LocalCluster`` of ``--workers`` processes with one thread each (one worker per
GPU when CUDA is present: each takes ``cuda:<worker name>``); ``--address tcp://host:8786`` uses a
running scheduler whose workers see the same ``--root``, ``--base`` and ``--out`` paths (a shared file
system) and the same Prefect API (``PREFECT_API_URL``); start them with one thread each, one per GPU
(``CUDA_VISIBLE_DEVICES`` set per worker) and without Dask's ``MALLOC_TRIM_THRESHOLD_`` (it slows the
encoder ~2.3x: ``DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON__MALLOC_TRIM_THRESHOLD_=None dask worker
tcp://scheduler:8786 --nthreads 1``). Without ``PREFECT_API_URL`` the flow starts a temporary
Prefect server and hands its address to the local workers.

    python -m pipeline.flows.embed_dask --params params.yaml --views data/views/views.parquet \\
        --root data/hqseg44k --base models/base --out data/embeddings --workers 2
    python -m pipeline.flows.embed_dask ... --address tcp://scheduler:8786
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import pipeline  # noqa: F401  (Prefect home, analytics off, startup timeout: before prefect)
from prefect import flow, get_run_logger, task, unmapped
from prefect.cache_policies import NO_CACHE

from pipeline.common.cli import run_stage
from pipeline.config import EmbedConfig, load_params
from pipeline.data.embed import ShardWork, embed_shards, finish_cache, prepare_cache
from pipeline.data.embed_shards import load_shard_encoder, process_device, read_base_info
from pipeline.data.embedding_format import CacheMeta
from pipeline.data.views import read_views

DEFAULT_RETRIES = 2


def _worker_index() -> int:
    """This Dask worker's number (a LocalCluster names its workers 0, 1, ...), 0 elsewhere."""
    try:
        from distributed import get_worker  # noqa: PLC0415

        name = get_worker().name
    except (ImportError, ValueError):
        return 0
    return int(name) if isinstance(name, int) or str(name).isdigit() else 0


@task(name="embed-shard", cache_policy=NO_CACHE, task_run_name="{rel}", retries=DEFAULT_RETRIES,
      retry_delay_seconds=1)
def embed_shard_task(rel: str, work: ShardWork, base: str, root: str, out: str, cfg: EmbedConfig,
                     meta: CacheMeta) -> list[Optional[int]]:
    """Embed one shard on this worker (its base encoder is loaded once per worker); returns its offsets."""
    device = process_device(cfg.device, _worker_index())
    enc = load_shard_encoder(base, root, cfg, device, expect=meta)
    t0 = time.perf_counter()
    offsets = embed_shards(enc, [work], out)[rel]
    get_run_logger().info("%s: %d views on %s in %.1f s (pid %d)", rel, work.plan.rows, device,
                          time.perf_counter() - t0, os.getpid())
    return offsets


@flow(name="embed-dask")
def embed_dask_flow(params: str, views: str, root: str, base: str, out: str, on_stale: str = "refuse",
                    retries: int = DEFAULT_RETRIES) -> dict:
    """The embed stage over the flow's Dask task runner; returns the CACHE.json contents."""
    logger = get_run_logger()
    cfg = load_params(params).embed
    meta = CacheMeta.from_info(read_base_info(base))
    _, plans, todo = prepare_cache(read_views(views), out, meta, cfg, on_stale)
    logger.info("embed: %d of %d shards to embed on the Dask cluster", len(todo), len(plans))
    futures = embed_shard_task.with_options(retries=retries).map([w.plan.rel() for w in todo], todo, unmapped(base), unmapped(root),
                                   unmapped(out), unmapped(cfg), unmapped(meta))
    offsets = {w.plan.rel(): f.result() for w, f in zip(todo, futures)}
    cache = finish_cache(out, plans, meta, offsets)
    logger.info("wrote %s: %d embeddings in %d shards", out, cache["rows"], len(cache["shards"]))
    return cache


def task_runner(address: str | None, workers: int | None) -> Any:
    """prefect-dask's runner: the scheduler at ``address``, or a LocalCluster of ``workers`` one-thread
    processes (default: one per GPU, else 2)."""
    from prefect_dask import DaskTaskRunner  # noqa: PLC0415

    if address:
        return DaskTaskRunner(address=address)
    import torch  # noqa: PLC0415

    gpus = torch.cuda.device_count()
    n = workers or gpus or 2
    return DaskTaskRunner(cluster_kwargs={"n_workers": n, "threads_per_worker": 1, "processes": True,
                                          "dashboard_address": None})


@contextlib.contextmanager
def shared_prefect_api() -> Iterator[str]:
    """Make sure Dask worker processes report to the flow's Prefect API: export ``PREFECT_API_URL``, starting
    a temporary server (stopped on exit) when none is configured; a worker without it would start its own."""
    from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: PLC0415

    url = PREFECT_API_URL.value()
    if url:
        old = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            if old is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = old
        return
    from prefect.server.api.server import SubprocessASGIServer  # noqa: PLC0415

    server = SubprocessASGIServer()
    server.start()
    os.environ["PREFECT_API_URL"] = server.api_url
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            try:
                yield server.api_url
            finally:
                _drain_prefect_queues()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _drain_prefect_queues(timeout_s: float = 10.0) -> None:
    """Send the queued logs and events before the temporary server stops (else they are retried for minutes)."""
    from prefect.events.worker import EventsWorker  # noqa: PLC0415
    from prefect.logging.handlers import APILogWorker  # noqa: PLC0415

    APILogWorker.drain_all(timeout=timeout_s)
    EventsWorker.drain_all(timeout=timeout_s)


def run_embed_dask(params: Path, views: Path, root: Path, base: Path, out: Path, *, address: str | None = None,
                   workers: int | None = None, on_stale: str = "refuse", retries: int = DEFAULT_RETRIES) -> dict:
    """Run :func:`embed_dask_flow` on a Dask cluster (see the module docstring); returns CACHE.json's contents."""
    import dask  # noqa: PLC0415

    runner = task_runner(address, workers)
    # A LocalCluster's nanny would start workers with MALLOC_TRIM_THRESHOLD_=65536, which turns off glibc's
    # dynamic mmap threshold: every large activation tensor is then mmapped and faulted in afresh, and the
    # encoder runs ~2.3x slower (measured). Leave glibc's default unless the user set the variable.
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), shared_prefect_api():
        return embed_dask_flow.with_options(task_runner=runner)(str(params), str(views), str(root), str(base),
                                                                str(out), on_stale, retries)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.flows.embed_dask", description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default params.yaml)")
    parser.add_argument("--views", type=Path, required=True, help="views.parquet (views stage output)")
    parser.add_argument("--root", type=Path, required=True, help="HQSeg-44K dataset root")
    parser.add_argument("--base", type=Path, required=True, help="frozen base model folder (base stage output)")
    parser.add_argument("--out", type=Path, required=True, help="embedding cache folder")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--address", help="Dask scheduler address (tcp://host:8786); default: a LocalCluster")
    where.add_argument("--workers", type=int, help="LocalCluster worker processes (default: one per GPU, else 2)")
    parser.add_argument("--retries", type=int, default=DEFAULT_RETRIES, help="Prefect retries of a failed shard task")
    parser.add_argument("--on-stale", choices=("refuse", "rebuild"), default="refuse",
                        help="shards made by another checkpoint/preprocessing/views: refuse (default) or rebuild")
    args = parser.parse_args(argv)
    if args.workers is not None and args.workers < 1:
        parser.error("--workers must be at least 1")

    def work() -> None:
        cache = run_embed_dask(args.params, args.views, args.root, args.base, args.out, address=args.address,
                               workers=args.workers, on_stale=args.on_stale, retries=args.retries)
        print(f"wrote {args.out}: {cache['rows']} embeddings in {len(cache['shards'])} shards")

    return run_stage("embed-dask", work)


if __name__ == "__main__":
    sys.exit(main())
