"""Move bytes both ways between two channels, with TCP half-close.

This is the data-path seam: :func:`pump` is the only place that copies
payload. When both channels expose ``raw_socket`` (plain TCP on both
legs: socks5 and http upstreams), bytes move socket -> pipe -> socket with
``os.splice`` and never enter Python; a TLS leg (``https`` upstreams)
falls back to the buffered :func:`_copy`.

Semantics, per direction: read until EOF, then ``shutdown_write`` the other
side so its peer sees EOF while the opposite direction keeps flowing.
:func:`pump` returns when both directions reached EOF. If either direction
fails (reset, broken pipe), the other is cancelled and the first error is
raised; the caller then aborts both channels.

Concurrency model: two tasks in a :class:`asyncio.TaskGroup` (structured:
both are awaited before ``pump`` returns or raises, nothing outlives it).
Cancelling ``pump`` cancels both directions.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket

from egressd.relay._channel import RECV_CHUNK, Channel

PIPE_SIZE = 1 << 20  # fewer wake-ups per megabyte; capped by fs.pipe-max-size
SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


async def _ready(sock: socket.socket, *, write: bool) -> None:
    """Wait until ``sock`` is readable (or writable), through the event loop."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    fd = sock.fileno()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


async def _splice(source: Channel, sink: Channel, src: socket.socket, dst: socket.socket) -> int:
    """Zero-copy ``_copy``: src -> pipe -> dst with ``os.splice``, non-blocking."""
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    with contextlib.suppress(OSError):
        fcntl.fcntl(write_end, F_SETPIPE_SZ, PIPE_SIZE)
    total = in_pipe = 0
    try:
        while True:
            if in_pipe == 0:
                try:
                    moved = os.splice(src.fileno(), write_end, PIPE_SIZE, flags=SPLICE_FLAGS)
                except BlockingIOError:
                    await _ready(src, write=False)
                    continue
                if moved == 0:
                    await sink.shutdown_write()
                    return total
                in_pipe = moved
            try:
                sent = os.splice(read_end, dst.fileno(), in_pipe, flags=SPLICE_FLAGS)
            except BlockingIOError:
                await _ready(dst, write=True)
                continue
            in_pipe -= sent
            total += sent
    finally:
        os.close(read_end)
        os.close(write_end)


async def _copy(source: Channel, sink: Channel) -> int:
    """Copy ``source`` to ``sink`` until EOF; then half-close ``sink``. Returns the byte count."""
    total = 0
    while True:
        data = await source.recv(RECV_CHUNK)
        if not data:
            await sink.shutdown_write()
            return total
        await sink.send_all(data)
        total += len(data)


async def pump(client: Channel, upstream: Channel) -> tuple[int, int]:
    """Relay until both directions ended; returns (bytes client->upstream, upstream->client)."""
    a, b = client.raw_socket, upstream.raw_socket
    try:
        async with asyncio.TaskGroup() as group:
            if a is not None and b is not None:
                outbound = group.create_task(_splice(client, upstream, a, b), name="pump-out")
                inbound = group.create_task(_splice(upstream, client, b, a), name="pump-in")
            else:
                outbound = group.create_task(_copy(client, upstream), name="pump-out")
                inbound = group.create_task(_copy(upstream, client), name="pump-in")
    except BaseExceptionGroup as failures:
        # One direction failed and the group cancelled the other: surface the cause.
        raise failures.exceptions[0] from None
    return outbound.result(), inbound.result()
