"""Byte channels: the two ends a relayed connection moves bytes between.

A :class:`Channel` is one TCP connection seen as ``recv`` / ``send_all`` /
``shutdown_write`` / ``close`` / ``abort``: what the coroutine users need
(``https`` tunnels with the buffered :func:`pump`, DNS-over-TCP tunnels, the
probe). :class:`SocketChannel` wraps a plain non-blocking socket through the
event loop's low-level ``sock_*`` calls and exposes ``raw_socket`` (the DNS
pool peeks at it); TLS to an ``https`` proxy is
:class:`egressd.relay._tls.TlsChannel`, with the same shape. Plain relayed
connections do not use channels: see :mod:`egressd.relay._spliced`.

Also here: the TCP options of both legs (:func:`tune_tcp`, :func:`tune_keepalive`)
and the RST close (:func:`reset_socket`).

Concurrency model: a channel is driven by at most one reader task and one
writer task at a time (the two pump directions); ``close``/``abort`` are
called by the connection task after both have stopped or been cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Protocol

RECV_CHUNK = 64 * 1024
LINGER_RESET = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST

# Keepalive finds peers that vanished without FIN/RST (a container netns torn
# down, a proxy host rebooted) after ~2 minutes instead of the kernel's 2 hours.
KEEPALIVE_IDLE = 60
KEEPALIVE_INTERVAL = 15
KEEPALIVE_COUNT = 4


def tune_tcp(sock: socket.SocketType) -> None:
    """Options for a relay socket: listeners (accepted sockets inherit them), https
    and DNS proxy legs, DNS clients. Spliced proxy legs get NODELAY at once and
    keepalive later (``_spliced.KEEPALIVE_DELAY``).

    NODELAY: the relay forwards segments as they come; Nagle on top would
    add delayed-ACK stalls the original sender never asked for.
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tune_keepalive(sock)


def tune_keepalive(sock: socket.SocketType) -> None:
    """Keepalive after ``KEEPALIVE_IDLE`` seconds of silence (raises ``OSError``).

    The spliced path sets it on its proxy legs a moment after the connect,
    and only on those still open (most short connections are over by then):
    see :class:`egressd.relay._spliced.SpliceShared`.
    """
    setsockopt = sock.setsockopt
    setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, KEEPALIVE_IDLE)
    setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, KEEPALIVE_INTERVAL)
    setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, KEEPALIVE_COUNT)


def arm_reset(sock: socket.SocketType) -> None:
    """Make the coming ``close`` of ``sock`` send RST instead of FIN (best effort)."""
    if sock.fileno() != -1:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)


def reset_socket(sock: socket.SocketType) -> None:
    """Close ``sock`` with RST: the peer learns that something went wrong. Idempotent."""
    arm_reset(sock)
    sock.close()


class Channel(Protocol):
    """One leg of a relayed connection, as the pump and the handshakes see it."""

    @property
    def raw_socket(self) -> socket.socket | None:
        """The plain socket underneath, or None when bytes are transformed (TLS)."""
        ...

    async def recv(self, max_bytes: int = RECV_CHUNK) -> bytes:
        """Up to ``max_bytes``; ``b""`` at end of stream."""
        ...

    async def send_all(self, data: bytes) -> None: ...

    async def shutdown_write(self) -> None:
        """Half-close: the peer sees EOF, we can still receive."""
        ...

    async def close(self) -> None:
        """Orderly close (FIN). Idempotent."""
        ...

    def abort(self) -> None:
        """Close at once, signalling failure (RST where possible). Idempotent."""
        ...


class SocketChannel:
    """A plain TCP socket driven with ``loop.sock_recv`` / ``loop.sock_sendall``."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock

    @property
    def raw_socket(self) -> socket.socket | None:
        return self._sock

    async def recv(self, max_bytes: int = RECV_CHUNK) -> bytes:
        return await asyncio.get_running_loop().sock_recv(self._sock, max_bytes)

    async def send_all(self, data: bytes) -> None:
        await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def shutdown_write(self) -> None:
        # ENOTCONN when the peer already reset: the pump will see the error on read.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    async def close(self) -> None:
        self._sock.close()

    def abort(self) -> None:
        reset_socket(self._sock)
