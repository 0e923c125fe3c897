"""Timeouts for many connections with one timer.

Every connection of a relay waits for its proxy with the same timeout, so
deadlines fall due in the order the connections were added: an
insertion-ordered dict already is the priority queue. One asyncio timer,
armed for the earliest deadline, expires what is due; a connection that got
through in time is a dict pop. This replaces a ``TimerHandle`` per
connection and phase (a heap push in Python, then a cancel that leaves the
handle in the heap until the loop sweeps it).

Concurrency model: used from the event loop thread only. ``on_expired``
runs from the timer callback and may add or discard entries; if it raises,
the error is logged and the other due keys still expire.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

logger = logging.getLogger("egressd.relay")

K = TypeVar("K", bound=Hashable)


class DeadlineQueue(Generic[K]):
    """Keys that expire ``timeout`` seconds after :meth:`add`, unless discarded first."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        timeout: float,
        on_expired: Callable[[K], None],
    ) -> None:
        self.timeout = timeout
        self._loop = loop
        self._on_expired = on_expired
        self._due: dict[K, float] = {}  # insertion order == deadline order
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: K) -> bool:
        return key in self._due

    def add(self, key: K) -> None:
        deadline = self._loop.time() + self.timeout
        self._due.pop(key, None)  # re-adding moves it to the end, keeping the order true
        self._due[key] = deadline
        if self._timer is None:
            self._timer = self._loop.call_at(deadline, self._expire)

    def discard(self, key: K) -> None:
        # The timer stays armed for a deadline that may be gone: it then re-arms.
        self._due.pop(key, None)

    def close(self) -> None:
        """Forget every key and stop the timer."""
        self._due.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        now = self._loop.time()
        while self._due:
            key, deadline = next(iter(self._due.items()))
            if deadline > now:
                break
            del self._due[key]
            try:
                self._on_expired(key)
            except Exception:
                # One failing key must not stop the others from expiring (or the re-arm).
                logger.exception("relay: expiring a deadline failed")
        if self._timer is not None:  # armed by an add() from on_expired: maybe too late
            self._timer.cancel()
            self._timer = None
        if self._due:
            self._timer = self._loop.call_at(next(iter(self._due.values())), self._expire)
