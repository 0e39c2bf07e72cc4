"""Sharded embedding: one shard function under three executors (single process, torchrun ranks, a Prefect
flow on Dask workers) gives the same cache, byte for byte, also when a worker dies in the middle of a shard."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from pipeline.common.cli import StageError
from pipeline.data.embed import DIE_IN_SHARD_ENV, ShardEncoder, embed_shards, finish_cache, prepare_cache
from pipeline.data.embed_shards import dist_env
from pipeline.data.embedding_format import CACHE_FILE, CacheMeta, IncompleteCacheError, StaleCacheError, read_cache_meta
from pipeline.data.views import build_views
from tests.fakes import free_port, small_index, tiny_sam, views_cfg, write_test_params, write_tiny_base

PROJECT = Path(__file__).resolve().parent.parent
IMG, GRID = 64, 8
EMBED = {"embed.shard_rows": 2, "embed.row_group_size": 1, "embed.batch_size": 2, "embed.device": "cpu",
         "embed.render_workers": 0}


def cache_files(out: Path) -> dict[str, bytes]:
    """Every file of a cache folder (shards, CACHE.json and any leftover) by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Views over generated images (several shards per split), a tiny base, params, and the single-process cache."""
    tmp = tmp_path_factory.mktemp("sharded")
    index = small_index(tmp / "data", n_train=4, n_eval=2)
    table, _ = build_views(index, tmp / "data", views_cfg(occlusion_p=1.0), output_size=IMG, mask_threshold=128,
                           progress=False)
    pq.write_table(table, tmp / "views.parquet")
    write_tiny_base(tmp / "base", img=IMG, grid=GRID, seed=0)
    params = write_test_params(tmp / "params.yaml", **EMBED)
    s = {"root": tmp / "data", "views": tmp / "views.parquet", "base": tmp / "base", "params": params, "tmp": tmp}
    # the reference: the plain stage, one process, one intra-op thread like every rank/worker below
    from stages.embed import main as embed_main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert embed_main(stage_args(s, tmp / "single")) == 0
    finally:
        torch.set_num_threads(threads)
    s["single"] = tmp / "single"
    return s


def stage_args(s: dict[str, Path], out: Path) -> list[str]:
    return ["--params", str(s["params"]), "--views", str(s["views"]), "--root", str(s["root"]), "--base",
            str(s["base"]), "--out", str(out), "--quiet"]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", DIE_IN_SHARD_ENV)}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(PROJECT), **extra}


def torchrun(s: dict[str, Path], out: Path, nproc: int = 2, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "stages.embed", *stage_args(s, out)]
    return subprocess.run(cmd, cwd=PROJECT, env=child_env(**env), capture_output=True, text=True, timeout=180)


def dask_flow(s: dict[str, Path], out: Path, **env: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pipeline.flows.embed_dask", *stage_args(s, out)[:-1], "--workers", "2"]
    extra = {"PREFECT_HOME": str(s["tmp"] / "prefect-home"), **env}
    environ = child_env(**extra)
    environ.pop("PREFECT_API_URL", None)
    return subprocess.run(cmd, cwd=PROJECT, env=environ, capture_output=True, text=True, timeout=300)


def second_rank_shard(single: Path) -> str:
    """A shard torchrun's rank 1 embeds (the second of the planned shards) and a Dask worker gets."""
    return read_cache_meta(single)["shards"][1]["path"]


# --- fast: the shard function and the final check ------------------------------------------------------------------
def test_any_split_of_the_shards_gives_the_same_files(tmp_path: Path, setup: dict[str, Path]) -> None:
    from tests.fakes import load_test_params

    cfg = load_test_params(**EMBED).embed
    info = {"variant": "tiny", "checkpoint_sha256": "ab" * 32, "img_size": IMG, "grid": GRID, "channels": 256}
    meta = CacheMeta.from_info(info)
    enc = ShardEncoder(tiny_sam(IMG, GRID, 0).image_encoder, torch.device("cpu"), meta, cfg, setup["root"])
    views = pq.read_table(setup["views"])
    whole, split = tmp_path / "whole", tmp_path / "split"
    _, plans, todo = prepare_cache(views, whole, meta, cfg)
    finish_cache(whole, plans, meta, embed_shards(enc, todo, whole))
    _, plans, todo = prepare_cache(views, split, meta, cfg)
    assert len(todo) >= 4
    offsets = {}
    for part in (todo[1::3], todo[0::3], todo[2::3]):  # three "workers", out of order
        offsets.update(embed_shards(enc, part, split))
    finish_cache(split, plans, meta, offsets)
    assert cache_files(split) == cache_files(whole)
    # finish_cache refuses an incomplete cache, naming the missing shard
    missing = plans[2].path(split)
    missing.unlink()
    (split / CACHE_FILE).unlink()
    with pytest.raises(StaleCacheError, match=f"{missing}.*missing.*redoes only the missing shards"):
        finish_cache(split, plans, meta, offsets)
    with pytest.raises(IncompleteCacheError):
        read_cache_meta(split)


def test_dist_env_reads_torchrun_variables() -> None:
    assert dist_env({}) is None
    env = dist_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert env is not None and (env.rank, env.world_size, env.local_rank) == (1, 2, 1)
    with pytest.raises(StageError, match="outside WORLD_SIZE"):
        dist_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(StageError, match="must be integers"):
        dist_env({"RANK": "x", "WORLD_SIZE": "2"})


# --- slow: real torchrun and a real Dask cluster -------------------------------------------------------------------
@pytest.mark.slow
def test_torchrun_two_ranks_write_the_single_process_cache(tmp_path: Path, setup: dict[str, Path]) -> None:
    out = tmp_path / "ranks"
    proc = torchrun(setup, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "by 2 ranks" in proc.stdout
    assert cache_files(out) == cache_files(setup["single"])


@pytest.mark.slow
def test_torchrun_rank_killed_mid_shard_then_rerun(tmp_path: Path, setup: dict[str, Path]) -> None:
    out, marker = tmp_path / "ranks", tmp_path / "died"
    victim = second_rank_shard(setup["single"])
    proc = torchrun(setup, out, **{DIE_IN_SHARD_ENV: f"{victim}@{marker}"})
    assert proc.returncode != 0 and marker.exists(), proc.stderr[-3000:]
    assert not (out / victim).exists() and not (out / CACHE_FILE).exists()  # no partial shard, no cache
    single = cache_files(setup["single"])
    finished = {rel: data for rel, data in cache_files(out).items() if "/." not in rel}  # not temporaries
    assert all(single[rel] == data for rel, data in finished.items())  # what is under a shard's name is complete
    proc = torchrun(setup, out, **{DIE_IN_SHARD_ENV: f"{victim}@{marker}"})  # the hook fires only once
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert cache_files(out) == cache_files(setup["single"])  # and no temporaries are left


@pytest.mark.slow
def test_dask_flow_with_a_worker_killed_mid_shard(tmp_path: Path, setup: dict[str, Path]) -> None:
    out, marker = tmp_path / "dask", tmp_path / "died"
    victim = second_rank_shard(setup["single"])
    proc = dask_flow(setup, out, **{DIE_IN_SHARD_ENV: f"{victim}@{marker}"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert marker.exists()  # a worker really died writing that shard; Dask ran the shard again
    assert "exited with status 23" in proc.stdout + proc.stderr
    assert cache_files(out) == cache_files(setup["single"])
