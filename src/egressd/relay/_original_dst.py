"""Recover the destination a connection had before the kernel redirected it.

nftables ``redirect``/``dnat`` rewrites the destination of every TCP
connection from a container to its relay listener; conntrack remembers the
original, and ``getsockopt(SO_ORIGINAL_DST)`` on the accepted socket returns
it as a ``struct sockaddr_in`` / ``sockaddr_in6``:

    sockaddr_in   family(2, host order) port(2, big endian) addr(4) zero(8)   = 16 bytes
    sockaddr_in6  family(2) port(2, BE) flowinfo(4) addr(16) scope_id(4)     = 28 bytes

The byte parsing is pure (:func:`parse_sockaddr`); :func:`original_destination`
is the thin syscall shell. No concurrency: a blocking-free getsockopt.
"""

from __future__ import annotations

import ipaddress
import socket
import sys

from egressd.relay._sockets import socket_family

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value
_SOCKADDR_IN_LEN = 16
_SOCKADDR_IN6_LEN = 28


def parse_sockaddr(raw: bytes) -> tuple[str, int]:
    """``(ip, port)`` from a raw ``sockaddr_in`` or ``sockaddr_in6``."""
    if len(raw) < 4:
        raise ValueError(f"sockaddr too short ({len(raw)} bytes)")
    family = int.from_bytes(raw[:2], sys.byteorder)
    port = int.from_bytes(raw[2:4], "big")
    if family == socket.AF_INET and len(raw) >= 8:
        # inet_ntop: the text ipaddress gives for IPv4, without its cost (per connection).
        return socket.inet_ntop(socket.AF_INET, raw[4:8]), port
    if family == socket.AF_INET6 and len(raw) >= 24:
        return str(ipaddress.IPv6Address(raw[8:24])), port
    raise ValueError(f"unexpected sockaddr (family {family}, {len(raw)} bytes)")


def original_destination(sock: socket.SocketType) -> tuple[str, int]:
    """The pre-NAT destination of an accepted, redirected TCP connection.

    Raises ``OSError`` (ENOENT) when the connection was not NATed, i.e. it
    reached the listener directly.
    """
    if socket_family(sock) == socket.AF_INET6:
        raw = sock.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, _SOCKADDR_IN6_LEN)
    else:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, _SOCKADDR_IN_LEN)
    return parse_sockaddr(raw)
