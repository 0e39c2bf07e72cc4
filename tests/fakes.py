"""Plain helpers shared by the tests (pytest fixtures live in tests/conftest.py).

- the test profile: :data:`TEST_PARAMS_PATH` (tests/params_test.yaml), :func:`load_test_params`,
  :func:`write_test_params`; the tests never read the live params.yaml for values;
- tiny models: :func:`tiny_sam` (a small SAM-architecture model), :func:`make_sam` (SAM's real C=256
  prompt encoder + decoder behind a dummy image encoder), :func:`write_tiny_base` (a base folder as the
  ``base`` stage writes it), :func:`write_trained_plugin`;
- data: :func:`png_bytes` / :func:`image_bytes` / :func:`rect_mask` / :func:`put_file` (files of a dataset tree),
  :func:`make_dataset` / :func:`small_index` (images + masks + an index table), fake embedding caches
  written through the cache module's own shard writer (:func:`write_cache`, :func:`write_fake_cache`,
  :func:`write_synthetic_cache`);
- :func:`free_port`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import yaml
from PIL import Image
from torch import nn

from pipeline.common.atomic import atomic_path, atomic_write_json
from pipeline.common.hashing import sha256_file
from pipeline.config import Params, PluginConfig, ViewsConfig, load_params, replace
from pipeline.data import rle
from pipeline.data.embedding_format import (
    CACHE_FILE,
    SCALAR_COLUMNS,
    CacheMeta,
    cache_summary,
    locate_embeddings,
    shard_path,
    write_shard,
)
from pipeline.data.index import INDEX_SCHEMA, METADATA_KEY, mask_box
from pipeline.modeling.backbones import build_tiny, freeze
from pipeline.modeling.methods import PromptableDecoder, build_method
from pipeline.modeling.plugin_file import save_plugin_file
from pipeline.modeling.transforms import input_size

if TYPE_CHECKING:
    from segment_anything.modeling import Sam

TESTS_DIR = Path(__file__).resolve().parent
TEST_PARAMS_PATH = TESTS_DIR / "params_test.yaml"
C = 256  # SAM's embedding channels


# ---------------------------------------------------------------------------------------------- params
def load_test_params(**dotted: Any) -> Params:
    """The test profile (tests/params_test.yaml) with dotted keys changed: ``load_test_params(**{"train.lr": 1.0})``."""
    params = load_params(TEST_PARAMS_PATH)
    return replace(params, **dotted) if dotted else params


def write_test_params(path: Path, params: Params | None = None, **dotted: Any) -> Path:
    """Write ``params`` (default: the test profile) with dotted keys changed as a params file a stage CLI reads."""
    base = params if params is not None else load_test_params()
    params = replace(base, **dotted) if dotted else base
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(params.to_dict(), sort_keys=False), encoding="utf-8")
    return path


def views_cfg(**changes: Any) -> ViewsConfig:
    """The test profile's ``views`` section with ``changes`` applied (not validated: tests may go out of range)."""
    return dataclasses.replace(load_test_params().views, **changes)


# ---------------------------------------------------------------------------------------------- models
def tiny_sam(img: int = 64, grid: int = 8, seed: int = 0) -> nn.Module:
    """A small SAM-architecture model (random init, fixed seed): ``img``² input, ``grid``x``grid``x256 embeddings."""
    torch.manual_seed(seed)
    return build_tiny(img, grid).eval()


def write_tiny_base(folder: Path, *, img: int = 64, grid: int = 16, seed: int = 0) -> tuple[nn.Module, str]:
    """A random tiny SAM saved as the ``base`` stage writes it (``sam.pt`` + ``base.json``); returns (sam, sha256)."""
    sam = freeze(tiny_sam(img, grid, seed))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(sam.state_dict(), folder / "sam.pt")
    sha = sha256_file(folder / "sam.pt")
    (folder / "base.json").write_text(json.dumps({"variant": "tiny", "checkpoint_sha256": sha, "img_size": img,
                                                  "grid": grid, "channels": C}))
    return sam, sha


class DummyEncoder(nn.Module):
    """Stands in for the image encoder: only ``img_size`` is used downstream."""

    def __init__(self, img_size: int) -> None:
        super().__init__()
        self.img_size = img_size


def make_sam(grid: int = 8, seed: int = 0) -> Sam:
    """SAM's standard C=256 prompt encoder + decoder over a ``grid``x``grid`` embedding, random init."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(seed)
    img = 16 * grid
    sam = Sam(
        image_encoder=DummyEncoder(img),  # type: ignore[arg-type]
        prompt_encoder=PromptEncoder(embed_dim=C, image_embedding_size=(grid, grid),
                                     input_image_size=(img, img), mask_in_chans=16),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=C, mlp_dim=2048, num_heads=8),
            transformer_dim=C, iou_head_depth=3, iou_head_hidden_dim=256,
        ),
    )
    return sam.eval()


def write_trained_plugin(path: Path, method: str, sam: nn.Module, plugin_cfg: PluginConfig, base_sha256: str, *,
                         scale: float = 0.1, seed: int = 1, params_dict: dict | None = None) -> PromptableDecoder:
    """A plugin file whose weights moved away from the (identity) init, as training leaves them; returns the model."""
    model = build_method(method, sam, plugin_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    config = dict(params_dict or {})
    config.setdefault("plugin", {k: getattr(plugin_cfg, k) for k in plugin_cfg.__dataclass_fields__})
    save_plugin_file(Path(path), method=method, state_dict=model.plugin_state_dict(), config=config,
                     base_sha256=base_sha256)
    return model.eval()


# ---------------------------------------------------------------------------------------------- images + index
def png_bytes(arr: np.ndarray) -> bytes:
    """PNG bytes; PIL picks the mode from the array (uint8 HxW: L, HxWx4: RGBA, uint16: I;16)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def image_bytes(mode: str = "RGB", fmt: str = "JPEG", w: int = 40, h: int = 32, seed: int = 0) -> bytes:
    """A random-noise ``w``x``h`` image encoded as ``fmt`` after conversion to PIL ``mode``."""
    rgb = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def rect_mask(w: int = 40, h: int = 32) -> np.ndarray:
    """A uint8 0/255 mask with rows 5..14, cols 10..29 set: area 200, box [10, 5, 29, 14]."""
    m = np.zeros((h, w), np.uint8)
    m[5:15, 10:30] = 255
    return m


def put_file(root: Path, rel_dir: str, name: str, data: bytes) -> None:
    """Write ``data`` to ``root/rel_dir/name`` (folders created)."""
    (root / rel_dir).mkdir(parents=True, exist_ok=True)
    (root / rel_dir / name).write_bytes(data)


def blob(h: int, w: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """A filled ellipse (bool ``h``x``w``) centred at (cy, cx) with radii (ry, rx)."""
    yy, xx = np.mgrid[:h, :w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


def make_dataset(root: Path, masks: Mapping[str, tuple[str, np.ndarray]], seed: int = 0) -> pa.Table:
    """Write noise images + the given masks under ``root``; ``masks``: {sample_id: (split, bool HxW)}.

    Returns an index table (index.parquet's schema, mask threshold 128 in the metadata).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for sid, (split, mask) in masks.items():
        dataset, stem = sid.split("/")
        h, w = mask.shape
        img_rel, mask_rel = f"{dataset}/{stem}.png", f"{dataset}/{stem}_gt.png"
        (root / dataset).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / img_rel)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / mask_rel)
        rows.append({
            "sample_id": sid, "dataset": dataset, "split": split, "image_path": img_rel, "mask_path": mask_rel,
            "height": h, "width": w, "mask_area": int(mask.sum()), "box": list(mask_box(mask)),
            "content_sha256": hashlib.sha256(sid.encode()).hexdigest(),
        })
    meta = {METADATA_KEY: json.dumps({"mask_threshold": 128}).encode()}
    return pa.Table.from_pylist(rows, schema=INDEX_SCHEMA.with_metadata(meta))


def small_index(root: Path, n_train: int = 5, n_eval: int = 2) -> pa.Table:
    """A few train images of two datasets (TR0, TR1) and eval images of one (EV), with one ellipse each."""
    masks = {}
    for i in range(n_train):
        h, w = 48 + 8 * i, 64 - 4 * i
        masks[f"TR{i % 2}/s{i}"] = ("train", blob(h, w, h / 2, w / 2 + i, h / 4, w / 5))
    for i in range(n_eval):
        masks[f"EV/e{i}"] = ("eval", blob(40, 40, 20, 20, 10, 12))
    return make_dataset(root, masks)


# ---------------------------------------------------------------------------------------------- embedding caches
@dataclasses.dataclass(frozen=True)
class FakeShard:
    """One shard of a fake cache: its scalar columns (:data:`SCALAR_COLUMNS`) and fp16 ``[N, C, g, g]`` embeddings."""

    dataset: str
    split: str
    columns: Mapping[str, Sequence[Any]]
    embeddings: np.ndarray


def write_cache(root: Path, meta: CacheMeta, shards: Sequence[FakeShard], *, row_group_size: int) -> dict[str, Any]:
    """A complete cache under ``root`` written like the embed stage writes one: every shard atomically through
    :func:`~pipeline.data.embedding_format.write_shard` (verified embedding offsets), then CACHE.json from
    :func:`~pipeline.data.embedding_format.cache_summary`. Shards of one (dataset, split) are numbered in order.
    Returns CACHE.json's contents."""
    root = Path(root)
    counters: dict[tuple[str, str], int] = {}
    listed = []
    for s in shards:
        index = counters.get((s.dataset, s.split), 0)
        counters[(s.dataset, s.split)] = index + 1
        rows = len(s.columns["view_id"])
        vh = hashlib.sha256(json.dumps(list(s.columns["view_id"])).encode()).hexdigest()
        extra = {"views_sha256": vh, "dataset": s.dataset, "split": s.split, "shard": index, "rows": rows}
        path = shard_path(root, s.dataset, s.split, index)
        with atomic_path(path) as tmp:
            size = write_shard(tmp, s.columns, s.embeddings, meta, extra, row_group_size)
            offsets = locate_embeddings(tmp, meta)
        listed.append({"path": path.relative_to(root).as_posix(), "dataset": s.dataset, "split": s.split,
                       "rows": rows, "views_sha256": vh, "bytes": size, "embedding_offsets": offsets})
    cache = cache_summary(meta, listed)
    atomic_write_json(root / CACHE_FILE, cache)
    return cache


def view_columns(views: Sequence[tuple[str, int, int, np.ndarray | str]], split: str, img: int) -> dict[str, list[Any]]:
    """Scalar shard columns for ``views`` = [(view_id ``<dataset>/<stem>#<k>``, height, width, GT mask)]; a mask
    is a bool array or its RLE string."""
    cols: dict[str, list[Any]] = {k: [] for k in SCALAR_COLUMNS}
    for view, h, w, mask in views:
        in_h, in_w = input_size((h, w), img, "sam")
        values = (view, view.rsplit("#", 1)[0], view.split("/")[0], split, h, w, in_h, in_w,
                  mask if isinstance(mask, str) else rle.encode(mask))
        for key, val in zip(SCALAR_COLUMNS, values):
            cols[key].append(val)
    return cols


def write_fake_cache(root: Path, checkpoint_sha256: str, *, img: int = 64, grid: int = 8, n_train: int = 10,
                     n_eval: int = 3, empty_views: tuple[str, ...] = (), seed: int = 0) -> dict[str, list[str]]:
    """A tiny embedding cache: two train shards of DUTS-TR, one eval shard of COIFT; random fp16 embeddings,
    ellipse GT masks of varied sizes (empty for ``empty_views``). Returns the view ids per split."""
    rng = np.random.default_rng(seed)
    meta = CacheMeta(variant="tiny", checkpoint_sha256=checkpoint_sha256, img_size=img, grid=grid, channels=C)
    shards, ids = [], {"train": [], "eval": []}
    plan = [("DUTS-TR", "train", range(0, n_train // 2)), ("DUTS-TR", "train", range(n_train // 2, n_train)),
            ("COIFT", "eval", range(n_eval))]
    for dataset, split, ks in plan:
        views = []
        for k in ks:
            h, w = int(rng.integers(30, 70)), int(rng.integers(30, 70))
            yy, xx = np.mgrid[:h, :w]
            m = ((yy - h * rng.uniform(0.4, 0.6)) / (h * 0.3)) ** 2 + ((xx - w * rng.uniform(0.4, 0.6)) / (w * 0.25)) ** 2 < 1
            view = f"{dataset}/im{k}#0"
            if view in empty_views:
                m[:] = False
            views.append((view, h, w, m))
            ids[split].append(view)
        emb = (rng.standard_normal((len(ks), C, grid, grid)) * 0.5).astype(np.float16)
        shards.append(FakeShard(dataset, split, view_columns(views, split, img), emb))
    write_cache(root, meta, shards, row_group_size=2)
    return ids


def write_synthetic_cache(root: Path, rows: Mapping[tuple[str, str], int], meta: CacheMeta, *, shard_rows: int,
                          row_group_size: int, seed: int = 0) -> dict[str, Any]:
    """A complete cache of random embeddings: ``rows`` = {(dataset, split): n}, ``shard_rows`` views per shard.

    Row ``k`` of a (dataset, split) has view_id ``<dataset>/s<k>#0``; its embedding's first value is ``k``
    (exact in fp16 up to 2048) so a reader's output can be traced back to its row. Returns CACHE.json's contents.
    """
    rng = np.random.default_rng(seed)
    shards = []
    empty = rle.encode(np.zeros((meta.img_size, meta.img_size), bool))
    for (dataset, split), n in sorted(rows.items()):
        for start in range(0, n, shard_rows):
            ks = list(range(start, min(n, start + shard_rows)))
            emb = rng.standard_normal((len(ks), *meta.shape), dtype=np.float32).astype(np.float16)
            emb.reshape(len(ks), -1)[:, 0] = ks
            views = [(f"{dataset}/s{k}#0", meta.img_size, meta.img_size, empty) for k in ks]
            shards.append(FakeShard(dataset, split, view_columns(views, split, meta.img_size), emb))
    return write_cache(root, meta, shards, row_group_size=row_group_size)


# ---------------------------------------------------------------------------------------------- network
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
