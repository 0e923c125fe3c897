"""One container's DNS answer cache: TTL-respecting, LRU-bounded, sans-IO.

Keyed by the question (name case-folded, type, class) and the query bits
that change the answer (RD, CD, EDNS0 DO). An entry lives for
the lifetime :func:`cache_lifetime` allows; a hit comes back with the
asker's ID and question spelling and every TTL lowered by the entry's age,
so downstream caches do not keep it longer than the source allowed. Time
comes from an injected clock (``time.monotonic`` by default).

No concurrency: used from the event loop thread only, no awaits inside.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from egressd.relay._dns_wire import CacheKey, Query, ResponseInfo, personalize


@dataclass(frozen=True)
class _Entry:
    response: bytes
    ttl_offsets: tuple[int, ...]
    stored_at: float
    expires_at: float


class DnsCache:
    """At most ``max_entries`` answers; the least recently used goes first."""

    def __init__(
        self, *, max_entries: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must not be negative")
        self._max_entries = max_entries
        self._clock = clock
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, query: Query) -> bytes | None:
        key = query.cache_key
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        now = self._clock()
        if now >= entry.expires_at:
            del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return personalize(
            entry.response,
            query,
            ttl_offsets=entry.ttl_offsets,
            age=int(now - entry.stored_at),
        )

    def put(self, query: Query, response: bytes, info: ResponseInfo, *, lifetime: int) -> None:
        """Keep ``response`` (already checked to answer ``query``) for ``lifetime`` seconds."""
        if lifetime <= 0 or self._max_entries == 0:
            return
        now = self._clock()
        key = query.cache_key
        self._entries[key] = _Entry(response, info.ttl_offsets, now, now + lifetime)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()
