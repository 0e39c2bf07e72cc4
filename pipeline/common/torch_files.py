"""Explaining why a file could not be read by ``torch.load`` (the message a user sees for a corrupt,
truncated or foreign checkpoint); torch-free, so any layer may use it."""
from __future__ import annotations

import re


def load_error_reason(exc: BaseException) -> str:
    """A short description of why ``torch.load`` failed on a file: the error type and its gist, without
    torch's advice to retry with ``weights_only=False`` (never the fix for a corrupt or foreign file)."""
    text = " ".join(str(exc).split())
    found = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    detail = found.group(1) if found else text.split(". ")[0]
    return f"{type(exc).__name__}: {detail.strip() or 'empty or truncated file'}"[:200]


__all__ = ["load_error_reason"]
