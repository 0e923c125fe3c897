"""The relay's data path on loopback: Relay + in-test proxies + destinations.

The original destination is injected (no NAT here): ``Target`` holds what
``SO_ORIGINAL_DST`` would have said. No root needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from egressd.model import NetworkType, ProxySpec
from egressd.relay import Relay
from tests.unit.test_relay_peers import (
    LOOPBACK,
    BannerServer,
    EchoServer,
    HttpConnectServer,
    Pki,
    ProxyServer,
    Socks5Server,
    async_test,
    close_writer,
    connection,
    free_port,
    read_until_closed,
    spec,
)

CID = "0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba98"


class Target:
    """The injected ``original_dst``: one destination for every connection."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.calls = 0

    def __call__(self, sock: socket.SocketType) -> tuple[str, int]:
        self.calls += 1
        return self.address


@contextlib.asynccontextmanager
async def relay_for(
    target: Target, upstream: ProxySpec, **kwargs: object
) -> AsyncIterator[tuple[Relay, tuple[str, int]]]:
    options: dict[str, object] = {"connect_timeout": 2.0, "handshake_timeout": 2.0, **kwargs}
    relay = Relay(original_dst=target, **options)  # type: ignore[arg-type]
    try:
        await relay.ensure_listener(container_id=CID, listen_ip=LOOPBACK, port=0, upstream=upstream)
        yield relay, relay.listener_addresses()[CID]
    finally:
        await relay.close()


async def wait_for(predicate: object, *, timeout: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()
    assert await reader.readexactly(len(data)) == data


async def refused_by_relay(address: tuple[str, int]) -> bytes:
    """What a client gets from a connection the relay gives up on: EOF or RST.

    The relay may reset the connection before asyncio has even reported the
    client's connect as done (it checks ``SO_ERROR`` a loop turn later).
    """
    try:
        reader, writer = await asyncio.open_connection(*address)
    except ConnectionResetError:
        return b""
    try:
        return await read_until_closed(reader)
    finally:
        await close_writer(writer)


PROXIES: list[tuple[str, type[ProxyServer], NetworkType, str | None, str | None]] = [
    ("socks5", Socks5Server, NetworkType.SOCKS5, None, None),
    ("socks5-auth", Socks5Server, NetworkType.SOCKS5, "alice", "s3cr:et"),
    ("http", HttpConnectServer, NetworkType.HTTP, None, None),
    ("http-auth", HttpConnectServer, NetworkType.HTTP, "alice", "s3cr:et"),
]
PROXY_IDS = [p[0] for p in PROXIES]


@pytest.mark.parametrize(("name", "server", "scheme", "user", "password"), PROXIES, ids=PROXY_IDS)
@async_test
async def test_bytes_both_ways_and_half_close(
    name: str,
    server: type[ProxyServer],
    scheme: NetworkType,
    user: str | None,
    password: str | None,
) -> None:
    async with EchoServer() as echo, server(username=user, password=password) as proxy:
        target = Target(echo.address)
        async with relay_for(target, spec(scheme, proxy.port, user, password)) as (relay, address):
            async with connection(address) as (reader, writer):
                await exchange(reader, writer, b"hello")
                await exchange(reader, writer, b"world")
                assert relay.active_connections(CID) == 1
                writer.write(b"last words")
                writer.write_eof()  # half-close: we can still receive
                assert await read_until_closed(reader) == b"last words<eof>"
            await wait_for(lambda: relay.active_connections(CID) == 0)
        assert proxy.requests == [echo.address]
        assert proxy.auth_failures == 0


@pytest.mark.parametrize("scheme", [NetworkType.SOCKS5, NetworkType.HTTP])
@async_test
async def test_destination_half_closes_first(scheme: NetworkType) -> None:
    proxy_type = Socks5Server if scheme is NetworkType.SOCKS5 else HttpConnectServer
    async with BannerServer(b"220 hi\r\n") as banner, proxy_type() as proxy:
        async with (
            relay_for(Target(banner.address), spec(scheme, proxy.port)) as (_relay, address),
            connection(address) as (reader, writer),
        ):
            assert await reader.read() == b"220 hi\r\n"  # EOF reached us ...
            assert reader.at_eof()
            writer.write(b"still talking")  # ... and our direction still flows
            writer.write_eof()
            await asyncio.wait_for(banner.done.wait(), 5)
        assert banner.received == [b"still talking"]


@pytest.mark.parametrize("scheme", [NetworkType.SOCKS5, NetworkType.HTTP])
@async_test
async def test_one_mebibyte_arrives_intact(scheme: NetworkType) -> None:
    payload = os.urandom(1 << 20)
    proxy_type = Socks5Server if scheme is NetworkType.SOCKS5 else HttpConnectServer
    async with (
        EchoServer() as echo,
        proxy_type() as proxy,
        relay_for(Target(echo.address), spec(scheme, proxy.port)) as (_relay, address),
        connection(address) as (reader, writer),
    ):

        async def send() -> None:
            for offset in range(0, len(payload), 50_000):
                writer.write(payload[offset : offset + 50_000])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        received = await read_until_closed(reader)
        await sender
    assert len(received) == len(payload) + len(b"<eof>")
    assert hashlib.sha256(received[: len(payload)]).digest() == hashlib.sha256(payload).digest()
    assert received.endswith(b"<eof>")


@pytest.mark.parametrize("scheme", [NetworkType.SOCKS5, NetworkType.HTTP])
@async_test
async def test_early_payload_after_proxy_reply_reaches_client(scheme: NetworkType) -> None:
    proxy_type = Socks5Server if scheme is NetworkType.SOCKS5 else HttpConnectServer
    async with (
        EchoServer() as echo,
        proxy_type(early=b"EARLY") as proxy,
        relay_for(Target(echo.address), spec(scheme, proxy.port)) as (_relay, address),
        connection(address) as (reader, writer),
    ):
        assert await reader.readexactly(5) == b"EARLY"
        await exchange(reader, writer, b"then echo")


@async_test
async def test_client_bytes_sent_before_tunnel_is_up_are_kept() -> None:
    async with EchoServer() as echo, Socks5Server(reply_delay=0.3) as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with (
            relay_for(Target(echo.address), upstream) as (_relay, address),
            connection(address) as (reader, writer),
        ):
            writer.write(b"eager client")  # before the proxy has even replied
            writer.write_eof()
            assert await read_until_closed(reader) == b"eager client<eof>"


@async_test
async def test_swap_upstream_affects_only_new_connections() -> None:
    async with (
        EchoServer() as echo,
        Socks5Server() as old,
        HttpConnectServer() as new,
        relay_for(Target(echo.address), spec(NetworkType.SOCKS5, old.port)) as (relay, address),
        connection(address) as (reader1, writer1),
    ):
        await exchange(reader1, writer1, b"one")
        await relay.ensure_listener(
            container_id=CID, listen_ip=LOOPBACK, port=0, upstream=spec(NetworkType.HTTP, new.port)
        )
        assert relay.listener_addresses()[CID] == address  # same listener
        async with connection(address) as (reader2, writer2):
            await exchange(reader2, writer2, b"two")
            await exchange(reader1, writer1, b"one still works")
            assert relay.active_connections(CID) == 2
    assert (old.accepted, new.accepted) == (1, 1)


@async_test
async def test_ensure_listener_is_idempotent_and_moves() -> None:
    async with EchoServer() as echo, Socks5Server() as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with relay_for(Target(echo.address), upstream) as (relay, address):
            await relay.ensure_listener(
                container_id=CID, listen_ip=LOOPBACK, port=0, upstream=upstream
            )
            assert relay.listener_addresses() == {CID: address}
            async with connection(address) as (reader, writer):
                await exchange(reader, writer, b"before move")
                new_port = free_port()
                await relay.ensure_listener(
                    container_id=CID, listen_ip=LOOPBACK, port=new_port, upstream=upstream
                )
                assert relay.listener_addresses() == {CID: (LOOPBACK, new_port)}
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection(*address)
                async with connection((LOOPBACK, new_port)) as (reader2, writer2):
                    await exchange(reader2, writer2, b"after move")
                await exchange(reader, writer, b"old connection carries on")
                await relay.remove_listener(CID)
                assert await read_until_closed(reader) == b""  # aborted with the container


@async_test
async def test_remove_listener_aborts_open_connections() -> None:
    async with EchoServer() as echo, Socks5Server() as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with relay_for(Target(echo.address), upstream) as (relay, address):
            await relay.ensure_listener(
                container_id=OTHER, listen_ip=LOOPBACK, port=0, upstream=upstream
            )
            other_address = relay.listener_addresses()[OTHER]
            async with (
                connection(address) as (reader, writer),
                connection(other_address) as (other_reader, other_writer),
            ):
                await exchange(reader, writer, b"ping")
                await exchange(other_reader, other_writer, b"ping")
                await relay.remove_listener(CID)
                assert relay.active_connections(CID) == 0
                assert CID not in relay.listener_addresses()
                assert await read_until_closed(reader) == b""
                with pytest.raises(ConnectionRefusedError):
                    await asyncio.open_connection(*address)
                await exchange(other_reader, other_writer, b"unaffected")
                assert relay.active_connections(OTHER) == 1
            await relay.remove_listener(CID)  # idempotent
        await wait_for(lambda: echo.accepted == 2 and not echo._tasks)


@pytest.mark.parametrize(
    ("server", "scheme"),
    [(Socks5Server, NetworkType.SOCKS5), (HttpConnectServer, NetworkType.HTTP)],
)
@async_test
async def test_wrong_credentials_close_and_reach_nothing(
    server: type[ProxyServer], scheme: NetworkType, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="egressd.relay")
    async with EchoServer() as echo, server(username="alice", password="right") as proxy:
        upstream = spec(scheme, proxy.port, "alice", "wrong-secret")
        async with relay_for(Target(echo.address), upstream) as (relay, address):
            async with connection(address) as (reader, writer):
                writer.write(b"must not arrive")
                assert await read_until_closed(reader) == b""
            await wait_for(lambda: relay.active_connections(CID) == 0)
        assert proxy.auth_failures == 1
        assert echo.accepted == 0
    assert "wrong-secret" not in caplog.text
    assert any(r.levelno == logging.ERROR and "alice" not in r.getMessage() for r in caplog.records)


@async_test
async def test_loop_guard_refuses_the_listener_itself() -> None:
    async with Socks5Server() as proxy:
        target = Target(("0.0.0.0", 0))
        async with relay_for(target, spec(NetworkType.SOCKS5, proxy.port)) as (_relay, address):
            target.address = address
            assert await refused_by_relay(address) == b""
        assert target.calls == 1
        assert proxy.accepted == 0


@async_test
async def test_loop_guard_refuses_a_wildcard_listener_reached_on_any_address() -> None:
    """Bound to 0.0.0.0, the listener is reached as 127.0.0.1:port: that is itself too."""
    async with Socks5Server() as proxy:
        relay = Relay(original_dst=Target(("0.0.0.0", 0)), connect_timeout=2.0)
        try:
            await relay.ensure_listener(
                container_id=CID,
                listen_ip="0.0.0.0",
                port=0,
                upstream=spec(NetworkType.SOCKS5, proxy.port),
            )
            port = relay.listener_addresses()[CID][1]
            relay._original_dst = Target((LOOPBACK, port))
            assert await refused_by_relay((LOOPBACK, port)) == b""
        finally:
            await relay.close()
        assert proxy.accepted == 0


@async_test
async def test_loop_guard_follows_endpoints_as_they_move_and_go() -> None:
    """Another container's listener or DNS endpoint is refused while it is there, and
    only there: after a move its old address is an ordinary destination again."""
    other = "fedcba9876543210fedcba98"
    async with Socks5Server() as proxy:
        target = Target(("0.0.0.0", 0))
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with relay_for(target, upstream) as (relay, address):
            old_port, new_port, dns_port = free_port(), free_port(), free_port()

            async def place_other(port: int, dns: bool) -> None:
                await relay.ensure_listener(
                    container_id=other,
                    listen_ip=LOOPBACK,
                    port=port,
                    upstream=upstream,
                    dns_servers=[f"{LOOPBACK}:{free_port()}"] if dns else (),
                    dns_port=dns_port,
                )

            async def proxied(destination: tuple[str, int]) -> bool:
                target.address = destination
                asked = len(proxy.requests)
                await refused_by_relay(address)  # nothing listens there: closed either way
                return proxy.requests[asked:] == [destination]

            await place_other(old_port, dns=True)
            assert not await proxied((LOOPBACK, old_port))
            assert not await proxied((LOOPBACK, dns_port))
            await place_other(new_port, dns=False)  # listener moved, DNS endpoint closed
            assert await proxied((LOOPBACK, old_port))
            assert await proxied((LOOPBACK, dns_port))
            assert not await proxied((LOOPBACK, new_port))
            await relay.remove_listener(other)
            assert await proxied((LOOPBACK, new_port))
            assert not await proxied(address)  # the relay's own listener throughout


@async_test
async def test_unreachable_upstream_closes_client() -> None:
    async with EchoServer() as echo:
        upstream = spec(NetworkType.SOCKS5, free_port())
        async with relay_for(Target(echo.address), upstream) as (relay, address):
            assert await refused_by_relay(address) == b""
            await wait_for(lambda: relay.active_connections(CID) == 0)
        assert echo.accepted == 0


@async_test
async def test_refused_destination_closes_client() -> None:
    async with Socks5Server() as proxy:
        target = Target((LOOPBACK, free_port()))
        async with (
            relay_for(target, spec(NetworkType.SOCKS5, proxy.port)) as (_relay, address),
            connection(address) as (reader, _writer),
        ):
            assert await read_until_closed(reader) == b""
        assert proxy.requests == [target.address]


@async_test
async def test_missing_original_destination_closes_client() -> None:
    def no_nat(sock: socket.SocketType) -> tuple[str, int]:
        raise FileNotFoundError(2, "No such file or directory")

    async with Socks5Server() as proxy:
        relay = Relay(original_dst=no_nat)
        try:
            await relay.ensure_listener(
                container_id=CID, listen_ip=LOOPBACK, port=0,
                upstream=spec(NetworkType.SOCKS5, proxy.port),
            )  # fmt: skip
            assert await refused_by_relay(relay.listener_addresses()[CID]) == b""
        finally:
            await relay.close()
        assert proxy.accepted == 0


@async_test
async def test_non_ip_original_destination_closes_client() -> None:
    async with Socks5Server() as proxy:
        target = Target(("example.com", 80))
        async with relay_for(target, spec(NetworkType.SOCKS5, proxy.port)) as (relay, address):
            assert await refused_by_relay(address) == b""
            await wait_for(lambda: relay.active_connections(CID) == 0)
        assert proxy.accepted == 0


@async_test
async def test_close_stops_everything_and_is_final() -> None:
    async with EchoServer() as echo, Socks5Server() as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        relay = Relay(original_dst=Target(echo.address))
        await relay.ensure_listener(container_id=CID, listen_ip=LOOPBACK, port=0, upstream=upstream)
        address = relay.listener_addresses()[CID]
        async with connection(address) as (reader, writer):
            await exchange(reader, writer, b"x")
            await relay.close()
            assert await read_until_closed(reader) == b""
        assert relay.listener_addresses() == {}
        assert relay.active_connections(CID) == 0
        await relay.close()
        with pytest.raises(RuntimeError):
            await relay.ensure_listener(
                container_id=CID, listen_ip=LOOPBACK, port=0, upstream=upstream
            )


@async_test
async def test_listen_failure_is_a_kernel_error_with_errno() -> None:
    from egressd.errors import KernelError

    with socket.socket() as taken:
        taken.bind((LOOPBACK, 0))
        taken.listen()
        port = taken.getsockname()[1]
        relay = Relay()
        try:
            with pytest.raises(KernelError) as info:
                await relay.ensure_listener(
                    container_id=CID, listen_ip=LOOPBACK, port=port,
                    upstream=spec(NetworkType.SOCKS5, 1080),
                )  # fmt: skip
        finally:
            await relay.close()
    assert info.value.errno == 98  # EADDRINUSE
    assert relay.listener_addresses() == {}


@async_test
async def test_https_upstream_relays_bytes(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with (
        EchoServer() as echo,
        HttpConnectServer(tls=pki.server_context(), username="alice", password="pw") as proxy,
    ):
        upstream = spec(NetworkType.HTTPS, proxy.port, "alice", "pw")
        async with relay_for(Target(echo.address), upstream, ssl_context=pki.client_context()) as (
            relay,
            address,
        ):
            async with connection(address) as (reader, writer):
                await exchange(reader, writer, b"over tls")
                payload = os.urandom(300_000)
                writer.write(payload)
                await writer.drain()
                assert await reader.readexactly(len(payload)) == payload
            await wait_for(lambda: relay.active_connections(CID) == 0)
        assert proxy.requests == [echo.address]


@async_test
async def test_https_upstream_with_untrusted_certificate_fails_closed(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with EchoServer() as echo, HttpConnectServer(tls=pki.server_context()) as proxy:
        upstream = spec(NetworkType.HTTPS, proxy.port)
        async with (
            relay_for(Target(echo.address), upstream) as (_relay, address),  # system CAs only
            connection(address) as (reader, _writer),
        ):
            assert await read_until_closed(reader) == b""
        assert echo.accepted == 0
