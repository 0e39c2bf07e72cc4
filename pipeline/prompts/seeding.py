"""Order-independent random streams: one numpy ``Generator`` per (seed, key, key, ...).

Every prompt is drawn from a generator seeded by a hash of the global seed and the names that identify
it (``"train"``, view_id, draw, ...), so a prompt never depends on which other views were processed
before it, in which order, by which worker, or whether the run was resumed.
"""
from __future__ import annotations

import hashlib

import numpy as np


def key_entropy(seed: int, *keys: str | int) -> list[int]:
    """Four 32-bit words of sha256("seed|key|key...") (a stable, platform-independent seed)."""
    text = "|".join([str(int(seed)), *(str(k) for k in keys)])
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def rng_for(seed: int, *keys: str | int) -> np.random.Generator:
    """A numpy PCG64 generator determined only by ``seed`` and ``keys``."""
    return np.random.default_rng(np.random.SeedSequence(key_entropy(seed, *keys)))


def int_seed(seed: int, *keys: str | int) -> int:
    """A non-negative 63-bit integer seed (e.g. for ``torch.Generator.manual_seed``)."""
    words = key_entropy(seed, *keys)
    return ((words[0] << 32) | words[1]) & ((1 << 63) - 1)
