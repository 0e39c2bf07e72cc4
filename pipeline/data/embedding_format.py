"""The frozen-SAM embedding cache: Parquet shard format, metadata checks and the shard writer.

Layout (written by :mod:`pipeline.data.embed`)::

    <root>/<dataset>/<split>/part-NNNNN.parquet   one shard = a fixed chunk of views
    <root>/CACHE.json                             metadata + shard list, written last (= the cache is complete)

A shard has the columns of :data:`SHARD_FIELDS`; ``embedding`` is ``fixed_size_binary(C*g*g*2)`` holding
the raw fp16 ``[C, g, g]`` array (C-contiguous), uncompressed, in row groups of ``embed.row_group_size``
rows (CONVENTIONS: this reads several times faster than a tensor extension type). The schema metadata
key ``b"stable_sam"`` holds JSON: :class:`CacheMeta`'s fields plus the shard's ``views_sha256`` (a hash of
the views rows it encodes), ``dataset``, ``split``, ``shard`` and ``rows``.

Readers only trust ``CACHE.json`` (:func:`read_cache_meta`): a cache whose embed run has not finished is
never read. The streaming readers are in :mod:`pipeline.data.embedding_reader`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.common.cli import StageError

META_KEY = b"stable_sam"
FORMAT_VERSION = 1
PREPROCESSING = "sam-resize-longest-pil-pad"  # = SamPredictor.set_image (pipeline.modeling.transforms)
DTYPE = "float16"
CACHE_FILE = "CACHE.json"
SCALAR_COLUMNS = ("view_id", "sample_id", "dataset", "split", "height", "width", "input_h", "input_w", "mask_rle")


class StaleCacheError(StageError):
    """An existing cache that does not belong to the current base model / preprocessing / views."""


class IncompleteCacheError(FileNotFoundError):
    """A cache folder without ``CACHE.json``: the embed stage has not finished there."""


@dataclass(frozen=True)
class CacheMeta:
    """What an embedding is a function of, besides the view itself (stored in every shard and CACHE.json)."""

    variant: str
    checkpoint_sha256: str
    img_size: int
    grid: int
    channels: int
    preprocessing: str = PREPROCESSING
    dtype: str = DTYPE
    format_version: int = FORMAT_VERSION

    @classmethod
    def from_info(cls, info: Mapping[str, Any]) -> "CacheMeta":
        """From a base model's ``info`` dict (``load_base``): variant, checkpoint_sha256, img_size, grid, channels."""
        return cls(variant=str(info["variant"]), checkpoint_sha256=str(info["checkpoint_sha256"]),
                   img_size=int(info["img_size"]), grid=int(info["grid"]), channels=int(info["channels"]))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CacheMeta":
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def row_bytes(self) -> int:
        """Bytes of one fp16 embedding."""
        return self.channels * self.grid * self.grid * 2

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.grid, self.grid)

    def differences(self, other: "CacheMeta") -> list[str]:
        """Human-readable list of fields where ``other`` (found on disk) differs from ``self`` (wanted)."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                if f.name == "checkpoint_sha256":
                    out.append(f"were made by checkpoint {str(b)[:12]}..., the base is {str(a)[:12]}...")
                else:
                    out.append(f"have {f.name}={b!r}, the current run needs {a!r}")
        return out


def shard_schema(meta: CacheMeta, extra: Mapping[str, Any]) -> pa.Schema:
    """The shard schema, with ``meta`` + ``extra`` (views_sha256, dataset, split, shard, rows) as metadata."""
    payload = {**meta.as_dict(), **extra}
    return pa.schema(
        [
            pa.field("view_id", pa.string(), nullable=False),
            pa.field("sample_id", pa.string(), nullable=False),
            pa.field("dataset", pa.string(), nullable=False),
            pa.field("split", pa.string(), nullable=False),
            pa.field("height", pa.int32(), nullable=False),
            pa.field("width", pa.int32(), nullable=False),
            pa.field("input_h", pa.int32(), nullable=False),
            pa.field("input_w", pa.int32(), nullable=False),
            pa.field("mask_rle", pa.string(), nullable=False),
            pa.field("embedding", pa.binary(meta.row_bytes), nullable=False),
        ],
        metadata={META_KEY: json.dumps(payload, sort_keys=True).encode()},
    )


def shard_path(root: str | os.PathLike[str], dataset: str, split: str, index: int) -> Path:
    """``<root>/<dataset>/<split>/part-NNNNN.parquet``."""
    return Path(root) / dataset / split / f"part-{index:05d}.parquet"


def write_shard(
    path: str | os.PathLike[str],
    columns: Mapping[str, Sequence[Any]],
    embeddings: np.ndarray,
    meta: CacheMeta,
    extra: Mapping[str, Any],
    row_group_size: int,
) -> int:
    """Write one shard to ``path`` (the caller makes it atomic): scalar ``columns`` + fp16 ``[N, C, g, g]``.

    Returns the file size in bytes.
    """
    if embeddings.dtype != np.float16 or tuple(embeddings.shape[1:]) != meta.shape:
        raise ValueError(f"embeddings must be float16 [N, {meta.shape}], got {embeddings.dtype} {embeddings.shape}")
    n = embeddings.shape[0]
    schema = shard_schema(meta, extra)
    arrays = [pa.array(columns[name], type=schema.field(name).type) for name in SCALAR_COLUMNS]
    flat = np.ascontiguousarray(embeddings).reshape(-1).view(np.uint8)
    emb = pa.FixedSizeBinaryArray.from_buffers(pa.binary(meta.row_bytes), n, [None, pa.py_buffer(flat)])
    table = pa.Table.from_arrays(arrays + [emb], schema=schema)
    with pq.ParquetWriter(
        str(path), schema, compression="none", use_dictionary=["dataset", "split", "sample_id"],
        write_statistics=["view_id", "sample_id", "dataset", "split"],
        data_page_size=max(1 << 20, row_group_size * meta.row_bytes),
    ) as writer:
        writer.write_table(table, row_group_size=row_group_size)
    return Path(path).stat().st_size


def read_shard_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``stable_sam`` metadata of one shard (without reading its data)."""
    try:
        schema = pq.read_schema(str(path))
    except (OSError, pa.ArrowInvalid) as exc:
        raise StaleCacheError(f"{path}: unreadable shard ({exc}); delete it and re-run `dvc repro embed`") from None
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise StaleCacheError(f"{path}: not an embedding shard (no stable_sam metadata); delete it")
    return json.loads(raw)


def decoded_embeddings(table: pa.Table, shape: tuple[int, int, int]) -> np.ndarray:
    """fp16 ``[n, C, g, g]`` from a decoded ``embedding`` column (no copy for a single chunk)."""
    row_bytes = 2 * shape[0] * shape[1] * shape[2]
    parts = []
    for chunk in table.column("embedding").chunks:
        raw = np.frombuffer(chunk.buffers()[1], dtype=np.uint8, count=len(chunk) * row_bytes,
                            offset=chunk.offset * row_bytes)
        parts.append(raw.view(np.float16).reshape(len(chunk), *shape))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def locate_embeddings(path: str | os.PathLike[str], meta: CacheMeta) -> list[int | None]:
    """Per row group: the byte offset where its embeddings lie contiguously in the file, or None.

    With one uncompressed PLAIN data page per column chunk (what :func:`write_shard` writes), a row
    group's values are the last ``rows * row_bytes`` bytes of the embedding column chunk. Each candidate
    is VERIFIED byte for byte against pyarrow's own decoding, so a reader using the offset
    (:class:`EmbeddingDataset`'s zero-copy path) can never see other bytes than pyarrow would.
    """
    offsets: list[int | None] = []
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    pf = pq.ParquetFile(str(path), memory_map=True, pre_buffer=False)
    try:
        md = pf.metadata
        col = pf.schema_arrow.get_field_index("embedding")
        for rg in range(md.num_row_groups):
            chunk = md.row_group(rg).column(col)
            n = md.row_group(rg).num_rows
            start = chunk.data_page_offset + chunk.total_compressed_size - n * meta.row_bytes
            ok = (chunk.compression == "UNCOMPRESSED" and chunk.dictionary_page_offset is None
                  and n > 0 and start >= chunk.data_page_offset)
            if ok:
                decoded = decoded_embeddings(pf.read_row_group(rg, columns=["embedding"]), meta.shape)
                ok = np.array_equal(mapped[start:start + n * meta.row_bytes], decoded.reshape(-1).view(np.uint8))
            offsets.append(int(start) if ok else None)
    finally:
        pf.close()
        del mapped
    return offsets


def read_cache_meta(root: str | os.PathLike[str]) -> dict[str, Any]:
    """``<root>/CACHE.json``: {meta fields..., "shards": [{path, dataset, split, rows, views_sha256, bytes}], ...}.

    Raises :class:`IncompleteCacheError` when the embed stage has not finished in ``root``.
    """
    path = Path(root) / CACHE_FILE
    if not path.is_file():
        raise IncompleteCacheError(
            f"{path} missing: the embedding cache in {root} is absent or unfinished; run `dvc repro embed`"
        )
    cache = json.loads(path.read_text())
    if cache.get("format_version") != FORMAT_VERSION:
        raise StaleCacheError(f"{path}: format_version {cache.get('format_version')} != {FORMAT_VERSION}; "
                              "re-run `dvc repro embed`")
    return cache


def cache_summary(meta: CacheMeta, shards: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """CACHE.json's contents: ``meta`` + the shard list.

    Each shard: path, dataset, split, rows, views_sha256, bytes, and optionally ``embedding_offsets``
    (from :func:`locate_embeddings`; readers fall back to Parquet decoding without them).
    """
    overall = hashlib.sha256("".join(s["views_sha256"] for s in shards).encode()).hexdigest()
    return {**meta.as_dict(), "views_sha256": overall, "rows": sum(int(s["rows"]) for s in shards),
            "shards": [dict(s) for s in shards]}


__all__ = [
    "CACHE_FILE", "CacheMeta", "DTYPE", "FORMAT_VERSION", "IncompleteCacheError", "META_KEY", "PREPROCESSING",
    "SCALAR_COLUMNS", "StaleCacheError", "cache_summary", "decoded_embeddings", "locate_embeddings",
    "read_cache_meta", "read_shard_meta", "shard_path", "shard_schema", "write_shard",
]
