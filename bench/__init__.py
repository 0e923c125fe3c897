"""egressd benchmarks: ``python -m bench`` (``make bench``); see docs/BENCHMARKS.md."""

from __future__ import annotations

import sys
import time

_T0 = time.monotonic()


def say(message: str) -> None:
    """A progress line on stderr, with the seconds since the run began."""
    print(f"[{time.monotonic() - _T0:7.1f}s] {message}", file=sys.stderr, flush=True)
