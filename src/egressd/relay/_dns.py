"""Per-container DNS endpoints: UDP and TCP port 53 at the relay's address.

nftables DNATs every DNS packet and connection of a container (to any
address) here; whatever resolver the container's ``/etc/resolv.conf``
names, the answer comes from its :class:`DnsResolver`, i.e. from its
configured servers through its upstream proxy.

* UDP: one datagram, one query. Malformed queries are dropped, or answered
  FORMERR/NOTIMP when the header is readable and it is a query. Answers
  larger than the client accepts (512 bytes, or its EDNS0 size) go back
  truncated (header + question, TC=1): the client retries over TCP.
* TCP: length-prefixed queries, several per connection, answered in order;
  an idle connection is closed after ``tcp_idle_timeout``; messages are
  bounded by ``max_query_size``.

Concurrency model: everything runs on the relay's event loop. The UDP
endpoint is an asyncio datagram protocol: its callback answers cache hits
and malformed queries synchronously and starts one task per other query
(at most ``max_inflight``; beyond that SERVFAIL at once). The TCP listener
has one accept task and one task per client connection (at most
``max_tcp_clients``; more are closed at once); a client's queries are
handled one after the other by its task. All these tasks live in the
listener's :class:`TaskSet`\\ s, so ``close`` cancels exactly this
container's DNS work and returns when it has stopped.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from egressd.errors import KernelError
from egressd.model import ProxySpec
from egressd.relay._channel import SocketChannel, tune_tcp
from egressd.relay._dns_pool import Dialer, DnsStream, DnsStreamError
from egressd.relay._dns_resolver import DnsOptions, DnsResolver
from egressd.relay._dns_wire import BadQuery, Query, fit_udp, parse_query, servfail
from egressd.relay._events import format_endpoint
from egressd.relay._sockets import normalize_address, open_listen_socket, open_udp_socket
from egressd.relay._tasks import TaskSet

logger = logging.getLogger("egressd.relay.dns")

DNS_PORT = 53
UdpPeer = tuple[str | Any, int]  # as asyncio's DatagramProtocol types it
_PORT_ATTEMPTS = 16  # port 0: find one free for both UDP and TCP
_ACCEPT_RETRY_DELAY = 0.1


def parse_dns_server(value: str) -> tuple[str, int]:
    """``"1.1.1.1"`` -> ``("1.1.1.1", 53)``; ``"[::1]:5353"`` / ``"127.0.0.1:5353"`` keep
    their port (tests, resolvers on other ports). Names are refused: never resolved."""
    if not isinstance(value, str):
        raise ValueError(f"DNS server must be a string, got {type(value).__name__}")
    try:
        return str(ipaddress.ip_address(value)), DNS_PORT
    except ValueError:
        pass
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and 0 < int(port) <= 65535:
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        elif ":" in host:
            host = ""  # a bare IPv6 literal with a port suffix is ambiguous
        try:
            return str(ipaddress.ip_address(host)), int(port)
        except ValueError:
            pass
    raise ValueError(f"DNS server must be an IP address (optionally with a port): {value!r}")


@dataclass
class DnsSockets:
    """The UDP endpoint and TCP listener of one DNS address, before serving."""

    udp: socket.socket
    tcp: socket.socket
    bound: tuple[str, int]

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


def open_dns_sockets(address: tuple[str, int]) -> DnsSockets:
    """UDP and TCP bound to the same address; port 0 finds one free for both."""
    attempts = _PORT_ATTEMPTS if address[1] == 0 else 1
    for _ in range(attempts):
        udp = open_udp_socket(address)
        bound = normalize_address(udp.getsockname()[:2])
        try:
            tcp = open_listen_socket(bound)
        except KernelError as exc:
            udp.close()
            if address[1] == 0 and exc.errno == errno.EADDRINUSE:
                continue
            raise
        return DnsSockets(udp=udp, tcp=tcp, bound=bound)
    raise KernelError(
        f"relay found no port free for both UDP and TCP on {address[0]}", errno=errno.EADDRINUSE
    )


class _UdpProtocol(asyncio.DatagramProtocol):
    def __init__(self, listener: DnsListener) -> None:
        self._listener = listener
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: UdpPeer) -> None:
        self._listener.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug("container %s: DNS UDP error: %s", self._listener.container_id, exc)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


class DnsListener:
    """UDP and TCP DNS at one address, answering through ``resolver``."""

    def __init__(
        self,
        *,
        container_id: str,
        sockets: DnsSockets,
        resolver: DnsResolver,
        options: DnsOptions,
    ) -> None:
        self.container_id = container_id
        self.bound = sockets.bound
        self._sockets = sockets
        self._resolver = resolver
        self._options = options
        self._accepting = TaskSet(f"relay dns accept {container_id}", logger=logger)
        self._udp_queries = TaskSet(f"relay dns udp {container_id}", logger=logger)
        self._tcp_clients = TaskSet(f"relay dns tcp {container_id}", logger=logger)
        self._transport: asyncio.DatagramTransport | None = None
        self._protocol: _UdpProtocol | None = None

    @property
    def active(self) -> int:
        """UDP queries being resolved plus open TCP client connections."""
        return len(self._udp_queries) + len(self._tcp_clients)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self._transport, self._protocol = await loop.create_datagram_endpoint(
                lambda: _UdpProtocol(self), sock=self._sockets.udp
            )
        except BaseException:
            self._sockets.close()
            raise
        self._accepting.spawn(
            self._accept_loop(), name=f"relay-dns-accept-{self.container_id[:12]}"
        )

    async def close(self) -> None:
        if self._transport is not None:
            self._transport.close()  # stops reading at once; the socket closes next
        await self._accepting.cancel_all()
        self._sockets.tcp.close()
        await self._udp_queries.cancel_all()
        await self._tcp_clients.cancel_all()
        if self._protocol is not None:
            await self._protocol.closed
        else:
            self._sockets.udp.close()

    # -- UDP -------------------------------------------------------------------------------

    def on_datagram(self, data: bytes, addr: UdpPeer) -> None:
        if len(data) > self._options.max_query_size:
            return
        try:
            query = parse_query(data)
        except BadQuery as exc:
            logger.debug("container %s: bad DNS query over UDP: %s", self.container_id, exc)
            if exc.reply is not None:
                self._send(exc.reply, addr)
            return
        hit = self._resolver.cached(query)
        if hit is not None:
            self._send(fit_udp(hit, query), addr)
            return
        if len(self._udp_queries) >= self._options.max_inflight:
            self._send(servfail(query), addr)
            return
        self._udp_queries.spawn(
            self._answer_udp(query, addr),
            name=f"relay-dns-udp-{self.container_id[:12]}",
        )

    async def _answer_udp(self, query: Query, addr: UdpPeer) -> None:
        reply = await self._resolver.answer(query)
        self._send(fit_udp(reply, query), addr)

    def _send(self, data: bytes, addr: UdpPeer) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.sendto(data, addr)

    # -- TCP -------------------------------------------------------------------------------

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, peer = await loop.sock_accept(self._sockets.tcp)
            except OSError as exc:
                logger.warning("container %s: DNS accept failed: %s", self.container_id, exc)
                await asyncio.sleep(_ACCEPT_RETRY_DELAY)
                continue
            tune_tcp(client)
            if len(self._tcp_clients) >= self._options.max_tcp_clients:
                logger.debug("container %s: too many DNS TCP clients", self.container_id)
                client.close()
                continue
            task = self._tcp_clients.spawn(
                self._serve_tcp(client),
                name=f"relay-dns-tcp-{self.container_id[:12]}-{format_endpoint(*peer[:2])}",
            )
            # A task cancelled before its first step never runs its finally.
            task.add_done_callback(_closer(client))

    async def _serve_tcp(self, client: socket.socket) -> None:
        stream = DnsStream(SocketChannel(client))
        idle = self._options.tcp_idle_timeout
        orderly = False
        try:
            while True:
                try:
                    async with asyncio.timeout(idle):
                        message = await stream.read_message(max_size=self._options.max_query_size)
                except TimeoutError:
                    message = None  # idle: close (RFC 7766 §6.2.3)
                if message is None:
                    orderly = True
                    return
                try:
                    reply = await self._resolver.answer(parse_query(message))
                except BadQuery as exc:
                    logger.debug("container %s: bad DNS query over TCP: %s", self.container_id, exc)
                    if exc.reply is None:
                        return
                    reply = exc.reply
                async with asyncio.timeout(idle):
                    await stream.write_message(reply)
        except (OSError, DnsStreamError, TimeoutError) as exc:
            logger.debug("container %s: DNS TCP client: %s", self.container_id, exc)
        finally:
            if orderly:
                await stream.close()
            else:
                stream.abort()


def _closer(sock: socket.socket) -> Callable[[asyncio.Task[None]], None]:
    def close(_task: asyncio.Task[None]) -> None:
        sock.close()

    return close


class DnsService:
    """One container's DNS: a resolver, served by a listener at one address."""

    def __init__(
        self,
        *,
        resolver: DnsResolver,
        listener: DnsListener,
        requested: tuple[str, int],
        options: DnsOptions,
    ) -> None:
        self.resolver = resolver
        self._options = options
        self.listener = listener
        self.requested = requested

    @property
    def bound(self) -> tuple[str, int]:
        return self.listener.bound

    @classmethod
    async def start(
        cls,
        *,
        container_id: str,
        sockets: DnsSockets,
        requested: tuple[str, int],
        upstream: ProxySpec,
        servers: Sequence[tuple[str, int]],
        dial: Dialer,
        options: DnsOptions,
    ) -> DnsService:
        """Serve on ``sockets`` (ownership passes here, also on failure)."""
        resolver = DnsResolver(
            container_id=container_id,
            upstream=upstream,
            servers=tuple(servers),
            dial=dial,
            options=options,
        )
        listener = DnsListener(
            container_id=container_id, sockets=sockets, resolver=resolver, options=options
        )
        await listener.start()
        return cls(resolver=resolver, listener=listener, requested=requested, options=options)

    async def move(self, sockets: DnsSockets, requested: tuple[str, int]) -> None:
        """Serve on new sockets, then close the old ones (their queries are cancelled)."""
        listener = DnsListener(
            container_id=self.resolver.container_id,
            sockets=sockets,
            resolver=self.resolver,
            options=self._options,
        )
        await listener.start()
        old, self.listener, self.requested = self.listener, listener, requested
        await old.close()

    async def configure(self, *, upstream: ProxySpec, servers: Sequence[tuple[str, int]]) -> bool:
        return await self.resolver.configure(upstream=upstream, servers=tuple(servers))

    async def close(self) -> None:
        await self.listener.close()
        await self.resolver.close()


async def ensure_dns_service(
    current: DnsService | None,
    *,
    container_id: str,
    requested: tuple[str, int] | None,
    sockets: DnsSockets | None,
    upstream: ProxySpec,
    servers: tuple[tuple[str, int], ...],
    dial: Dialer,
    options: DnsOptions,
) -> DnsService | None:
    """Bring a container's DNS service in line with its configuration.

    ``requested=None`` closes it. ``sockets`` are the newly opened sockets
    when the service is new or moves (ownership passes here, also on
    failure); ``None`` when it stays where it is. On failure the service is
    left as it was.
    """
    asks = ", ".join(format_endpoint(*server) for server in servers)
    if requested is None:
        if sockets is not None:
            sockets.close()
        if current is not None:
            await current.close()
            logger.info(
                "container %s: DNS on %s closed", container_id, format_endpoint(*current.bound)
            )
        return None
    if current is None:
        if sockets is None:
            raise ValueError("a new DNS service needs its sockets")
        service = await DnsService.start(
            container_id=container_id,
            sockets=sockets,
            requested=requested,
            upstream=upstream,
            servers=servers,
            dial=dial,
            options=options,
        )
        logger.info(
            "container %s: DNS on %s asks %s via %s",
            container_id,
            format_endpoint(*service.bound),
            asks,
            upstream.endpoint_url,
        )
        return service
    if sockets is not None:
        old = current.bound
        await current.move(sockets, requested)
        logger.info(
            "container %s: DNS moved from %s to %s",
            container_id,
            format_endpoint(*old),
            format_endpoint(*current.bound),
        )
    if await current.configure(upstream=upstream, servers=servers):
        logger.info(
            "container %s: DNS now asks %s via %s (cache emptied)",
            container_id,
            asks,
            upstream.endpoint_url,
        )
    return current
