"""The stage CLIs' shared contract: a known failure is one line on stderr and exit code 2; a bug is a traceback.

"Known" means what a user can fix from the message: a bad param (``ConfigError`` is a ``ValueError``),
a bad or missing file (``ValueError``/``OSError`` subclasses: decode, checksum, stale cache, plugin file,
disk full, permissions), a failed download. Everything else (a ``TypeError`` in our code, a torch error)
keeps its traceback, because only a developer can fix it.

    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        return run_stage("train", lambda: train(...))
"""
from __future__ import annotations

import sys
from typing import Any, Callable

KnownErrors = tuple[type[BaseException], ...]
KNOWN_ERRORS: KnownErrors = (ValueError, OSError, KeyError)


class StageError(RuntimeError):
    """A stage cannot go on for a reason the user can fix; the message says which file and what to do."""


def run_stage(name: str, work: Callable[[], Any], known: KnownErrors = KNOWN_ERRORS) -> int:
    """Run ``work``; return 0, or print ``<name>: error: <message>`` and return 2 on a known failure."""
    try:
        work()
    except (StageError, *known) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2
    return 0


__all__ = ["KNOWN_ERRORS", "StageError", "run_stage"]
