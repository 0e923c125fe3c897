"""Accepted connections of the relay: which data path, their registry, their log lines.

:class:`ConnectionStarter` takes a client socket whose destination the relay
has already checked and starts it on one of two paths:

* ``socks5`` / ``http`` upstreams: a :class:`SplicedConnection` (callbacks on
  the shared :class:`EdgePoller`, ``splice(2)`` through pooled pipes). A proxy
  given by IP connects at once; a proxy given by name is looked up first in a
  task of its own (``connect_timeout`` covers the lookup too).
* ``https`` upstreams: one task running :func:`open_tunnel` (TLS through
  :class:`TlsChannel`) and the buffered :func:`pump`.

Each container's connections are kept in a :class:`ContainerConnections`,
so removing a container aborts exactly its own. How a connection ended is
logged in one place, :func:`log_outcome`: a refused destination is the
container's business (INFO), a proxy that is down is the operator's
(WARNING), refused credentials are a configuration error (ERROR).

Concurrency model: everything on the relay's event loop; see ``_relay``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import ssl
from collections.abc import Callable, Sequence

from egressd.errors import UpstreamAuthFailed, UpstreamError
from egressd.model import NetworkType, ProxySpec
from egressd.relay._channel import Channel, SocketChannel, reset_socket
from egressd.relay._errors import UpstreamConnectRejected, cannot_resolve
from egressd.relay._events import ClientHandshake, format_endpoint
from egressd.relay._pump import pump
from egressd.relay._sockets import ProxyAddress
from egressd.relay._socks5 import quick_opening_bytes
from egressd.relay._spliced import QuickOpening, SplicedConnection, SpliceShared
from egressd.relay._tasks import TaskSet
from egressd.relay._upstream import (
    Tunnel,
    literal_addresses,
    make_handshake,
    open_tunnel,
    proxy_addresses,
    proxy_label,
)

logger = logging.getLogger("egressd.relay")

OriginalDst = Callable[[socket.SocketType], tuple[str, int]]


class ContainerConnections:
    """The open connections of one container, on either path."""

    def __init__(self, container_id: str) -> None:
        self.spliced: set[SplicedConnection] = set()
        self.tasks = TaskSet(f"relay {container_id}", logger=logger)
        # The last upstream's label and addresses (None: a name to look up), kept
        # while it stays the same object: the same for every connection until a swap.
        self.plan: tuple[ProxySpec, str, tuple[ProxyAddress, ...] | None] | None = None

    def plan_for(self, spec: ProxySpec) -> tuple[str, tuple[ProxyAddress, ...] | None]:
        plan = self.plan
        if plan is None or plan[0] is not spec:
            plan = self.plan = (spec, proxy_label(spec), literal_addresses(spec.host, spec.port))
        return plan[1], plan[2]

    def __len__(self) -> int:
        return len(self.spliced) + len(self.tasks)

    async def abort_all(self) -> int:
        """Abort every connection (RST); returns how many there were."""
        count = len(self)
        for connection in list(self.spliced):
            connection.abort()
        await self.tasks.cancel_all()
        return count


class ConnectionStarter:
    """Starts accepted connections; owns what they share (poller, pipes, lookups)."""

    def __init__(
        self,
        *,
        connect_timeout: float,
        handshake_timeout: float,
        tls_context: Callable[[], ssl.SSLContext],
        socks5_pipelining: bool,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._tls_context = tls_context
        self._socks5_pipelining = socks5_pipelining
        self._shared: SpliceShared | None = None
        self._lookups = TaskSet("relay proxy lookups", logger=logger)

    def start(
        self,
        *,
        container_id: str,
        upstream: ProxySpec,
        registry: ContainerConnections,
        client: socket.SocketType,
        peer: tuple[str, int],
        destination: tuple[str, int],
    ) -> None:
        """Relay ``client`` to ``destination`` via ``upstream``; takes ownership of ``client``."""
        if upstream.scheme is NetworkType.HTTPS:
            if not isinstance(client, socket.socket):  # the loop's sock_* calls want one
                client = socket.socket(client.family, client.type, 0, client.detach())
            try:
                task = registry.tasks.spawn(
                    self._serve_tls(container_id, upstream, client, peer, destination),
                    name=f"relay-{container_id[:12]}-{format_endpoint(*peer[:2])}",
                )
            except BaseException:
                reset_socket(client)  # the caller's reference is detached by now
                raise
            # Safety net: a task cancelled before its first step never runs its finally.
            task.add_done_callback(functools.partial(_close_socket, client))
            return
        label, addresses = registry.plan_for(upstream)
        handshake: ClientHandshake | QuickOpening
        try:
            if (
                upstream.scheme is NetworkType.SOCKS5
                and upstream.username is None
                and self._socks5_pipelining
            ):
                handshake = (
                    quick_opening_bytes(*destination),
                    functools.partial(
                        make_handshake, upstream, destination, label=label, pipeline=True
                    ),
                )
            else:
                handshake = make_handshake(
                    upstream, destination, label=label, pipeline=self._socks5_pipelining
                )
        except ValueError as exc:  # e.g. destination port 0
            log_outcome(container_id, peer, destination, upstream, exc)
            reset_socket(client)
            return
        connection = SplicedConnection(
            client=client,
            handshake=handshake,
            proxy_label=label,
            shared=self.shared,
            on_close=functools.partial(
                _spliced_closed, registry, container_id, peer, destination, upstream
            ),
        )
        registry.spliced.add(connection)
        if addresses is not None:
            connection.start(addresses)
        else:
            connection.resolve_with(
                self._lookups.spawn(
                    _look_up(connection, upstream), name=f"relay-lookup-{upstream.host}"
                )
            )

    @property
    def shared(self) -> SpliceShared:
        """Made on first use, on the running loop."""
        if self._shared is None:
            self._shared = SpliceShared(
                asyncio.get_running_loop(),
                connect_timeout=self._connect_timeout,
                handshake_timeout=self._handshake_timeout,
            )
        return self._shared

    async def close(self) -> None:
        """After every container's connections are gone: release what they shared."""
        await self._lookups.cancel_all()
        if self._shared is not None:
            self._shared.close()
            self._shared = None

    async def _serve_tls(
        self,
        container_id: str,
        spec: ProxySpec,
        client: socket.socket,
        peer: tuple[str, int],
        destination: tuple[str, int],
    ) -> None:
        client_channel = SocketChannel(client)
        tunnel: Tunnel | None = None
        finished = False
        error: BaseException | None = None
        sent = received = 0
        try:
            tunnel = await open_tunnel(
                spec,
                destination,
                connect_timeout=self._connect_timeout,
                handshake_timeout=self._handshake_timeout,
                ssl_context=self._tls_context(),
            )
            if tunnel.early_payload:
                await client_channel.send_all(tunnel.early_payload)
            sent, received = await pump(client_channel, tunnel.channel)
            finished = True
        except (UpstreamError, OSError, ValueError) as exc:  # ValueError: e.g. port 0
            error = exc
        finally:
            channels: list[Channel] = [client_channel]
            if tunnel is not None:
                channels.append(tunnel.channel)
            await _finish(channels, orderly=finished)
        log_outcome(container_id, peer, destination, spec, error, sent=sent, received=received)


async def _look_up(connection: SplicedConnection, spec: ProxySpec) -> None:
    try:
        addresses = await proxy_addresses(spec)
    except OSError as exc:  # socket.gaierror
        reason = exc.strerror or str(exc)
        connection.fail(cannot_resolve(proxy_label(spec), reason))
        return
    connection.start(addresses)


def _spliced_closed(
    registry: ContainerConnections,
    container_id: str,
    peer: tuple[str, int],
    destination: tuple[str, int],
    spec: ProxySpec,
    connection: SplicedConnection,
    error: BaseException | None,
) -> None:
    registry.spliced.discard(connection)
    if error is None and not (connection.orderly and logger.isEnabledFor(logging.DEBUG)):
        return  # done (logged at DEBUG only), or aborted by the relay: counted there
    log_outcome(
        container_id,
        peer,
        destination,
        spec,
        error,
        sent=connection.bytes_out,
        received=connection.bytes_in,
    )


def log_outcome(
    container_id: str,
    peer: tuple[str, int],
    destination: tuple[str, int],
    spec: ProxySpec,
    error: BaseException | None,
    *,
    sent: int = 0,
    received: int = 0,
) -> None:
    """One line per finished connection, at the level its cause deserves."""
    if error is None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "container %s: %s -> %s via %s done (%d bytes out, %d in)",
                container_id,
                format_endpoint(*peer[:2]),
                format_endpoint(*destination),
                spec.endpoint_url,
                sent,
                received,
            )
        return
    if isinstance(error, UpstreamError):
        level = logging.INFO if isinstance(error, UpstreamConnectRejected) else logging.WARNING
        if isinstance(error, UpstreamAuthFailed):
            level = logging.ERROR
    elif isinstance(error, ValueError):
        level = logging.WARNING
    else:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "container %s: %s: connection ended: %s",
                container_id,
                format_endpoint(*peer[:2]),
                error,
            )
        return
    logger.log(
        level,
        "container %s: %s -> %s via %s: %s",
        container_id,
        format_endpoint(*peer[:2]),
        format_endpoint(*destination),
        spec.endpoint_url,
        error,
    )


def _close_socket(sock: socket.socket, _task: asyncio.Task[None]) -> None:
    sock.close()


async def _finish(channels: Sequence[Channel], *, orderly: bool) -> None:
    """Close with FIN after a clean relay; otherwise (or if closing fails) RST."""
    if not orderly:
        for channel in channels:
            channel.abort()
        return
    try:
        for channel in channels:
            await channel.close()
    except BaseException:
        for channel in channels:
            channel.abort()
        raise
