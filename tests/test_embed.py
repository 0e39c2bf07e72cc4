"""Embed stage: shard format, fidelity to the encoder, kill-and-resume byte identity, stale-cache refusal."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.data.embed import EXIT_AFTER_SHARDS_ENV, embed_views
from pipeline.data.embedding_format import (
    CACHE_FILE,
    META_KEY,
    CacheMeta,
    IncompleteCacheError,
    StaleCacheError,
    read_cache_meta,
    write_shard,
)
from pipeline.data.embedding_reader import iter_views
from pipeline.data.views import build_views, render_view
from pipeline.modeling.transforms import preprocess
from tests import fakes
from tests.fakes import load_test_params, small_index, views_cfg, write_test_params, write_tiny_base

PROJECT = Path(__file__).resolve().parent.parent
IMG, GRID = 64, 8
INFO = {"variant": "tiny", "checkpoint_sha256": "ab" * 32, "img_size": IMG, "grid": GRID, "channels": 256}


def tiny_sam(seed: int = 0) -> torch.nn.Module:
    """A small SAM-architecture model (random init, fixed seed): 64² input, 8x8x256 embeddings."""
    return fakes.tiny_sam(IMG, GRID, seed)


def embed_cfg(**changes):
    """The test profile's embed section, with small shards and row groups (several per split)."""
    base = load_test_params().embed
    return replace(base, **{"shard_rows": 4, "row_group_size": 2, "batch_size": 3, "device": "cpu", **changes})


def make_views(root: Path, n_train: int = 4, n_eval: int = 2) -> pa.Table:
    """A small views table (originals, jitter and occluded views) over generated images under ``root``."""
    index = small_index(root, n_train=n_train, n_eval=n_eval)
    table, _ = build_views(index, root, views_cfg(occlusion_p=1.0), output_size=IMG, mask_threshold=128, progress=False)
    return table


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.glob("*/*/part-*.parquet"))}


def test_embed_writes_the_contracted_shards(tmp_path: Path) -> None:
    views = make_views(tmp_path)
    sam = tiny_sam()
    out = tmp_path / "emb"
    cache = embed_views(views, tmp_path, sam, INFO, out, embed_cfg(), progress=False)
    assert read_cache_meta(out) == cache
    assert cache["rows"] == views.num_rows == sum(s["rows"] for s in cache["shards"])
    assert cache["checkpoint_sha256"] == INFO["checkpoint_sha256"] and cache["preprocessing"] == "sam-resize-longest-pil-pad"
    assert all(isinstance(o, int) for s in cache["shards"] for o in s["embedding_offsets"])  # zero-copy reads possible
    for s in cache["shards"]:
        path = out / s["path"]
        assert path.parent.relative_to(out).as_posix() == f"{s['dataset']}/{s['split']}"
        pf = pq.ParquetFile(path)
        assert pf.schema_arrow.field("embedding").type == pa.binary(256 * GRID * GRID * 2)
        assert all(pf.metadata.row_group(i).num_rows <= 2 for i in range(pf.metadata.num_row_groups))
        assert pf.metadata.row_group(0).column(9).compression == "UNCOMPRESSED"
        meta = json.loads(pf.schema_arrow.metadata[META_KEY])
        assert meta["views_sha256"] == s["views_sha256"] and meta["format_version"] == 1 and meta["dtype"] == "float16"
        assert s["rows"] <= 4
    by_id = {r["view_id"]: r for r in views.to_pylist()}
    rows = list(iter_views(out, "train")) + list(iter_views(out, "eval"))
    assert sorted(r["view_id"] for r in rows) == sorted(by_id)
    with torch.inference_mode():
        for r in rows[:5] + rows[-3:]:
            image, mask = render_view(by_id[r["view_id"]], None, tmp_path)
            x, (h, w) = preprocess(image, IMG)
            ref = sam.image_encoder(x[None])[0]
            assert (r["input_h"], r["input_w"]) == (h, w)
            assert r["embedding"].dtype == torch.float32 and r["embedding"].shape == (256, GRID, GRID)
            torch.testing.assert_close(r["embedding"], ref.half().float(), rtol=2e-3, atol=2e-3)  # batching changes kernels
            assert r["mask_rle"] == by_id[r["view_id"]]["mask_rle"]


def test_bf16_autocast_is_close_to_fp32(tmp_path: Path) -> None:
    views = make_views(tmp_path, n_train=1, n_eval=1)
    sam = tiny_sam()
    embed_views(views, tmp_path, sam, INFO, tmp_path / "fp32", embed_cfg(), progress=False)
    embed_views(views, tmp_path, sam, INFO, tmp_path / "bf16", embed_cfg(bf16=True), progress=False)
    a = torch.stack([r["embedding"] for r in iter_views(tmp_path / "fp32", "train")])
    b = torch.stack([r["embedding"] for r in iter_views(tmp_path / "bf16", "train")])
    assert not torch.equal(a, b)  # autocast really ran in bf16
    cos = torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1))
    assert cos.min() > 0.99


_KILL_SCRIPT = """
import json, sys, pyarrow.parquet as pq
from pipeline.config import EmbedConfig
from pipeline.data.embed import embed_views
from tests.fakes import tiny_sam
root, out, img, grid, info, cfg = sys.argv[1:7]
embed_views(pq.read_table(root + "/views.parquet"), root, tiny_sam(int(img), int(grid)), json.loads(info), out,
            EmbedConfig(**json.loads(cfg)), progress=False)
"""


def test_killed_run_resumes_to_byte_identical_shards(tmp_path: Path) -> None:
    views = make_views(tmp_path)
    pq.write_table(views, tmp_path / "views.parquet")
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    embed_views(views, tmp_path, tiny_sam(), INFO, whole, embed_cfg(), progress=False)
    # same intra-op thread count as this process: float sums must be ordered alike to be byte-identical
    env = {**os.environ, EXIT_AFTER_SHARDS_ENV: "2", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    argv = [str(tmp_path), str(parted), str(IMG), str(GRID), json.dumps(INFO), json.dumps(dataclasses.asdict(embed_cfg()))]
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, *argv], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr[-2000:]
    assert len(shard_bytes(parted)) == 2 and not (parted / CACHE_FILE).exists()
    with pytest.raises(IncompleteCacheError):
        read_cache_meta(parted)
    (parted / "TR0" / "train" / ".part-00009.parquet.x.tmp").write_bytes(b"half a shard")  # a killed writer's leftover
    embed_views(views, tmp_path, tiny_sam(), INFO, parted, embed_cfg(), progress=False)
    assert shard_bytes(parted) == shard_bytes(whole)
    assert not list(parted.glob("*/*/.*.tmp"))
    assert read_cache_meta(parted) == read_cache_meta(whole)


def test_stale_caches_are_refused(tmp_path: Path) -> None:
    views = make_views(tmp_path, n_train=2, n_eval=1)
    out = tmp_path / "emb"
    sam = tiny_sam()
    embed_views(views, tmp_path, sam, INFO, out, embed_cfg(), progress=False)
    before = shard_bytes(out)
    # a complete, matching cache is reused as is
    embed_views(views, tmp_path, sam, INFO, out, embed_cfg(), progress=False)
    assert shard_bytes(out) == before
    # another checkpoint
    other = {**INFO, "checkpoint_sha256": "cd" * 32}
    with pytest.raises(StaleCacheError, match=r"made by checkpoint abababababab\.\.\., the base is cdcdcdcdcdcd.*delete"):
        embed_views(views, tmp_path, sam, other, out, embed_cfg(), progress=False)
    # other views (one view dropped)
    fewer = views.slice(1)
    with pytest.raises(StaleCacheError, match="different views"):
        embed_views(fewer, tmp_path, sam, INFO, out, embed_cfg(), progress=False)
    assert shard_bytes(out) == before  # refusals never touch the cache
    # a shard (of a killed run, no CACHE.json yet) made with another preprocessing
    (out / CACHE_FILE).unlink()
    first = sorted(out.glob("*/*/part-*.parquet"))[0]
    table = pq.read_table(first)
    meta = json.loads(table.schema.metadata[META_KEY])
    foreign = CacheMeta(**{**CacheMeta.from_dict(meta).as_dict(), "preprocessing": "squash"})
    emb = np.frombuffer(table.column("embedding").combine_chunks().buffers()[1], np.float16)
    cols = {c: table.column(c).to_pylist() for c in table.column_names if c != "embedding"}
    write_shard(first, cols, emb.reshape(table.num_rows, 256, GRID, GRID).copy(), foreign,
                {k: meta[k] for k in ("views_sha256", "dataset", "split", "shard", "rows")}, 2)
    with pytest.raises(StaleCacheError, match="preprocessing='squash'"):
        embed_views(views, tmp_path, sam, INFO, out, embed_cfg(), progress=False)


def test_stage_clis_views_then_embed_and_refuse_another_base(tmp_path: Path, capsys) -> None:
    from stages.embed import main as embed_main
    from stages.views import main as views_main

    root = tmp_path / "data"
    pq.write_table(small_index(root, n_train=2, n_eval=1), tmp_path / "index.parquet")
    params = write_test_params(tmp_path / "params.yaml", **{"views.output_size": IMG, "embed.shard_rows": 4})
    rc = views_main(["--params", str(params), "--index", str(tmp_path / "index.parquet"), "--root", str(root),
                     "--out", str(tmp_path / "views"), "--workers", "1", "--quiet"])
    assert rc == 0 and (tmp_path / "views" / "views.parquet").is_file()

    def base(seed: int) -> Path:
        folder = tmp_path / f"base{seed}"
        write_tiny_base(folder, img=IMG, grid=GRID, seed=seed)
        return folder

    args = ["--params", str(params), "--views", str(tmp_path / "views" / "views.parquet"), "--root", str(root),
            "--out", str(tmp_path / "emb"), "--quiet"]
    assert embed_main(args + ["--base", str(base(0))]) == 0
    assert read_cache_meta(tmp_path / "emb")["rows"] == pq.read_table(tmp_path / "views" / "views.parquet").num_rows
    capsys.readouterr()
    assert embed_main(args + ["--base", str(base(1))]) == 2
    err = capsys.readouterr().err
    assert "were made by checkpoint" in err and f"delete {tmp_path / 'emb'}" in err


def test_rebuild_mode_discards_stale_shards_never_mixes(tmp_path: Path) -> None:
    """What `dvc repro` does after the checkpoint changed: stale shards are deleted and re-embedded."""
    views = make_views(tmp_path, n_train=2, n_eval=1)
    out = tmp_path / "emb"
    sam = tiny_sam()
    embed_views(views, tmp_path, sam, INFO, out, embed_cfg(), progress=False)
    other = {**INFO, "checkpoint_sha256": "cd" * 32}
    cache = embed_views(views, tmp_path, sam, other, out, embed_cfg(), progress=False, on_stale="rebuild")
    assert cache["checkpoint_sha256"] == "cd" * 32
    for shard in out.glob("*/*/part-*.parquet"):
        meta = json.loads(pq.read_schema(shard).metadata[META_KEY])
        assert meta["checkpoint_sha256"] == "cd" * 32
    # and the rebuilt cache equals a fresh one made with that checkpoint
    fresh = tmp_path / "fresh"
    embed_views(views, tmp_path, sam, other, fresh, embed_cfg(), progress=False)
    assert shard_bytes(out) == shard_bytes(fresh)
