"""Full garbage collections on the agent's schedule, not the allocator's.

CPython starts a full (generation-2) collection whenever a quarter more
objects than the last one left have survived into the oldest generation.
Beside a running agent that is every few seconds: each pass parses netlink
dumps and ``nft`` listings into objects that live long enough to be
promoted. A full collection walks every tracked object -- about 90 per
container (each listener's and DNS endpoint's sockets, handles, contexts,
tasks) -- while holding the GIL: 50-66 ms of CPU at 1000 containers
(docs/BENCHMARKS.md), during which the event loop, with the API and every
relayed connection, stands still.

While an agent runs, :class:`FullCollections` turns the automatic full
collections off and the agent runs one itself every ``interval`` seconds,
between passes and between the containers of a long pass: the same pause,
a few times a minute at most instead of every few seconds. Younger
generations are collected as usual, and cyclic garbage that reached the
oldest generation waits about ``interval`` (longer only while one
container's step or a probe round is under way).
Objects are never frozen: what a removed container leaves in cycles is
still found.

Concurrency model: ``take_over``/``give_back`` may be called from any thread
(counted, so nested agents in one process restore the setting once the last
one stops); ``run_if_due`` from the agent's thread.
"""

from __future__ import annotations

import gc
import threading

FULL_COLLECTION_INTERVAL = 30.0  # seconds between the agent's full collections
_NEVER = 1 << 30  # generation-1 collections before an automatic full one: never

_lock = threading.Lock()
_holders = 0
_saved: tuple[int, int, int] | None = None


class FullCollections:
    """Turns automatic full collections off while held; runs them on a timer."""

    def __init__(self, interval: float = FULL_COLLECTION_INTERVAL) -> None:
        self.interval = interval
        self._next: float | None = None
        self._held = False

    def take_over(self, now: float) -> None:
        global _holders, _saved
        with _lock:
            if self._held:
                return
            self._held = True
            if _holders == 0:
                _saved = gc.get_threshold()
                gc.set_threshold(_saved[0], _saved[1], _NEVER)
            _holders += 1
        self._next = now + self.interval

    def give_back(self) -> None:
        global _holders, _saved
        with _lock:
            if not self._held:
                return
            self._held = False
            _holders -= 1
            if _holders == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                _saved = None
        self._next = None

    def due_in(self, now: float) -> float:
        """Seconds until the next full collection (infinite when not held)."""
        return float("inf") if self._next is None else max(self._next - now, 0.0)

    def run_if_due(self, now: float) -> bool:
        """Collect every generation if the time has come; True if it ran."""
        if self._next is None or now < self._next:
            return False
        gc.collect()
        self._next = now + self.interval
        return True
