"""One container's DNS resolver: its cache, then its servers in order, each
asked over DNS-over-TCP through the container's upstream proxy.

A query is answered from the cache when it can be; otherwise the servers
are tried in the configured order, each attempt bounded by
``attempt_timeout`` and the whole query by ``query_timeout``. A server that
cannot be reached through the proxy, times out, closes, or sends something
that does not answer the question is skipped; SERVFAIL, REFUSED and NOTIMP
from a server also move on to the next one (as glibc's stub does), but are
kept as the answer if nobody does better. When no server answers, the
client gets SERVFAIL with its own ID and question. Nothing is ever resolved
from the host directly.

Upstream queries carry a fresh random ID (the client's is restored on the
answer), so answers on a pooled tunnel cannot be confused across clients.

Concurrency model: used from the event loop thread. ``answer`` runs in the
caller's task (a UDP query task or a TCP client task); at most
``max_inflight`` run at once, beyond that the answer is SERVFAIL at once.
``configure`` swaps servers and upstream in place: queries already running
keep the pools they started with (closed pools close released tunnels),
later queries use the new ones, and the cache is emptied.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from egressd.errors import UpstreamError
from egressd.model import ProxySpec
from egressd.relay._dns_cache import DnsCache
from egressd.relay._dns_pool import Dialer, DnsStreamError, TunnelPool, exchange
from egressd.relay._dns_wire import (
    RCODE_NOTIMP,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    DnsFormatError,
    Query,
    answers,
    cache_lifetime,
    parse_response,
    servfail,
    with_id,
)
from egressd.relay._events import format_endpoint
from egressd.relay._tasks import TaskSet

logger = logging.getLogger("egressd.relay.dns")

_TRY_NEXT_RCODES = frozenset({RCODE_SERVFAIL, RCODE_REFUSED, RCODE_NOTIMP})


@dataclass(frozen=True)
class DnsOptions:
    """Bounds of the DNS service; the defaults suit production."""

    attempt_timeout: float = 2.0  # one server: connect + handshake + query
    query_timeout: float = 5.0  # all servers together
    max_inflight: int = 64  # upstream queries per container
    cache_entries: int = 1024
    max_ttl: int = 3600
    max_negative_ttl: int = 300
    pool_max_idle: int = 4  # idle tunnels per (container, server)
    pool_idle_timeout: float = 30.0
    tcp_idle_timeout: float = 10.0  # container-side TCP connection between queries
    max_tcp_clients: int = 64  # container-side TCP connections at once
    max_query_size: int = 4096


class DnsResolver:
    """Answers one container's queries."""

    def __init__(
        self,
        *,
        container_id: str,
        upstream: ProxySpec,
        servers: tuple[tuple[str, int], ...],
        dial: Dialer,
        options: DnsOptions,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.container_id = container_id
        self._dial = dial
        self._options = options
        self._clock = clock
        self._tasks = TaskSet(f"relay dns {container_id}", logger=logger)
        self.cache = DnsCache(max_entries=options.cache_entries, clock=clock)
        self._inflight = 0
        self._failing: set[tuple[str, int]] = set()
        self.upstream = upstream
        self.servers = servers
        self.pools = self._new_pools()

    def _new_pools(self) -> tuple[TunnelPool, ...]:
        return tuple(
            TunnelPool(
                upstream=self.upstream,
                server=server,
                dial=self._dial,
                tasks=self._tasks,
                max_idle=self._options.pool_max_idle,
                idle_timeout=self._options.pool_idle_timeout,
                clock=self._clock,
            )
            for server in self.servers
        )

    @property
    def inflight(self) -> int:
        return self._inflight

    async def configure(self, *, upstream: ProxySpec, servers: tuple[tuple[str, int], ...]) -> bool:
        """Use these servers and this upstream from now on. True when something changed."""
        if upstream == self.upstream and servers == self.servers:
            return False
        old = self.pools
        self.upstream, self.servers = upstream, servers
        self.pools = self._new_pools()
        self.cache = DnsCache(max_entries=self._options.cache_entries, clock=self._clock)
        self._failing.clear()
        for pool in old:
            await pool.close()
        return True

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()
        await self._tasks.cancel_all()

    def cached(self, query: Query) -> bytes | None:
        return self.cache.get(query)

    async def answer(self, query: Query) -> bytes:
        """The answer to send back (never raises for upstream faults)."""
        hit = self.cache.get(query)
        if hit is not None:
            return hit
        if self._inflight >= self._options.max_inflight:
            logger.debug(
                "container %s: %d DNS queries in flight; SERVFAIL for %s",
                self.container_id,
                self._inflight,
                query.question.text,
            )
            return servfail(query)
        self._inflight += 1
        try:
            return await self._resolve(query)
        finally:
            self._inflight -= 1

    async def _resolve(self, query: Query) -> bytes:
        pools, cache = self.pools, self.cache  # snapshot: a swap does not touch this query
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._options.query_timeout
        message = with_id(query.message, secrets.randbelow(0x10000))
        fallback: bytes | None = None
        for pool in pools:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            timeout = min(self._options.attempt_timeout, remaining)
            try:
                async with asyncio.timeout(timeout):
                    reply = await self._ask(pool, message)
                info = parse_response(reply)
                if not answers(info, query):
                    raise DnsFormatError("the reply answers another question")
            except TimeoutError:
                self._note_failure(pool, f"no answer within {timeout:g}s")
                continue
            except (UpstreamError, OSError, DnsStreamError, DnsFormatError) as exc:
                self._note_failure(pool, str(exc) or type(exc).__name__)
                continue
            self._note_success(pool)
            reply = with_id(reply, query.id)
            if info.header.rcode in _TRY_NEXT_RCODES:
                fallback = reply
                continue
            lifetime = cache_lifetime(
                info,
                max_ttl=self._options.max_ttl,
                max_negative_ttl=self._options.max_negative_ttl,
            )
            cache.put(query, reply, info, lifetime=lifetime)
            return reply
        if fallback is not None:
            return fallback
        logger.debug(
            "container %s: no DNS server answered %s; SERVFAIL",
            self.container_id,
            query.question.text,
        )
        return servfail(query)

    async def _ask(self, pool: TunnelPool, message: bytes) -> bytes:
        stream, reused = await pool.acquire()
        while True:
            try:
                reply = await exchange(stream, message)
            except (OSError, DnsStreamError) as exc:
                pool.discard(stream)
                if not reused:
                    raise
                # The server may close an idle connection at any time (RFC 7766 §6.2.3);
                # a pooled tunnel failing is no verdict on the server: retry on a new one.
                logger.debug(
                    "container %s: pooled tunnel to DNS server %s failed (%s); dialing anew",
                    self.container_id,
                    format_endpoint(*pool.server),
                    exc,
                )
                stream, reused = await pool.acquire(fresh=True)
                continue
            except BaseException:
                pool.discard(stream)
                raise
            await pool.release(stream)
            return reply

    def _note_failure(self, pool: TunnelPool, reason: str) -> None:
        # Warn once when a server starts failing, not once per query.
        first = pool.server not in self._failing and pool in self.pools
        if first:
            self._failing.add(pool.server)
        logger.log(
            logging.WARNING if first else logging.DEBUG,
            "container %s: DNS server %s via %s failed: %s",
            self.container_id,
            format_endpoint(*pool.server),
            pool.upstream.endpoint_url,
            reason,
        )

    def _note_success(self, pool: TunnelPool) -> None:
        if pool.server in self._failing and pool in self.pools:
            self._failing.discard(pool.server)
            logger.info(
                "container %s: DNS server %s via %s answers again",
                self.container_id,
                format_endpoint(*pool.server),
                pool.upstream.endpoint_url,
            )
