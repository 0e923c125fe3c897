"""The callback-driven spliced data path through a whole Relay, on loopback.

What ``test_relay_pump`` checks for every proxy kind, pushed harder here:
bulk both ways at once (splice, pipes, read masking, turn budget), a proxy
that cannot take a pipelined SOCKS5 request, names for the proxy, timeouts,
a client that resets mid-handshake, and no descriptor left behind.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
from pathlib import Path
from typing import Any

import pytest

from egressd.model import NetworkType, ProxySpec
from egressd.relay import Relay, _flow, _spliced
from egressd.relay._channel import LINGER_RESET
from egressd.relay._flow import Leg
from egressd.relay._poller import WATCH_READS, EdgePoller
from egressd.relay._spliced import SplicedConnection
from tests.unit.test_relay_peers import (
    LOOPBACK,
    EchoServer,
    HttpConnectServer,
    LoopbackServer,
    Pki,
    SilentServer,
    Socks5Server,
    async_test,
    close_writer,
    connection,
    free_port,
    read_until_closed,
    spec,
)
from tests.unit.test_relay_pump import CID, Target, exchange, refused_by_relay, relay_for, wait_for


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def pipes_made(relay: Relay) -> int:
    return relay._starter.shared.io.pipes.created


async def echo_through(
    address: tuple[str, int], payload: bytes, *, chunk: int = 256 * 1024, reader_delay: float = 0
) -> bytes:
    """Send ``payload`` and EOF while reading everything back (after ``reader_delay``)."""
    async with connection(address) as (reader, writer):

        async def send() -> None:
            for offset in range(0, len(payload), chunk):
                writer.write(payload[offset : offset + chunk])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        await asyncio.sleep(reader_delay)
        received = await read_until_closed(reader)
        await sender
    return received


def spy_on(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> list[tuple[Any, ...]]:
    """Record the arguments of every call to ``owner.name`` (then make the call)."""
    calls: list[tuple[Any, ...]] = []
    real = getattr(owner, name)

    def spy(*args: Any) -> Any:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(owner, name, spy)
    return calls


def same(received: bytes, payload: bytes) -> bool:
    body, eof = received[: len(payload)], received[len(payload) :]
    return eof == b"<eof>" and hashlib.sha256(body).digest() == hashlib.sha256(payload).digest()


@async_test
async def test_bulk_both_ways_at_once_is_spliced_and_intact() -> None:
    payloads = [os.urandom(3 << 20), os.urandom(2 << 20)]
    async with (
        EchoServer() as echo,
        Socks5Server() as proxy,
        relay_for(Target(echo.address), spec(NetworkType.SOCKS5, proxy.port)) as (relay, address),
    ):
        results = await asyncio.gather(*(echo_through(address, p) for p in payloads))
        assert all(same(r, p) for r, p in zip(results, payloads, strict=True))
        assert pipes_made(relay) >= 1  # beyond the first 64 KiB it went through pipes
        await wait_for(lambda: relay.active_connections(CID) == 0)


@async_test
async def test_small_exchanges_never_touch_a_pipe() -> None:
    async with (
        EchoServer() as echo,
        Socks5Server() as proxy,
        relay_for(Target(echo.address), spec(NetworkType.SOCKS5, proxy.port)) as (relay, address),
    ):
        for _ in range(5):
            assert same(await echo_through(address, b"small" * 100), b"small" * 100)
        assert pipes_made(relay) == 0


@async_test
async def test_slow_reader_stops_the_source_being_watched_and_loses_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = spy_on(monkeypatch, EdgePoller, "modify")  # (poller, sock, events)
    payload = os.urandom(8 << 20)
    async with (
        EchoServer() as echo,
        Socks5Server() as proxy,
        relay_for(Target(echo.address), spec(NetworkType.SOCKS5, proxy.port)) as (_relay, address),
    ):
        assert same(await echo_through(address, payload, reader_delay=0.3), payload)
    # Registration does not go through modify: reads dropped can only be the masking.
    assert any(not events & WATCH_READS for _poller, _sock, events in calls)


@async_test
async def test_a_tiny_turn_budget_yields_and_still_completes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_flow, "TURN_BUDGET", 4096)
    resumed = spy_on(monkeypatch, SplicedConnection, "_resume_turn")
    payload = os.urandom(1 << 20)
    async with (
        EchoServer() as echo,
        HttpConnectServer() as proxy,
        relay_for(Target(echo.address), spec(NetworkType.HTTP, proxy.port)) as (_relay, address),
    ):
        assert same(await echo_through(address, payload), payload)
    assert resumed  # the budget ran out and the connection yielded to the loop


@async_test
async def test_http_client_bytes_sent_before_the_tunnel_is_up_are_kept() -> None:
    async with EchoServer() as echo, HttpConnectServer(reply_delay=0.3) as proxy:
        upstream = spec(NetworkType.HTTP, proxy.port)
        async with (
            relay_for(Target(echo.address), upstream) as (_relay, address),
            connection(address) as (reader, writer),
        ):
            writer.write(b"eager client")
            writer.write_eof()
            assert await read_until_closed(reader) == b"eager client<eof>"


class DroppingSocks5:
    """A non-conforming SOCKS5 server: one read for the greeting, extra bytes discarded."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await reader.read(1024)  # greeting, and whatever came with it, is gone
        writer.write(b"\x05\x00")
        request = await reader.readexactly(10)  # a pipelined request never comes again
        writer.write(b"\x05\x05" + request[2:])  # "refused": enough for this test

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, LOOPBACK, 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        await self.server.wait_closed()


@async_test
async def test_proxy_dropping_a_pipelined_request_fails_closed_unless_pipelining_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="egressd.relay")
    async with DroppingSocks5() as port:
        target = Target((LOOPBACK, 9))
        async with relay_for(target, spec(NetworkType.SOCKS5, port), handshake_timeout=0.3) as (
            relay,
            address,
        ):
            assert await refused_by_relay(address) == b""
            await wait_for(lambda: relay.active_connections(CID) == 0)
        assert "did not complete the handshake within 0.3s" in caplog.text
        caplog.clear()
        async with relay_for(target, spec(NetworkType.SOCKS5, port), socks5_pipelining=False) as (
            relay,
            address,
        ):
            assert await refused_by_relay(address) == b""
        assert "connection refused by destination" in caplog.text  # the request got through


@async_test
async def test_silent_proxy_times_out_and_closes_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="egressd.relay")
    async with SilentServer() as silent:
        upstream = spec(NetworkType.HTTP, silent.port)
        async with relay_for(Target((LOOPBACK, 9)), upstream, handshake_timeout=0.2) as (
            relay,
            address,
        ):
            assert await refused_by_relay(address) == b""
            await wait_for(lambda: relay.active_connections(CID) == 0)
    assert "did not complete the handshake within 0.2s" in caplog.text


@async_test
async def test_proxy_given_by_name_is_looked_up() -> None:
    async with EchoServer() as echo, Socks5Server() as proxy:
        # "localhost" may come back as ::1 first, where nothing listens: the next address.
        upstream = ProxySpec(scheme=NetworkType.SOCKS5, host="localhost", port=proxy.port)
        async with (
            relay_for(Target(echo.address), upstream) as (_relay, address),
            connection(address) as (reader, writer),
        ):
            await exchange(reader, writer, b"via a name")
        assert proxy.requests == [echo.address]


@async_test
async def test_proxy_name_that_does_not_resolve_closes_the_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="egressd.relay")
    upstream = ProxySpec(scheme=NetworkType.SOCKS5, host="no-such-proxy.invalid", port=1080)
    async with relay_for(Target((LOOPBACK, 9)), upstream) as (relay, address):
        assert await refused_by_relay(address) == b""
        await wait_for(lambda: relay.active_connections(CID) == 0)
    assert "cannot resolve socks5 proxy no-such-proxy.invalid:1080" in caplog.text


@async_test
async def test_client_reset_during_the_handshake_aborts_the_tunnel() -> None:
    async with EchoServer() as echo, Socks5Server(reply_delay=0.5) as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with relay_for(Target(echo.address), upstream) as (relay, address):
            client = socket.create_connection(address)
            await wait_for(lambda: proxy.accepted == 1)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            client.close()  # RST
            # Well before the proxy answers (0.5 s): the relay gave up on the tunnel.
            await wait_for(lambda: relay.active_connections(CID) == 0, timeout=0.4)


@async_test
async def test_no_descriptor_or_pipe_is_left_behind(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    payload = os.urandom(300_000)
    async with (
        EchoServer() as echo,
        Socks5Server() as socks,
        HttpConnectServer() as http,
        HttpConnectServer(tls=pki.server_context()) as https,
        SilentServer() as silent,
    ):
        await asyncio.sleep(0)
        baseline = open_fds()
        relay = Relay(
            connect_timeout=1.0,
            handshake_timeout=0.2,
            original_dst=Target(echo.address),
            ssl_context=pki.client_context(),
        )
        upstreams = {
            "socks5": spec(NetworkType.SOCKS5, socks.port),
            "http": spec(NetworkType.HTTP, http.port),
            "https": spec(NetworkType.HTTPS, https.port),
            "silent": spec(NetworkType.SOCKS5, silent.port),
            "refused": spec(NetworkType.SOCKS5, free_port()),
        }
        try:
            for name, upstream in upstreams.items():
                await relay.ensure_listener(
                    container_id=f"{len(name):02d}{name:0<22}"[:24].replace("s", "5"),
                    listen_ip=LOOPBACK,
                    port=0,
                    upstream=upstream,
                )
            addresses = dict(zip(upstreams, relay.listener_addresses().values(), strict=True))
            for _ in range(3):
                for name in ("socks5", "http"):
                    bulk, small = await asyncio.gather(
                        echo_through(addresses[name], payload), echo_through(addresses[name], b"x")
                    )
                    assert same(bulk, payload) and same(small, b"x")
                # No half-close over TLS: the test proxy's TLS side ends the tunnel at EOF.
                async with connection(addresses["https"]) as (reader, writer):
                    await exchange(reader, writer, payload)
                for name in ("silent", "refused"):
                    assert await refused_by_relay(addresses[name]) == b""
            # One left open mid-handshake and one mid-transfer: close() must take them too.
            stuck = await asyncio.open_connection(*addresses["silent"])
            live = await asyncio.open_connection(*addresses["socks5"])
            await exchange(*live, b"still here")
        finally:
            await relay.close()
        for _reader, writer in (stuck, live):
            await close_writer(writer)
        await asyncio.sleep(0.05)
        assert open_fds() == baseline


@async_test
async def test_proxy_connect_that_does_not_complete_at_once_is_waited_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The greeting is sent optimistically; with the proxy's accept queue full the SYN
    is dropped, the send would block, and the relay waits for the connect's edge."""
    blocked = spy_on(monkeypatch, Leg, "full")
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)  # one connection queued fills it
    listener.setblocking(False)
    filler = socket.create_connection(listener.getsockname())

    async def socks5_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.readexactly(3) == b"\x05\x01\x00"
        request = await reader.readexactly(10)
        writer.write(b"\x05\x00" + b"\x05\x00" + request[2:])  # method, then CONNECT reply
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    upstream = spec(NetworkType.SOCKS5, listener.getsockname()[1])
    try:
        async with (
            relay_for(Target((LOOPBACK, 9)), upstream) as (_relay, address),
            connection(address) as (reader, writer),
        ):
            writer.write(b"patience")
            await asyncio.sleep(0.3)  # the relay's SYN went unanswered meanwhile
            assert blocked  # the greeting could not go out
            accepted, _ = listener.accept()  # room in the queue: the SYN retry gets in
            accepted.close()
            server = await asyncio.start_server(socks5_echo, sock=listener)
            try:
                assert await asyncio.wait_for(reader.readexactly(8), 5) == b"patience"
            finally:
                server.close()
    finally:
        filler.close()
        listener.close()


@async_test
async def test_quick_opening_takes_a_split_answer_in_one_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy sends its method reply at once and the CONNECT reply 0.1 s later; the
    relay's proxy leg wakes for both together (SO_RCVLOWAT), not once for each."""
    monkeypatch.setattr(_spliced, "LOWAT_HOLD", 5.0)  # longer than the reply takes
    seen = spy_on(monkeypatch, _spliced, "quick_reply")
    async with (
        EchoServer() as echo,
        Socks5Server(reply_delay=0.1) as proxy,
        relay_for(Target(echo.address), spec(NetworkType.SOCKS5, proxy.port)) as (_r, address),
        connection(address) as (reader, writer),
    ):
        await exchange(reader, writer, b"both replies at once")
    assert len(seen) == 1 and seen[0][0].startswith(b"\x05\x00\x05\x00")


class NoMethodServer(LoopbackServer):
    """Answers any greeting with 0xff (no acceptable method) and keeps the connection
    open: RFC 1928 leaves the close to the client."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(3)
        writer.write(b"\x05\xff")
        await writer.drain()
        await reader.read()


@async_test
async def test_a_two_byte_refusal_after_a_quick_opening_fails_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A short answer is held LOWAT_HOLD at most: the refusal is named at once."""
    caplog.set_level(logging.ERROR, logger="egressd.relay")
    async with (
        NoMethodServer() as proxy,
        relay_for(
            Target(("198.18.0.1", 9)), spec(NetworkType.SOCKS5, proxy.port), handshake_timeout=5.0
        ) as (relay, address),
    ):
        assert await refused_by_relay(address) == b""
        await wait_for(lambda: relay.active_connections(CID) == 0, timeout=1.0)
    assert "requires authentication but no credentials are configured" in caplog.text


@async_test
async def test_one_byte_answers_pass_at_once_after_a_quick_opening() -> None:
    """Held-back reads end with the handshake: a 1-byte answer is not kept waiting."""
    async with (
        EchoServer() as echo,
        Socks5Server() as proxy,
        relay_for(Target(echo.address), spec(NetworkType.SOCKS5, proxy.port)) as (_r, address),
        connection(address) as (reader, writer),
    ):
        for byte in (b"a", b"b", b"c"):
            await asyncio.wait_for(exchange(reader, writer, byte), timeout=2.0)


@async_test
async def test_a_refusal_after_a_quick_opening_is_reported_as_such(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not the quick yes: the handshake proper takes the answer and names the refusal."""
    caplog.set_level(logging.INFO, logger="egressd.relay")
    async with (
        Socks5Server() as proxy,  # refuses anything but loopback, without network
        relay_for(Target(("198.18.0.1", 9)), spec(NetworkType.SOCKS5, proxy.port)) as (
            relay,
            address,
        ),
    ):
        assert await refused_by_relay(address) == b""
        await wait_for(lambda: relay.active_connections(CID) == 0)
    assert "connection refused by destination (reply 0x05)" in caplog.text


def test_legs_are_registered_for_what_they_want() -> None:
    """The registration constants are what Leg.interest() says of a new leg."""
    a, b = socket.socketpair()
    with a, b:
        assert Leg(a, readable=True, want_reads=False).interest() == _spliced._CLIENT_WATCH
        assert Leg(b, readable=False, want_reads=True).interest() == _spliced._UPSTREAM_WATCH
