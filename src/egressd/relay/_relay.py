"""The transparent TCP relay: one listener per container, one process for all.

Per accepted connection: read the pre-redirect destination
(``SO_ORIGINAL_DST``), refuse it if it points back at a relay listener,
open a tunnel through the container's upstream proxy to that destination
(by IP, never by name), hand over any early payload, then :func:`pump`
until both directions are done. Orderly ends close with FIN; failures and
``remove_listener`` abort with RST so the peers learn something went wrong.

The client socket is not read until the tunnel is up: what the container
sends meanwhile waits in the kernel's receive buffer, nothing is lost.

A container configured with DNS servers also gets a DNS endpoint (UDP and
TCP, :mod:`egressd.relay._dns`) next to its listener, asking those servers
through the same upstream.

Concurrency model: everything runs on one event loop. Each listener has one
accept task (in the relay's :class:`TaskSet`); each connection has one task
(in its container's :class:`TaskSet`, so ``remove_listener`` can abort
exactly that container's connections). Listener changes are serialized by
one lock. A connection takes a snapshot of the container's upstream when it
is accepted, so swapping the upstream only affects later connections.
The DNS endpoint's tasks are its own (see ``_dns``); ``remove_listener``
and ``close`` stop them too.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from egressd.errors import UpstreamAuthFailed, UpstreamError
from egressd.model import NetworkType, ProxySpec
from egressd.relay._channel import Channel, SocketChannel, tune_tcp
from egressd.relay._dns import (
    DNS_PORT,
    DnsService,
    DnsSockets,
    ensure_dns_service,
    open_dns_sockets,
    parse_dns_server,
)
from egressd.relay._dns_resolver import DnsOptions
from egressd.relay._errors import UpstreamConnectRejected
from egressd.relay._events import format_endpoint
from egressd.relay._original_dst import original_destination
from egressd.relay._pump import pump
from egressd.relay._sockets import normalize_address as _normalize
from egressd.relay._sockets import open_listen_socket
from egressd.relay._tasks import TaskSet
from egressd.relay._upstream import Tunnel, open_tunnel

logger = logging.getLogger("egressd.relay")

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
    dns: DnsService | None = None


class Relay:
    """Transparent relay for every container on the host."""

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        handshake_timeout: float = 10.0,
        original_dst: OriginalDst | None = None,
        ssl_context: ssl.SSLContext | None = None,
        dns_options: DnsOptions | None = None,
    ) -> None:
        self._connect_timeout = connect_timeout
        self._dns_options = dns_options or DnsOptions()
        self._handshake_timeout = handshake_timeout
        self._original_dst: OriginalDst = original_dst or original_destination
        self._ssl_context = ssl_context
        self._containers: dict[str, _Container] = {}
        self._accept_tasks = TaskSet("relay listeners", logger=logger)
        self._lock = asyncio.Lock()
        self._closed = False

    # -- listeners -------------------------------------------------------------------------

    async def ensure_listener(
        self,
        *,
        container_id: str,
        listen_ip: str,
        port: int,
        upstream: ProxySpec,
        dns_servers: Sequence[str] = (),
        dns_port: int = DNS_PORT,
    ) -> None:
        """Listen for ``container_id`` at (listen_ip, port) relaying via ``upstream``.

        Idempotent. Same address: only the upstream is swapped (new connections
        use it; open ones keep theirs). Other address: the new listener opens,
        then the old one closes; open connections carry on. ``port=0`` lets the
        kernel pick (tests); ``listener_addresses()`` tells which. A bind failure
        raises :class:`KernelError` with the errno and leaves things as they were.
        Call from the event loop the relay runs on.

        With ``dns_servers`` (IP literals; ``ip:port`` / ``[ip6]:port`` also
        accepted), a DNS endpoint (UDP and TCP) also serves at (listen_ip,
        dns_port), asking those servers in order through ``upstream``;
        ``dns_addresses()`` tells where. Calling again swaps servers and
        upstream in place for new queries and empties the cache; without
        ``dns_servers`` the DNS endpoint is closed.
        """
        if not upstream.scheme.is_proxy:
            raise ValueError(f"upstream of type {upstream.scheme.value!r} cannot be relayed")
        if not 0 <= port <= 65535:
            raise ValueError(f"listener port out of range: {port}")
        if isinstance(dns_servers, str):
            raise TypeError("dns_servers must be a sequence of addresses, not one string")
        servers = tuple(parse_dns_server(server) for server in dns_servers)
        if not 0 <= dns_port <= 65535:
            raise ValueError(f"DNS port out of range: {dns_port}")
        requested = _normalize((listen_ip, port))
        dns_requested = _normalize((listen_ip, dns_port)) if servers else None
        async with self._lock:
            if self._closed:
                raise RuntimeError("relay is closed")
            state = self._containers.get(container_id)
            # Open every new socket before changing anything, so that a bind
            # failure leaves the container exactly as it was.
            listen_socket: socket.socket | None = None
            dns_sockets: DnsSockets | None = None
            try:
                if state is None or state.requested != requested:
                    listen_socket = open_listen_socket(requested)
                if dns_requested is not None and (
                    state is None or state.dns is None or state.dns.requested != dns_requested
                ):
                    dns_sockets = open_dns_sockets(dns_requested)
                if state is None:
                    assert listen_socket is not None
                    state = self._add(container_id, upstream, requested, listen_socket)
                else:
                    if listen_socket is not None:
                        await self._move(state, requested, listen_socket)
                    self._swap_upstream(state, upstream)
                listen_socket = None  # handed over
                sockets, dns_sockets = dns_sockets, None  # handed over (closed on failure)
                state.dns = await ensure_dns_service(
                    state.dns,
                    container_id=container_id,
                    requested=dns_requested,
                    sockets=sockets,
                    upstream=state.upstream,
                    servers=servers,
                    dial=self._dial_dns,
                    options=self._dns_options,
                )
            except BaseException:
                if listen_socket is not None:
                    listen_socket.close()
                if dns_sockets is not None:
                    dns_sockets.close()
                raise

    def _add(
        self,
        container_id: str,
        upstream: ProxySpec,
        requested: tuple[str, int],
        listen_socket: socket.socket,
    ) -> _Container:
        bound = _normalize(listen_socket.getsockname()[:2])
        state = _Container(
            container_id=container_id,
            upstream=upstream,
            requested=requested,
            bound=bound,
            listen_socket=listen_socket,
            accept_task=self._spawn_accept(container_id, listen_socket),
            connections=TaskSet(f"relay {container_id}", logger=logger),
        )
        self._containers[container_id] = state
        logger.info(
            "container %s: listening on %s via %s",
            container_id,
            format_endpoint(*bound),
            upstream.endpoint_url,
        )
        return state

    async def _move(
        self, state: _Container, requested: tuple[str, int], listen_socket: socket.socket
    ) -> None:
        # The new listener is already open; close the old one. Open connections
        # stay tracked under the container and finish naturally.
        old = state.bound
        await self._stop_accepting(state)
        bound = _normalize(listen_socket.getsockname()[:2])
        state.requested, state.bound, state.listen_socket = requested, bound, listen_socket
        state.accept_task = self._spawn_accept(state.container_id, listen_socket)
        logger.info(
            "container %s: listener moved from %s to %s",
            state.container_id,
            format_endpoint(*old),
            format_endpoint(*bound),
        )

    def _swap_upstream(self, state: _Container, upstream: ProxySpec) -> None:
        if state.upstream == upstream:
            return
        logger.info(
            "container %s: new connections now go via %s (was %s)",
            state.container_id,
            upstream.endpoint_url,
            state.upstream.endpoint_url,
        )
        state.upstream = upstream

    async def remove_listener(self, container_id: str) -> None:
        """Close the listener and abort its open connections. Idempotent."""
        async with self._lock:
            await self._remove(container_id)

    def listener_addresses(self) -> dict[str, tuple[str, int]]:
        return {cid: state.bound for cid, state in self._containers.items()}

    def dns_addresses(self) -> dict[str, tuple[str, int]]:
        """Where each container's DNS endpoint (UDP and TCP) is bound."""
        return {
            cid: state.dns.bound for cid, state in self._containers.items() if state.dns is not None
        }

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
        if state.dns is not None:
            dns, state.dns = state.dns, None
            await dns.close()
            logger.info("container %s: DNS on %s closed", container_id, format_endpoint(*dns.bound))
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
        if destination == local:
            return True
        for state in self._containers.values():
            if destination == state.bound or (
                state.dns is not None and destination == state.dns.bound
            ):
                return True
        return False

    def _tls_context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context

    async def _dial_dns(self, spec: ProxySpec, server: tuple[str, int]) -> Tunnel:
        """A tunnel to a DNS server; the resolver bounds it by its own attempt deadline."""
        tls = self._tls_context() if spec.scheme is NetworkType.HTTPS else None
        return await open_tunnel(
            spec,
            server,
            connect_timeout=self._connect_timeout,
            handshake_timeout=self._handshake_timeout,
            ssl_context=tls,
        )

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
