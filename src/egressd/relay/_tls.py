"""TLS to an ``https`` proxy over a plain socket, with real half-close.

asyncio's own TLS transport cannot half-close (``write_eof`` is not
supported), which would leave a tunnel open until the destination times out
whenever the client closes first. So this channel drives OpenSSL through
:class:`ssl.MemoryBIO` itself: ciphertext moves with ``loop.sock_recv`` /
``loop.sock_sendall``, and ``shutdown_write`` sends ``close_notify`` and
then ``shutdown(SHUT_WR)`` while reading carries on until the proxy ends its
side.

Concurrency model: like every channel, at most one task receives and one
task sends at a time. Both may produce ciphertext (a read can owe the peer
a TLS message), so taking bytes out of the outgoing BIO and writing them to
the socket happens under one lock, which keeps records in order. Only the
receiving task feeds the incoming BIO.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl

from egressd.relay._channel import RECV_CHUNK, reset_socket


class TlsChannel:
    """A TLS client connection on a connected non-blocking socket."""

    def __init__(
        self,
        sock: socket.socket,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
    ) -> None:
        self._sock = sock
        self._tls = tls
        self._incoming = incoming
        self._outgoing = outgoing
        self._send_lock = asyncio.Lock()
        self._write_closed = False

    @classmethod
    async def connect(
        cls, sock: socket.socket, *, context: ssl.SSLContext, server_hostname: str
    ) -> TlsChannel:
        """Run the TLS handshake on ``sock``. Raises ``ssl.SSLError`` / ``OSError``.

        The caller keeps ownership of ``sock`` until this returns.
        """
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = context.wrap_bio(
            incoming, outgoing, server_side=False, server_hostname=server_hostname
        )
        channel = cls(sock, tls, incoming, outgoing)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await channel._flush()
                await channel._fill()
        await channel._flush()
        return channel

    @property
    def raw_socket(self) -> socket.socket | None:
        return None  # the bytes on the wire are ciphertext: no splice

    @property
    def tls_version(self) -> str | None:
        return self._tls.version()

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self._outgoing.read()
            if data:
                await asyncio.get_running_loop().sock_sendall(self._sock, data)

    async def _fill(self) -> None:
        data = await asyncio.get_running_loop().sock_recv(self._sock, RECV_CHUNK)
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    async def recv(self, max_bytes: int = RECV_CHUNK) -> bytes:
        while True:
            try:
                data = self._tls.read(max_bytes)
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                # close_notify, or a TCP EOF without one: many servers skip it, and the
                # tunnel's payload has its own framing, so both end the stream.
                return b""
            if self._outgoing.pending:
                await self._flush()  # e.g. a KeyUpdate answer
            return data

    async def send_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._tls.write(view)
            view = view[written:]
        await self._flush()

    async def shutdown_write(self) -> None:
        """Send close_notify, then FIN; receiving continues until the proxy's EOF."""
        if self._write_closed:
            return
        self._write_closed = True
        with contextlib.suppress(ssl.SSLError):
            # Raises SSLWantReadError: the peer's close_notify is still to come.
            self._tls.unwrap()
        with contextlib.suppress(OSError):
            await self._flush()
            self._sock.shutdown(socket.SHUT_WR)

    async def close(self) -> None:
        if self._sock.fileno() != -1 and not self._write_closed:
            self._write_closed = True
            with contextlib.suppress(ssl.SSLError):
                self._tls.unwrap()
            # Best effort, never blocking: the tunnel is already finished.
            with contextlib.suppress(OSError):
                self._sock.send(self._outgoing.read())
        self._sock.close()

    def abort(self) -> None:
        reset_socket(self._sock)
