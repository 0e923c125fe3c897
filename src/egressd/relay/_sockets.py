"""Listening sockets of the relay: TCP listeners and UDP endpoints.

Both get ``SO_REUSEADDR`` (rebind at once after a restart despite TIME_WAIT
connections) and ``IP_FREEBIND`` (the socket may open before, or while, the
dataplane adds the address to the bridge). IPv6 sockets are v6-only so a
v4 and a v6 listener on the same port never collide. Failures become
:class:`egressd.errors.KernelError` carrying the errno.

No concurrency: plain blocking-free socket calls.
"""

from __future__ import annotations

import _socket
import functools
import ipaddress
import socket

from egressd.errors import KernelError
from egressd.relay._events import format_endpoint

ProxyAddress = tuple[int, tuple[str, int]]  # (family, sockaddr) to connect to a proxy
# A socket's family as a plain int: ``socket.family`` makes an enum of it on every call.
socket_family = _socket.socket.family.__get__
IP_FREEBIND = 15  # linux/in.h: bind to an address not (yet) configured on any interface
LISTEN_BACKLOG = 1024


@functools.lru_cache(maxsize=4096)
def _canonical_ip(host: str) -> str:
    return str(ipaddress.ip_address(host))


def normalize_address(address: tuple[str, int]) -> tuple[str, int]:
    """``(canonical IP text, port)``; ValueError for anything but an IP literal.

    Cached: the relay normalizes every connection's original destination.
    """
    return _canonical_ip(address[0]), int(address[1])


def _bound_socket(address: tuple[str, int], kind: socket.SocketKind, what: str) -> socket.socket:
    family = socket.AF_INET6 if ipaddress.ip_address(address[0]).version == 6 else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        if kind == socket.SOCK_STREAM:
            sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise KernelError(
            f"relay cannot {what} on {format_endpoint(*address)}: {exc.strerror}",
            errno=exc.errno,
        ) from None
    return sock


def open_listen_socket(address: tuple[str, int]) -> socket.socket:
    """A non-blocking listening TCP socket; ``KernelError`` (with errno) on failure."""
    return _bound_socket(address, socket.SOCK_STREAM, "listen")


def open_udp_socket(address: tuple[str, int]) -> socket.socket:
    """A non-blocking bound UDP socket; ``KernelError`` (with errno) on failure."""
    return _bound_socket(address, socket.SOCK_DGRAM, "bind UDP")
