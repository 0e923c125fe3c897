"""The transparent TCP relay: one listener per container, one process for all.

Per accepted connection: read the pre-redirect destination
(``SO_ORIGINAL_DST``), refuse it if it points back at a relay listener,
open a tunnel through the container's upstream proxy to that destination
(by IP, never by name), hand over any early payload, then :func:`pump`
until both directions are done. Orderly ends close with FIN; failures and
``remove_listener`` abort with RST so the peers learn something went wrong.

The client socket is not read until the tunnel is up: what the container
sends meanwhile waits in the kernel's receive buffer, nothing is lost.

Concurrency model: everything runs on one event loop. Each listener has one
accept task (in the relay's :class:`TaskSet`); each connection has one task
(in its container's :class:`TaskSet`, so ``remove_listener`` can abort
exactly that container's connections). Listener changes are serialized by
one lock. A connection takes a snapshot of the container's upstream when it
is accepted, so swapping the upstream only affects later connections.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from egressd.errors import KernelError, UpstreamAuthFailed, UpstreamError
from egressd.model import NetworkType, ProxySpec
from egressd.relay._channel import Channel, SocketChannel, tune_tcp
from egressd.relay._errors import UpstreamConnectRejected
from egressd.relay._events import format_endpoint
from egressd.relay._original_dst import original_destination
from egressd.relay._pump import pump
from egressd.relay._tasks import TaskSet
from egressd.relay._upstream import Tunnel, open_tunnel

logger = logging.getLogger("egressd.relay")

IP_FREEBIND = 15  # linux/in.h: bind to an address not (yet) configured on any interface
LISTEN_BACKLOG = 1024
_ACCEPT_RETRY_DELAY = 0.1
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

OriginalDst = Callable[[socket.socket], tuple[str, int]]


@dataclass
class _Container:
    container_id: str
    upstream: ProxySpec
    requested: tuple[str, int]
    bound: tuple[str, int]
    listen_socket: socket.socket
    accept_task: asyncio.Task[None]
    connections: TaskSet = field(repr=False)


def _normalize(address: tuple[str, int]) -> tuple[str, int]:
    return str(ipaddress.ip_address(address[0])), int(address[1])


def open_listen_socket(address: tuple[str, int]) -> socket.socket:
    """A non-blocking listening socket; ``KernelError`` (with errno) on failure."""
    family = socket.AF_INET6 if ipaddress.ip_address(address[0]).version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # REUSEADDR: rebind at once after a restart despite TIME_WAIT connections.
        # FREEBIND: the listener may open before (or while) the dataplane adds the address.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise KernelError(
            f"relay cannot listen on {format_endpoint(*address)}: {exc.strerror}",
            errno=exc.errno,
        ) from None
    return sock


class Relay:
    """Transparent relay for every container on the host."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        original_dst: OriginalDst | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._handshake_timeout = handshake_timeout
        self._original_dst: OriginalDst = original_dst or original_destination
        self._ssl_context = ssl_context
        self._containers: dict[str, _Container] = {}
        self._accept_tasks = TaskSet("relay listeners", logger=logger)
        self._lock = asyncio.Lock()
        self._closed = False

    # -- listeners -------------------------------------------------------------------------

    async def ensure_listener(
        self, *, container_id: str, listen_ip: str, port: int, upstream: ProxySpec
    ) -> None:
        """Listen for ``container_id`` at (listen_ip, port) relaying via ``upstream``.

        Idempotent. Same address: only the upstream is swapped (new connections
        use it; open ones keep theirs). Other address: the new listener opens,
        then the old one closes; open connections carry on. ``port=0`` lets the
        kernel pick (tests); ``listener_addresses()`` tells which. A bind failure
        raises :class:`KernelError` with the errno and leaves things as they were.
        Call from the event loop the relay runs on.
        """
        if not upstream.scheme.is_proxy:
            raise ValueError(f"upstream of type {upstream.scheme.value!r} cannot be relayed")
        if not 0 <= port <= 65535:
            raise ValueError(f"listener port out of range: {port}")
        requested = _normalize((listen_ip, port))
        async with self._lock:
            if self._closed:
                raise RuntimeError("relay is closed")
            state = self._containers.get(container_id)
            if state is not None and state.requested == requested:
                if state.upstream != upstream:
                    logger.info(
                        "container %s: new connections now go via %s (was %s)",
                        container_id,
                        upstream.endpoint_url,
                        state.upstream.endpoint_url,
                    )
                    state.upstream = upstream
                return
            listen_socket = open_listen_socket(requested)
            bound = _normalize(listen_socket.getsockname()[:2])
            if state is None:
                self._containers[container_id] = _Container(
                    container_id=container_id,
                    upstream=upstream,
                    requested=requested,
                    bound=bound,
                    listen_socket=listen_socket,
                    accept_task=self._spawn_accept(container_id, listen_socket),
                    connections=TaskSet(f"relay {container_id}", logger=logger),
                )
                logger.info(
                    "container %s: listening on %s via %s",
                    container_id,
                    format_endpoint(*bound),
                    upstream.endpoint_url,
                )
                return
            # Moved: the new listener is already open; close the old one. Open
            # connections stay tracked under the container and finish naturally.
            old = state.bound
            try:
                await self._stop_accepting(state)
            except BaseException:
                listen_socket.close()
                raise
            state.upstream = upstream
            state.requested, state.bound, state.listen_socket = requested, bound, listen_socket
            state.accept_task = self._spawn_accept(container_id, listen_socket)
            logger.info(
                "container %s: listener moved from %s to %s via %s",
                container_id,
                format_endpoint(*old),
                format_endpoint(*bound),
                upstream.endpoint_url,
            )

    async def remove_listener(self, container_id: str) -> None:
        """Close the listener and abort its open connections. Idempotent."""
        async with self._lock:
            await self._remove(container_id)

    def listener_addresses(self) -> dict[str, tuple[str, int]]:
        return {cid: state.bound for cid, state in self._containers.items()}

    def active_connections(self, container_id: str) -> int:
        state = self._containers.get(container_id)
        return len(state.connections) if state is not None else 0

    async def close(self) -> None:
        """Close every listener and abort every connection. Idempotent."""
        async with self._lock:
            self._closed = True
            for container_id in list(self._containers):
                await self._remove(container_id)
            await self._accept_tasks.cancel_all()

    async def _remove(self, container_id: str) -> None:
        state = self._containers.pop(container_id, None)
        if state is None:
            return
        await self._stop_accepting(state)
        aborted = len(state.connections)
        await state.connections.cancel_all()
        logger.info(
            "container %s: listener on %s closed, %d connection(s) aborted",
            container_id,
            format_endpoint(*state.bound),
            aborted,
        )

    async def _stop_accepting(self, state: _Container) -> None:
        state.accept_task.cancel()
        # gather: wait for the task without re-raising its CancelledError as ours.
        await asyncio.gather(state.accept_task, return_exceptions=True)
        state.listen_socket.close()

    def _spawn_accept(self, container_id: str, listen_socket: socket.socket) -> asyncio.Task[None]:
        return self._accept_tasks.spawn(
            self._accept_loop(container_id, listen_socket), name=f"relay-accept-{container_id}"
        )

    async def _accept_loop(self, container_id: str, listen_socket: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, peer = await loop.sock_accept(listen_socket)
            except OSError as exc:
                # Out of descriptors/memory: back off instead of spinning; the
                # pending connection stays in the backlog until we can take it.
                level = logging.WARNING if exc.errno in _RESOURCE_ERRNOS else logging.DEBUG
                logger.log(level, "container %s: accept failed: %s", container_id, exc)
                await asyncio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            tune_tcp(client)
            state = self._containers.get(container_id)
            if state is None or state.listen_socket is not listen_socket:
                client.close()  # raced with a removal or a move
                continue
            task = state.connections.spawn(
                self._serve(state, client, peer),
                name=f"relay-{container_id[:12]}-{format_endpoint(*peer[:2])}",
            )
            # Safety net: a task cancelled before its first step never runs its finally.
            task.add_done_callback(_closer(client))

    # -- connections -----------------------------------------------------------------------

    def _is_loop(self, destination: tuple[str, int], client: socket.socket) -> bool:
        """Does ``destination`` (normalized) lead back into the relay itself?"""
        try:
            local = _normalize(client.getsockname()[:2])
        except OSError:
            return True
        return destination == local or destination in {s.bound for s in self._containers.values()}

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def _serve(self, state: _Container, client: socket.socket, peer: tuple[str, int]) -> None:
        container_id = state.container_id
        spec = state.upstream  # snapshot: a later swap does not touch this connection
        client_channel = SocketChannel(client)
        source = format_endpoint(*peer[:2])
        target = "?"
        tunnel: Tunnel | None = None
        finished = False
        try:
            try:
                destination = _normalize(self._original_dst(client))
            except (OSError, ValueError) as exc:
                logger.warning(
                    "container %s: %s: no usable original destination (%s); closing",
                    container_id,
                    source,
                    exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
                )
                return
            target = format_endpoint(*destination)
            if self._is_loop(destination, client):
                logger.warning(
                    "container %s: %s -> %s points at a relay listener; refused",
                    container_id,
                    source,
                    target,
                )
                return
            tls = self._tls_context() if spec.scheme is NetworkType.HTTPS else None
            tunnel = await open_tunnel(
                spec,
                destination,
                connect_timeout=self._connect_timeout,
                handshake_timeout=self._handshake_timeout,
                ssl_context=tls,
            )
            if tunnel.early_payload:
                await client_channel.send_all(tunnel.early_payload)
            sent, received = await pump(client_channel, tunnel.channel)
            finished = True
            logger.debug(
                "container %s: %s -> %s via %s done (%d bytes out, %d in)",
                container_id,
                source,
                target,
                spec.endpoint_url,
                sent,
                received,
            )
        except UpstreamError as exc:
            # A refused destination is the container's business; a proxy that is down
            # or rejects our credentials is the operator's.
            level = logging.INFO if isinstance(exc, UpstreamConnectRejected) else logging.WARNING
            if isinstance(exc, UpstreamAuthFailed):
                level = logging.ERROR
            logger.log(
                level,
                "container %s: %s -> %s via %s: %s",
                container_id,
                source,
                target,
                spec.endpoint_url,
                exc,
            )
        except OSError as exc:
            logger.debug("container %s: %s: connection ended: %s", container_id, source, exc)
        finally:
            channels: list[Channel] = [client_channel]
            if tunnel is not None:
                channels.append(tunnel.channel)
            await _finish(channels, orderly=finished)


def _closer(sock: socket.socket) -> Callable[[asyncio.Task[None]], None]:
    def close(_task: asyncio.Task[None]) -> None:
        sock.close()

    return close


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
