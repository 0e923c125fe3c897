"""DNS over TCP (RFC 1035 §4.2.2, RFC 7766): message framing, and a pool of
idle tunnels to one DNS server through one upstream proxy.

Framing: every message is preceded by its length as two bytes, big endian.
:class:`DnsStream` reads and writes whole messages over any
:class:`~egressd.relay._channel.Channel` (a plain socket, or TLS to an
``https`` proxy), so the container-facing TCP listener and the tunnels use
the same code.

Pooling: a proxy handshake per query would double the latency and load the
proxy, so a :class:`TunnelPool` keeps up to ``max_idle`` established
tunnels for the next queries. One query at a time per tunnel: the tunnel
goes back to the pool once its answer (matched by ID) has arrived. A tunnel
that fails, times out or is cancelled mid-query is aborted, never pooled,
so no late answer can be read as the answer to a later query. Idle tunnels
are closed after ``idle_timeout``; one picked from the pool is first
checked for an EOF the server may have sent while it sat there.

Concurrency model: a pool and its streams are used from the event loop
thread only. A stream is owned by exactly one task between ``acquire`` and
``release``/``discard``. The idle reaper is one task per pool (in the
owner's :class:`TaskSet`), running only while tunnels are idle.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from collections.abc import Awaitable, Callable

from egressd.model import ProxySpec
from egressd.relay._channel import RECV_CHUNK, Channel
from egressd.relay._dns_wire import HEADER_LEN, MAX_MESSAGE_LEN
from egressd.relay._tasks import TaskSet
from egressd.relay._upstream import Tunnel

LENGTH_PREFIX = struct.Struct("!H")
MAX_STRAY_REPLIES = 4  # answers to someone else's ID tolerated before giving up on a tunnel

Dialer = Callable[[ProxySpec, tuple[str, int]], Awaitable[Tunnel]]


class DnsStreamError(Exception):
    """The peer broke DNS-over-TCP framing, or ended the stream mid-exchange."""


class DnsStream:
    """Length-prefixed DNS messages over one channel."""

    def __init__(self, channel: Channel, buffered: bytes = b"") -> None:
        self.channel = channel
        self._buffer = bytearray(buffered)

    async def _fill(self) -> bool:
        data = await self.channel.recv(RECV_CHUNK)
        self._buffer += data
        return bool(data)

    async def read_message(self, *, max_size: int = MAX_MESSAGE_LEN) -> bytes | None:
        """The next message; ``None`` at a clean EOF between messages.

        Raises :class:`DnsStreamError` for an EOF inside a message and for a
        length below a DNS header or above ``max_size``.
        """
        while len(self._buffer) < LENGTH_PREFIX.size:
            if not await self._fill():
                if self._buffer:
                    raise DnsStreamError("stream ended inside a length prefix")
                return None
        (length,) = LENGTH_PREFIX.unpack_from(self._buffer)
        if not HEADER_LEN <= length <= max_size:
            raise DnsStreamError(f"message length {length} out of bounds")
        end = LENGTH_PREFIX.size + length
        while len(self._buffer) < end:
            if not await self._fill():
                raise DnsStreamError("stream ended inside a message")
        message = bytes(self._buffer[LENGTH_PREFIX.size : end])
        del self._buffer[:end]
        return message

    async def write_message(self, message: bytes) -> None:
        if len(message) > MAX_MESSAGE_LEN:
            raise DnsStreamError(f"message of {len(message)} bytes cannot be framed")
        await self.channel.send_all(LENGTH_PREFIX.pack(len(message)) + message)

    def looks_alive(self) -> bool:
        """False when the peer already sent EOF, an error, or bytes nobody asked for."""
        if self._buffer:
            return False
        sock = self.channel.raw_socket
        if sock is None:
            return True  # TLS: records (session tickets) may be pending; trust the retry
        try:
            sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    async def close(self) -> None:
        await self.channel.close()

    def abort(self) -> None:
        self.channel.abort()


async def exchange(stream: DnsStream, message: bytes) -> bytes:
    """Send ``message`` and return the reply carrying its ID; strays are dropped."""
    await stream.write_message(message)
    for _ in range(MAX_STRAY_REPLIES + 1):
        reply = await stream.read_message()
        if reply is None:
            raise DnsStreamError("server closed the connection before answering")
        if reply[:2] == message[:2]:
            return reply
    raise DnsStreamError("server keeps answering other queries")


class TunnelPool:
    """Idle DNS-over-TCP tunnels to ``server`` through ``upstream``."""

    def __init__(
        self,
        *,
        upstream: ProxySpec,
        server: tuple[str, int],
        dial: Dialer,
        tasks: TaskSet,
        max_idle: int = 4,
        idle_timeout: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.server = server
        self._dial = dial
        self._tasks = tasks
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._clock = clock
        self._idle: list[tuple[DnsStream, float]] = []  # oldest first
        self._reaper: asyncio.Task[None] | None = None
        self._closed = False
        self.dials = 0

    @property
    def idle(self) -> int:
        return len(self._idle)

    async def acquire(self, *, fresh: bool = False) -> tuple[DnsStream, bool]:
        """A tunnel to use, and whether it was reused. Dialing may raise ``UpstreamError``.

        A closed pool still dials (a query that started before a swap finishes
        on its old upstream); ``release`` then closes the tunnel.
        """
        while self._idle and not fresh:
            stream, since = self._idle.pop()  # the most recent: the likeliest to be alive
            if self._clock() - since < self._idle_timeout and stream.looks_alive():
                return stream, True
            stream.abort()
        tunnel = await self._dial(self.upstream, self.server)
        self.dials += 1
        return DnsStream(tunnel.channel, tunnel.early_payload), False

    async def release(self, stream: DnsStream) -> None:
        """Give back a tunnel whose exchange completed."""
        if self._closed or len(self._idle) >= self._max_idle:
            await stream.close()
            return
        self._idle.append((stream, self._clock()))
        if self._reaper is None:
            self._reaper = self._tasks.spawn(self._reap(), name=f"dns-pool-reaper-{self.server[0]}")

    def discard(self, stream: DnsStream) -> None:
        """Drop a tunnel that failed or was interrupted: its state is unknown."""
        stream.abort()

    async def close(self) -> None:
        """Close the idle tunnels; tunnels released later are closed too."""
        self._closed = True
        if self._reaper is not None:
            self._reaper.cancel()
            self._reaper = None
        idle, self._idle = self._idle, []
        for stream, _since in idle:
            await stream.close()

    async def _reap(self) -> None:
        try:
            while self._idle:
                oldest = self._idle[0][1]
                await asyncio.sleep(max(0.0, oldest + self._idle_timeout - self._clock()))
                now = self._clock()
                expired = [s for s, since in self._idle if now - since >= self._idle_timeout]
                self._idle = [(s, t) for s, t in self._idle if now - t < self._idle_timeout]
                for stream in expired:
                    await stream.close()
        finally:
            if self._reaper is asyncio.current_task():
                self._reaper = None
