"""Loopback peers for the relay's tests, and tests of the peers themselves.

Everything listens on 127.0.0.1 with an ephemeral port, and the proxies
refuse to CONNECT anywhere but 127.0.0.1. Each peer is an async context
manager that closes its server and every connection it accepted.

    EchoServer          echoes; at the client's EOF sends b"<eof>" and closes
    BannerServer        sends a banner, half-closes, records what arrives after
    Socks5Server        RFC 1928/1929 server (optional username/password)
    HttpConnectServer   CONNECT proxy (optional Basic auth, optional TLS)
    SilentServer        accepts and never answers
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, ParamSpec, Self

import pytest

from egressd.model import NetworkType, ProxySpec

TEST_TIMEOUT = 20.0
LOOPBACK = "127.0.0.1"
P = ParamSpec("P")
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def async_test(fn: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test in a fresh event loop, bounded in time."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), TEST_TIMEOUT))

    return wrapper


def free_port() -> int:
    """A loopback port nobody listens on (bound and released at once)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


def spec(
    scheme: NetworkType, port: int, username: str | None = None, password: str | None = None
) -> ProxySpec:
    return ProxySpec(scheme=scheme, host=LOOPBACK, port=port, username=username, password=password)


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


async def splice_streams(
    a: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    b: tuple[asyncio.StreamReader, asyncio.StreamWriter],
) -> None:
    async with asyncio.TaskGroup() as group:
        group.create_task(_copy(a[0], b[1]))
        group.create_task(_copy(b[0], a[1]))


class LoopbackServer:
    """An asyncio server on 127.0.0.1 whose connections are tracked and closed on exit."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self._tls = tls
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self.accepted = 0
        self.errors: list[BaseException] = []

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def address(self) -> tuple[str, int]:
        return (LOOPBACK, self.port)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        self.accepted += 1
        try:
            await self.handle(reader, writer)
        except (OSError, asyncio.IncompleteReadError, ExceptionGroup) as exc:
            self.errors.append(exc)
        finally:
            self._tasks.discard(task)
            await close_writer(writer)
            self._writers.discard(writer)

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(self._serve, LOOPBACK, 0, ssl=self._tls)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in list(self._writers):
            writer.transport.abort()
        await self._server.wait_closed()


async def close_writer(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        async with asyncio.timeout(2):
            await writer.wait_closed()
    if not writer.transport.is_closing():
        writer.transport.abort()


class EchoServer(LoopbackServer):
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write(b"<eof>")
        await writer.drain()


class BannerServer(LoopbackServer):
    """Sends ``banner`` and half-closes at once; keeps what the client sends afterwards."""

    def __init__(self, banner: bytes) -> None:
        super().__init__()
        self.banner = banner
        self.received: list[bytes] = []
        self.done = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.banner)
        writer.write_eof()
        self.received.append(await reader.read())
        self.done.set()


class SilentServer(LoopbackServer):
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()


class ProxyServer(LoopbackServer):
    """Common bookkeeping of the two proxies."""

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        early: bytes = b"",
        reply_delay: float = 0.0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(tls=tls)
        self.username, self.password = username, password
        self.early, self.reply_delay = early, reply_delay
        self.requests: list[tuple[str, int]] = []
        self.auth_failures = 0

    async def tunnel(
        self,
        host: str,
        port: int,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        *,
        ok: bytes,
        refused: bytes,
    ) -> None:
        self.requests.append((host, port))
        if self.reply_delay:
            await asyncio.sleep(self.reply_delay)
        if host != LOOPBACK:  # network safety: these peers reach loopback only
            client[1].write(refused)
            return
        try:
            upstream = await asyncio.open_connection(host, port)
        except OSError:
            client[1].write(refused)
            return
        try:
            client[1].write(ok + self.early)
            await splice_streams(client, upstream)
        finally:
            await close_writer(upstream[1])


class Socks5Server(ProxyServer):
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version, count = await reader.readexactly(2)
        assert version == 5
        methods = await reader.readexactly(count)
        if self.username is None:
            if 0 not in methods:
                writer.write(b"\x05\xff")
                return
            writer.write(b"\x05\x00")
        else:
            if 2 not in methods:
                writer.write(b"\x05\xff")
                return
            writer.write(b"\x05\x02")
            _version, ulen = await reader.readexactly(2)
            user = (await reader.readexactly(ulen)).decode()
            (plen,) = await reader.readexactly(1)
            secret = (await reader.readexactly(plen)).decode()
            if (user, secret) != (self.username, self.password or ""):
                self.auth_failures += 1
                writer.write(b"\x01\x01")
                return
            writer.write(b"\x01\x00")
        _version, command, _rsv, atyp = await reader.readexactly(4)
        assert command == 1
        if atyp == 1:
            host = str(ipaddress.IPv4Address(await reader.readexactly(4)))
        elif atyp == 4:
            host = str(ipaddress.IPv6Address(await reader.readexactly(16)))
        else:
            writer.write(b"\x05\x08\x00\x01" + bytes(6))
            return
        port = int.from_bytes(await reader.readexactly(2), "big")
        bound = b"\x00\x01" + bytes([127, 0, 0, 1]) + (4242).to_bytes(2, "big")
        await self.tunnel(
            host,
            port,
            (reader, writer),
            ok=b"\x05\x00" + bound,
            refused=b"\x05\x05" + bound,
        )


class HttpConnectServer(ProxyServer):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.heads: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        request_line, *lines = head.decode("latin-1").split("\r\n")
        method, target, _version = request_line.split(" ")
        headers = {}
        for line in lines:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        if method != "CONNECT":
            writer.write(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
            return
        if self.username is not None:
            token = base64.b64encode(f"{self.username}:{self.password or ''}".encode()).decode()
            if headers.get("proxy-authorization") != f"Basic {token}":
                self.auth_failures += 1
                writer.write(
                    b"HTTP/1.1 407 Proxy Authentication Required\r\n"
                    b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\n\r\n'
                )
                return
        host, _, port = target.rpartition(":")
        await self.tunnel(
            host.strip("[]"),
            int(port),
            (reader, writer),
            ok=b"HTTP/1.1 200 Connection established\r\n\r\n",
            refused=b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n",
        )


@contextlib.asynccontextmanager
async def connection(
    address: tuple[str, int],
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection(*address)
    try:
        yield reader, writer
    finally:
        await close_writer(writer)


async def read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything until EOF; a reset counts as the end too."""
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while data := await reader.read(65536):
            chunks.append(data)
    return b"".join(chunks)


class Pki:
    """A throwaway self-signed certificate for 127.0.0.1 (needs the openssl CLI)."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("needs the openssl command")
        self.cert = directory / "cert.pem"
        self.key = directory / "key.pem"
        subprocess.run(
            [
                "openssl", "req", "-x509", "-newkey", "ec",
                "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", str(self.key), "-out", str(self.cert), "-days", "1",
                "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


# -- the peers' own tests ---------------------------------------------------------------


@async_test
async def test_echo_server_echoes_and_marks_eof() -> None:
    async with EchoServer() as echo, connection(echo.address) as (reader, writer):
        writer.write(b"abc")
        writer.write_eof()
        assert await read_until_closed(reader) == b"abc<eof>"


@async_test
async def test_socks5_peer_refuses_non_loopback() -> None:
    async with Socks5Server() as proxy, connection(proxy.address) as (reader, writer):
        writer.write(b"\x05\x01\x00")
        assert await reader.readexactly(2) == b"\x05\x00"
        writer.write(b"\x05\x01\x00\x01" + bytes([192, 0, 2, 1]) + b"\x00\x50")
        assert (await reader.readexactly(2)) == b"\x05\x05"
        assert proxy.requests == [("192.0.2.1", 80)]
