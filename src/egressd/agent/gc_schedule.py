"""Full garbage collections on the agent's schedule, not the allocator's.

CPython starts a full (generation-2) collection whenever a quarter more
objects than the last one left have survived into the oldest generation.
Beside a running agent that is every few seconds: each pass parses netlink
dumps and ``nft`` listings into objects that live long enough to be
promoted. A full collection walks every tracked object -- about 90 per
container (each listener's and DNS endpoint's sockets, handles, contexts,
tasks) -- while holding the GIL: 50-118 ms of CPU at 1000 containers
(docs/BENCHMARKS.md), during which the event loop, with the API and every
relayed connection, stands still.

While an agent runs, :class:`FullCollections` turns the automatic full
collections off and the agent runs one itself every ``interval`` seconds,
between passes and between the containers of a long pass: the same pause,
a few times a minute at most instead of every few seconds. Younger
generations are collected as usual, and cyclic garbage that reached the
oldest generation waits about ``interval`` (longer only while one
container's step or a probe round is under way).
The schedule freezes nothing (beyond what the daemon froze at start-up):
what a removed container leaves in cycles is still found.

If the agent's thread dies it gives the schedule back on its way out; if it
hangs (a pass stuck in the kernel), nobody would collect: once the timer is
late by twice its interval, the next younger collection puts the automatic
full collections back, and the agent takes them over again when it runs its
next one. Where the interpreter ignores the full-collection threshold
(CPython 3.14.0-3.14.4, whose collector is incremental), taking over only
logs that it does nothing.

Concurrency model: ``take_over``/``give_back`` may be called from any thread
(counted, so nested agents in one process restore the setting once the last
one stops); ``run_if_due`` from the holder's thread.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

FULL_COLLECTION_INTERVAL = 30.0  # seconds between the agent's full collections
_NEVER = 1 << 30  # generation-1 collections before an automatic full one: never
_LATE_AFTER = 2.0  # intervals past due before the automatic collections come back

_lock = threading.Lock()
_holders = 0
_saved: tuple[int, int, int] | None = None


def _hold_threshold() -> None:
    """Under ``_lock``, with holders: automatic full collections off."""
    assert _saved is not None
    gc.set_threshold(_saved[0], _saved[1], _NEVER)


class FullCollections:
    """Turns automatic full collections off while held; runs them on a timer."""

    def __init__(
        self,
        interval: float = FULL_COLLECTION_INTERVAL,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock``: seconds, monotonic (tests pass their own)."""
        self.interval = interval
        self._clock = clock
        self._next: float | None = None
        self._held = False
        self._lapsed = False

    def take_over(self) -> None:
        global _holders, _saved
        with _lock:
            if self._held:
                return
            self._held = True
            if _holders == 0:
                _saved = gc.get_threshold()
                _hold_threshold()
                if gc.get_threshold()[2] != _NEVER:
                    log.warning(
                        "this interpreter ignores the full-collection threshold: "
                        "full collections stay automatic"
                    )
            _holders += 1
            self._next = self._clock() + self.interval
            self._lapsed = False
            gc.callbacks.append(self._watch)

    def give_back(self) -> None:
        global _holders, _saved
        with _lock:
            if not self._held:
                return
            self._held = False
            gc.callbacks.remove(self._watch)
            _holders -= 1
            if _holders == 0 and _saved is not None:
                gc.set_threshold(*_saved)
                _saved = None
            self._next = None

    def due_in(self) -> float:
        """Seconds until the next full collection (infinite when not held)."""
        due = self._next
        return float("inf") if due is None else max(due - self._clock(), 0.0)

    def run_if_due(self) -> bool:
        """Collect every generation if the time has come; True if it ran."""
        now, due = self._clock(), self._next
        if due is None or now < due:
            return False
        with _lock:
            if not self._held:
                return False
            # Set before collecting: the collection's own callbacks must find the timer on time.
            self._next = now + self.interval
            lapsed, self._lapsed = self._lapsed, False
            if lapsed and _saved is not None:
                _hold_threshold()
        if lapsed:
            log.warning("full collections were automatic while the agent was late; timer again")
        gc.collect()
        return True

    def _watch(self, phase: str, info: dict[str, Any]) -> None:
        """gc callback: the timer is far behind (a hung holder): automatic collections back.

        Runs inside a collection, in whichever thread allocated: no lock taken
        (a thread may hold ``_lock`` while it allocates), only ints set.
        """
        due, saved = self._next, _saved
        if (
            phase == "stop"
            and not self._lapsed
            and due is not None
            and saved is not None
            and self._clock() > due + _LATE_AFTER * self.interval
        ):
            self._lapsed = True
            gc.set_threshold(*saved)
