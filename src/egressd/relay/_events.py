"""Events shared by the sans-IO proxy handshakes (SOCKS5, HTTP CONNECT).

A handshake object is fed bytes with ``receive_data()`` and answers with a
list of events; it never touches a socket, so it can be tested step by step.
The I/O shell (:mod:`egressd.relay._upstream`) sends every :class:`SendBytes`
and stops once the handshake reports ``is_done``.

No concurrency here: these are plain values.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class SendBytes:
    """Bytes the handshake wants written to the proxy, in order."""

    data: bytes


@dataclass(frozen=True)
class Authenticated:
    """The proxy accepted us (no auth needed, or our credentials passed)."""


@dataclass(frozen=True)
class TunnelReady:
    """The proxy connected us to the destination.

    ``early_payload`` holds bytes that arrived after the proxy's reply in the
    same read: they already belong to the destination's stream and must be
    handed to the client before anything else.
    """

    early_payload: bytes


Event = SendBytes | Authenticated | TunnelReady


class ClientHandshake(Protocol):
    """What the I/O shell needs from a handshake."""

    def initiate(self) -> list[Event]: ...

    def receive_data(self, data: bytes) -> list[Event]: ...

    def receive_eof(self) -> None: ...

    @property
    def is_done(self) -> bool: ...


def format_endpoint(host: str, port: int) -> str:
    """``host:port`` with IPv6 literals in brackets, for messages and headers."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def pack_ip(host: str) -> tuple[int, bytes]:
    """``(4 or 6, packed address)`` of an IP literal, at C speed."""
    try:
        return 4, socket.inet_pton(socket.AF_INET, host)
    except OSError:
        pass
    try:
        return 6, socket.inet_pton(socket.AF_INET6, host)
    except OSError:
        raise ValueError(f"destination must be an IP address, got {host!r}") from None


def parse_ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Destinations are always IP literals: the relay never resolves names."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"destination must be an IP address, got {host!r}") from None


def errno_reason(exc: OSError) -> str:
    """The errno's text ("Connection refused"), not asyncio's wrapped message."""
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__
