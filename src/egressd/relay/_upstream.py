"""Dial an upstream proxy and open a tunnel through it to one destination.

Steps, each bounded: TCP connect to the proxy (``connect_timeout``, which
includes resolving a proxy host name; destinations are never resolved),
then TLS for ``https`` proxies and the SOCKS5 / HTTP CONNECT handshake
(``handshake_timeout``). Failures become :class:`egressd.errors.UpstreamError`
subclasses whose messages name the proxy by endpoint only, never by
credentials.

TLS: the caller may pass an :class:`ssl.SSLContext` (a per-config CA bundle
or a verification opt-out later); without one, the system trust store
verifies the proxy's certificate against ``spec.host``.

Concurrency model: coroutines run inside the connection task that calls
them; cancelling that task closes whatever socket was opened so far.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
from dataclasses import dataclass

from egressd.errors import UpstreamProtocolError, UpstreamUnreachable
from egressd.model import NetworkType, ProxySpec
from egressd.relay._channel import RECV_CHUNK, Channel, SocketChannel, tune_tcp
from egressd.relay._errors import (
    CLOSED_DURING_HANDSHAKE,
    cannot_connect,
    cannot_resolve,
    connect_timed_out,
    connection_broke,
    handshake_timed_out,
)
from egressd.relay._events import (
    ClientHandshake,
    SendBytes,
    TunnelReady,
    format_endpoint,
)
from egressd.relay._http_connect import HttpConnectHandshake
from egressd.relay._sockets import ProxyAddress
from egressd.relay._socks5 import Socks5Handshake
from egressd.relay._tls import TlsChannel


@dataclass
class Tunnel:
    """An established tunnel: bytes written to ``channel`` reach the destination."""

    channel: Channel
    early_payload: bytes


def proxy_label(spec: ProxySpec) -> str:
    """How messages name the proxy: scheme and endpoint, no credentials."""
    return f"{spec.scheme.value} proxy {format_endpoint(spec.host, spec.port)}"


def make_handshake(
    spec: ProxySpec,
    destination: tuple[str, int] | None,
    *,
    pipeline: bool = False,
    label: str | None = None,
) -> ClientHandshake:
    """The handshake for ``spec``; ``destination=None`` (SOCKS5 only) stops after auth.

    ``pipeline``: SOCKS5 sends its CONNECT request ahead of the replies where
    the answer cannot change it (see :mod:`egressd.relay._socks5`). ``label``:
    :func:`proxy_label`, if the caller has it already.
    """
    label = label if label is not None else proxy_label(spec)
    if spec.scheme is NetworkType.SOCKS5:
        return Socks5Handshake(
            destination=destination,
            username=spec.username,
            password=spec.password,
            proxy_label=label,
            pipeline=pipeline,
        )
    if spec.scheme in (NetworkType.HTTP, NetworkType.HTTPS):
        if destination is None:
            raise ValueError("HTTP CONNECT always needs a destination")
        return HttpConnectHandshake(
            destination=destination,
            username=spec.username,
            password=spec.password,
            proxy_label=label,
        )
    raise ValueError(f"no upstream handshake for network type {spec.scheme.value!r}")


async def connect_proxy(spec: ProxySpec, *, timeout: float) -> socket.socket:
    """A connected non-blocking TCP socket to the proxy, or :class:`UpstreamUnreachable`."""
    loop = asyncio.get_running_loop()
    label = proxy_label(spec)
    last_error: OSError | None = None
    try:
        async with asyncio.timeout(timeout):
            for family, address in await proxy_addresses(spec):
                sock = socket.socket(family, socket.SOCK_STREAM)
                try:
                    sock.setblocking(False)
                    await loop.sock_connect(sock, address)
                except OSError as exc:
                    sock.close()
                    last_error = exc
                    continue
                except BaseException:
                    sock.close()
                    raise
                tune_tcp(sock)
                return sock
    except TimeoutError:
        raise connect_timed_out(label, timeout) from None
    except socket.gaierror as exc:
        raise cannot_resolve(label, exc.strerror or str(exc)) from None
    raise cannot_connect(label, last_error) from None


def literal_addresses(host: str, port: int) -> tuple[ProxyAddress, ...] | None:
    """The proxy's one address if ``host`` is an IP literal; None for a name."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    return ((family, (str(address), port)),)


async def proxy_addresses(spec: ProxySpec) -> tuple[ProxyAddress, ...]:
    """Where to connect to reach the proxy: its IP literal, or its name looked up."""
    literal = literal_addresses(spec.host, spec.port)
    if literal is not None:
        return literal
    infos = await asyncio.get_running_loop().getaddrinfo(
        spec.host, spec.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    return tuple((family, (str(sockaddr[0]), int(sockaddr[1]))) for family, *_, sockaddr in infos)


async def _start_tls(
    sock: socket.socket, spec: ProxySpec, ssl_context: ssl.SSLContext | None
) -> TlsChannel:
    context = ssl_context if ssl_context is not None else ssl.create_default_context()
    try:
        return await TlsChannel.connect(sock, context=context, server_hostname=spec.host)
    except ssl.SSLError as exc:
        raise UpstreamUnreachable(f"TLS to {proxy_label(spec)} failed: {exc}") from None


async def drive_handshake(handshake: ClientHandshake, channel: Channel) -> bytes:
    """Run ``handshake`` over ``channel`` until done; returns the early payload."""
    early = b""
    events = handshake.initiate()
    while True:
        for event in events:
            if isinstance(event, SendBytes):
                await channel.send_all(event.data)
            elif isinstance(event, TunnelReady):
                early = event.early_payload
        if handshake.is_done:
            return early
        data = await channel.recv(RECV_CHUNK)
        if not data:
            handshake.receive_eof()
            raise UpstreamProtocolError(CLOSED_DURING_HANDSHAKE)
        events = handshake.receive_data(data)


async def dial(
    spec: ProxySpec,
    handshake: ClientHandshake,
    *,
    connect_timeout: float,
    handshake_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Tunnel:
    """Connect to the proxy and run ``handshake``; on any failure nothing stays open."""
    sock = await connect_proxy(spec, timeout=connect_timeout)
    label = proxy_label(spec)
    channel: Channel | None = None
    try:
        async with asyncio.timeout(handshake_timeout):
            if spec.scheme is NetworkType.HTTPS:
                channel = await _start_tls(sock, spec, ssl_context)
            else:
                channel = SocketChannel(sock)
            early = await drive_handshake(handshake, channel)
    except BaseException as exc:
        if channel is not None:
            channel.abort()
        else:
            sock.close()
        if isinstance(exc, TimeoutError):
            raise handshake_timed_out(label, handshake_timeout) from None
        if isinstance(exc, OSError):
            raise connection_broke(label, exc) from None
        raise
    return Tunnel(channel=channel, early_payload=early)


async def open_tunnel(
    spec: ProxySpec,
    destination: tuple[str, int],
    *,
    connect_timeout: float,
    handshake_timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> Tunnel:
    """A tunnel through ``spec`` to ``destination`` (an IP literal and port)."""
    return await dial(
        spec,
        make_handshake(spec, destination),
        connect_timeout=connect_timeout,
        handshake_timeout=handshake_timeout,
        ssl_context=ssl_context,
    )
