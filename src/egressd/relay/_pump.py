"""Move bytes both ways between two channels, with TCP half-close (buffered).

The data path of ``https`` upstreams, whose bytes pass through TLS in
Python: a plain read / write loop per direction. Plain TCP on both legs
(``socks5`` and ``http`` upstreams) never comes here; it is spliced by
:class:`egressd.relay._spliced.SplicedConnection`.

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

from egressd.relay._channel import RECV_CHUNK, Channel


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
    try:
        async with asyncio.TaskGroup() as group:
            outbound = group.create_task(_copy(client, upstream), name="pump-out")
            inbound = group.create_task(_copy(upstream, client), name="pump-in")
    except BaseExceptionGroup as failures:
        # One direction failed and the group cancelled the other: surface the cause.
        raise failures.exceptions[0] from None
    return outbound.result(), inbound.result()
