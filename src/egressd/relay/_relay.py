"""The transparent TCP relay: one listener per container, one process for all.

Per accepted connection: read the pre-redirect destination
(``SO_ORIGINAL_DST``), refuse it if it points back at a relay listener,
open a tunnel through the container's upstream proxy to that destination
(by IP, never by name), hand over any early payload, then relay until both
directions are done. Orderly ends close with FIN; failures and
``remove_listener`` abort with RST so the peers learn something went wrong.

The client socket is not read until the tunnel is up: what the container
sends meanwhile waits in the kernel's receive buffer, nothing is lost.

Two data paths (see :mod:`egressd.relay._connections`): ``socks5`` and
``http`` upstreams relay with ``splice(2)`` in a callback-driven
:class:`SplicedConnection`; ``https`` upstreams need TLS in Python and run
one task per connection with the buffered :func:`pump`.

A container configured with DNS servers also gets a DNS endpoint (UDP and
TCP, :mod:`egressd.relay._dns`) next to its listener, asking those servers
through the same upstream.

Concurrency model: everything runs on one event loop. Each listener is
watched with ``loop.add_reader`` (for its whole life, but for a pause of
``_ACCEPT_RETRY_DELAY`` after running out of descriptors or memory); the
callback accepts what is pending and starts each connection at once. A
spliced connection is driven by the relay's :class:`EdgePoller` (no task); an ``https`` one is a
task in its container's :class:`TaskSet`. Each container keeps its
connections, so ``remove_listener`` aborts exactly those. Listener changes
are serialized by one lock. A connection takes a snapshot of the container's
upstream when it is accepted, so swapping the upstream only affects later
connections. The DNS endpoint's tasks are its own (see ``_dns``);
``remove_listener`` and ``close`` stop them too.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field

from egressd.model import NetworkType, ProxySpec
from egressd.relay._channel import reset_socket, tune_tcp
from egressd.relay._connections import (
    ConnectionStarter,
    ContainerConnections,
    OriginalDst,
)
from egressd.relay._dns import (
    DNS_PORT,
    DnsService,
    DnsSockets,
    ensure_dns_service,
    open_dns_sockets,
    parse_dns_server,
)
from egressd.relay._dns_resolver import DnsOptions
from egressd.relay._events import format_endpoint
from egressd.relay._original_dst import original_destination
from egressd.relay._sockets import normalize_address as _normalize
from egressd.relay._sockets import open_listen_socket, socket_family
from egressd.relay._upstream import Tunnel, open_tunnel

logger = logging.getLogger("egressd.relay")

_ACCEPT_RETRY_DELAY = 0.1
_ACCEPT_BATCH = 64  # per wake-up; the rest waits one loop iteration, so others get a turn
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


@dataclass(eq=False)
class _Container:
    container_id: str
    upstream: ProxySpec
    requested: tuple[str, int]
    listen_socket: socket.socket
    connections: ContainerConnections = field(repr=False)
    dns: DnsService | None = None
    accept_retry: asyncio.TimerHandle | None = field(default=None, repr=False)
    # Where ``listen_socket`` is bound (the kernel's pick for port 0), and whether that
    # is 0.0.0.0 / ::, where a client's local address can differ from ``bound``.
    bound: tuple[str, int] = field(init=False)
    wildcard: bool = field(init=False)

    def __post_init__(self) -> None:
        self.bind(self.requested, self.listen_socket)

    def bind(self, requested: tuple[str, int], listen_socket: socket.socket) -> None:
        self.requested, self.listen_socket = requested, listen_socket
        self.bound = _normalize(listen_socket.getsockname()[:2])
        self.wildcard = ipaddress.ip_address(self.bound[0]).is_unspecified


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
        socks5_pipelining: bool = True,
    ) -> None:
        """``socks5_pipelining``: send the SOCKS5 CONNECT request ahead of the
        proxy's method reply (see :mod:`egressd.relay._socks5`); saves a round
        trip per connection. Off for a proxy that drops bytes sent early."""
        self._connect_timeout = connect_timeout
        self._dns_options = dns_options or DnsOptions()
        self._handshake_timeout = handshake_timeout
        self._original_dst: OriginalDst = original_dst or original_destination
        self._ssl_context = ssl_context
        self._containers: dict[str, _Container] = {}
        # Every address a relay endpoint listens on (how many endpoints are bound there):
        # a destination among them is a loop. Kept per container, so that adding or
        # removing one costs the same at 10 containers as at 4000.
        self._own_endpoints: dict[tuple[str, int], int] = {}
        self._endpoints_of: dict[str, tuple[tuple[str, int], ...]] = {}
        self._starter = ConnectionStarter(
            connect_timeout=connect_timeout,
            handshake_timeout=handshake_timeout,
            tls_context=self._tls_context,
            socks5_pipelining=socks5_pipelining,
        )
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
            finally:
                self._claim_endpoints(container_id)

    def _add(
        self,
        container_id: str,
        upstream: ProxySpec,
        requested: tuple[str, int],
        listen_socket: socket.socket,
    ) -> _Container:
        state = _Container(
            container_id=container_id,
            upstream=upstream,
            requested=requested,
            listen_socket=listen_socket,
            connections=ContainerConnections(container_id),
        )
        bound = state.bound
        self._containers[container_id] = state
        self._claim_endpoints(container_id)  # before the first accept
        self._start_accepting(state)
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
        self._stop_accepting(state)
        state.bind(requested, listen_socket)
        bound = state.bound
        self._claim_endpoints(state.container_id)  # before the first accept
        self._start_accepting(state)
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
            await self._starter.close()

    async def _remove(self, container_id: str) -> None:
        state = self._containers.pop(container_id, None)
        if state is None:
            return
        self._stop_accepting(state)
        aborted = await state.connections.abort_all()
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
        self._claim_endpoints(container_id)

    def _claim_endpoints(self, container_id: str) -> None:
        """Record where ``container_id``'s endpoints are bound now (nowhere once removed)."""
        state = self._containers.get(container_id)
        now: tuple[tuple[str, int], ...] = ()
        if state is not None:
            now = (state.bound,) if state.dns is None else (state.bound, state.dns.bound)
        before = self._endpoints_of.pop(container_id, ())
        if now:
            self._endpoints_of[container_id] = now
        own = self._own_endpoints
        for endpoint in before:
            if own[endpoint] == 1:
                del own[endpoint]
            else:
                own[endpoint] -= 1
        for endpoint in now:
            own[endpoint] = own.get(endpoint, 0) + 1

    # -- accepting -------------------------------------------------------------------------

    def _start_accepting(self, state: _Container) -> None:
        # Accepted sockets inherit these options from the listener (Linux copies
        # them at accept), which saves five setsockopt calls per connection.
        tune_tcp(state.listen_socket)
        loop = asyncio.get_running_loop()
        loop.add_reader(
            state.listen_socket.fileno(), self._on_acceptable, state, state.listen_socket
        )

    def _stop_accepting(self, state: _Container) -> None:
        if state.accept_retry is not None:
            state.accept_retry.cancel()
            state.accept_retry = None
        if state.listen_socket.fileno() != -1:
            asyncio.get_running_loop().remove_reader(state.listen_socket.fileno())
        state.listen_socket.close()

    def _on_acceptable(self, state: _Container, listen_socket: socket.socket) -> None:
        # socket.accept() without its Python wrapper: that one converts the listener's
        # family and type to enums and asks for the default timeout, every time.
        accept = listen_socket._accept  # type: ignore[attr-defined]
        family = socket_family(listen_socket)
        for _ in range(_ACCEPT_BATCH):
            try:
                fd, peer = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in _RESOURCE_ERRNOS:
                    logger.debug("container %s: accept failed: %s", state.container_id, exc)
                    continue
                # Out of descriptors/memory: back off instead of spinning; the pending
                # connections stay in the backlog until we can take them.
                logger.warning("container %s: accept failed: %s", state.container_id, exc)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listen_socket.fileno())
                state.accept_retry = loop.call_later(
                    _ACCEPT_RETRY_DELAY, self._resume_accepting, state, listen_socket
                )
                return
            try:
                # The C socket type: socket.socket's Python layer costs three calls
                # (__init__, close, _real_close) per connection and adds nothing here.
                client = _socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except BaseException:
                os.close(fd)
                raise
            try:
                self._accepted(state, client, peer)
            except Exception:
                logger.exception("container %s: cannot relay a connection", state.container_id)
                reset_socket(client)

    def _resume_accepting(self, state: _Container, listen_socket: socket.socket) -> None:
        state.accept_retry = None
        if state.listen_socket is listen_socket and listen_socket.fileno() != -1:
            asyncio.get_running_loop().add_reader(
                listen_socket.fileno(), self._on_acceptable, state, listen_socket
            )

    # -- connections -----------------------------------------------------------------------

    @staticmethod
    def _is_wildcard_loop(destination: tuple[str, int], client: socket.SocketType) -> bool:
        """Is ``destination`` (normalized) the address a wildcard listener took ``client``
        on? That, and the relay's own endpoints, lead back into the relay itself."""
        try:
            return destination == _normalize(client.getsockname()[:2])
        except OSError:
            return True

    def _accepted(
        self, state: _Container, client: socket.SocketType, peer: tuple[str, int]
    ) -> None:
        container_id = state.container_id
        client.setblocking(False)
        try:
            destination = _normalize(self._original_dst(client))
        except (OSError, ValueError) as exc:
            logger.warning(
                "container %s: %s: no usable original destination (%s); closing",
                container_id,
                format_endpoint(*peer[:2]),
                exc.strerror if isinstance(exc, OSError) and exc.strerror else exc,
            )
            reset_socket(client)
            return
        if destination in self._own_endpoints or (
            state.wildcard and self._is_wildcard_loop(destination, client)
        ):
            logger.warning(
                "container %s: %s -> %s points at a relay listener; refused",
                container_id,
                format_endpoint(*peer[:2]),
                format_endpoint(*destination),
            )
            reset_socket(client)
            return
        self._starter.start(
            container_id=container_id,
            upstream=state.upstream,  # snapshot: a later swap does not touch this connection
            registry=state.connections,
            client=client,
            peer=peer,
            destination=destination,
        )

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
