"""The relay's DNS endpoints on loopback: Relay -> in-test proxy -> in-test
DNS-over-TCP server. No root; the container is this test, querying the DNS
endpoint directly (no NAT), over UDP and TCP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from egressd.model import NetworkType, ProxySpec
from egressd.relay import DnsOptions, Relay
from egressd.relay._channel import SocketChannel
from egressd.relay._dns import parse_dns_server
from egressd.relay._dns_pool import DnsStream, DnsStreamError
from tests.unit.test_relay_dns_peers import (
    CLASS_IN,
    POINTER_TO_QUESTION,
    TYPE_A,
    TYPE_TXT,
    DnsTcpServer,
    a_record,
    build_query,
    build_response,
    decode,
    framed,
    rr,
    txt_rdata,
)
from tests.unit.test_relay_peers import (
    LOOPBACK,
    HttpConnectServer,
    Pki,
    ProxyServer,
    SilentServer,
    Socks5Server,
    async_test,
    connection,
    free_port,
    read_until_closed,
    spec,
)

CID = "0123456789abcdef01234567"
FAST = DnsOptions(attempt_timeout=0.5, query_timeout=1.2, tcp_idle_timeout=2.0)
WWW = {("www.example.", TYPE_A): [(300, a_record("192.0.2.10"))]}
RCODE_SERVFAIL = 2


def no_original_dst(sock: socket.SocketType) -> tuple[str, int]:
    raise OSError("the DNS tests make no TCP relay connections")


def at(server: DnsTcpServer | int) -> str:
    port = server if isinstance(server, int) else server.port
    return f"{LOOPBACK}:{port}"


@contextlib.asynccontextmanager
async def dns_relay(
    upstream: ProxySpec,
    servers: list[str],
    *,
    options: DnsOptions = FAST,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[Relay, tuple[str, int]]]:
    relay = Relay(
        connect_timeout=1.0,
        handshake_timeout=1.0,
        original_dst=no_original_dst,
        ssl_context=ssl_context,
        dns_options=options,
    )
    try:
        await relay.ensure_listener(
            container_id=CID,
            listen_ip=LOOPBACK,
            port=0,
            upstream=upstream,
            dns_servers=servers,
            dns_port=0,
        )
        yield relay, relay.dns_addresses()[CID]
    finally:
        await relay.close()


async def udp_ask(address: tuple[str, int], message: bytes, *, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setblocking(False)
        sock.connect(address)
        await loop.sock_sendall(sock, message)
        async with asyncio.timeout(timeout):
            return await loop.sock_recv(sock, 65535)


async def udp_no_reply(address: tuple[str, int], message: bytes) -> None:
    with pytest.raises(TimeoutError):
        await udp_ask(address, message, timeout=0.3)


async def tcp_ask(address: tuple[str, int], *messages: bytes) -> list[bytes]:
    """Send every query at once on one connection; read as many answers."""
    async with connection(address) as (reader, writer):
        writer.write(b"".join(framed(m) for m in messages))
        replies = []
        for _ in messages:
            length = int.from_bytes(await reader.readexactly(2), "big")
            replies.append(await reader.readexactly(length))
        return replies


def assert_answer(reply: bytes, *, qid: int, name: str, address: str) -> None:
    decoded = decode(reply)
    assert decoded.id == qid
    assert decoded.qr and decoded.rcode == 0
    assert decoded.question == (name, TYPE_A, CLASS_IN)
    assert [(t, rdata) for t, _ttl, rdata in decoded.answers] == [(TYPE_A, a_record(address))]


def assert_servfail(reply: bytes, *, qid: int, name: str) -> None:
    decoded = decode(reply)
    assert decoded.id == qid
    assert decoded.qr and decoded.rcode == RCODE_SERVFAIL
    assert decoded.flags & 0x0080  # RA
    assert decoded.question == (name, TYPE_A, CLASS_IN)


@contextlib.asynccontextmanager
async def proxy_of(
    kind: str, tmp_path: Path
) -> AsyncIterator[tuple[ProxyServer, ProxySpec, ssl.SSLContext | None]]:
    if kind == "https":
        pki = Pki(tmp_path)
        async with HttpConnectServer(tls=pki.server_context()) as proxy:
            yield proxy, spec(NetworkType.HTTPS, proxy.port), pki.client_context()
        return
    server_type = Socks5Server if kind.startswith("socks5") else HttpConnectServer
    scheme = NetworkType.SOCKS5 if kind.startswith("socks5") else NetworkType.HTTP
    user, password = ("alice", "s3cr:et") if kind.endswith("-auth") else (None, None)
    async with server_type(username=user, password=password) as proxy:
        yield proxy, spec(scheme, proxy.port, user, password), None


async def wait_for(predicate: object, *, timeout: float = 5.0) -> None:
    assert callable(predicate)
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# -- answers through the tunnel --------------------------------------------------------


@pytest.mark.parametrize("kind", ["socks5", "socks5-auth", "http", "http-auth", "https"])
@async_test
async def test_udp_query_is_answered_through_the_proxy(kind: str, tmp_path: Path) -> None:
    async with DnsTcpServer(WWW) as dns, proxy_of(kind, tmp_path) as (proxy, upstream, tls):
        async with dns_relay(upstream, [at(dns)], ssl_context=tls) as (_relay, address):
            assert address[0] == LOOPBACK and address[1] != 0
            reply = await udp_ask(address, build_query("www.example.", qid=0x5151))
            assert_answer(reply, qid=0x5151, name="www.example.", address="192.0.2.10")
        assert proxy.requests == [dns.address]  # the server was reached through the proxy
        assert proxy.auth_failures == 0
        assert dns.queries == [("www.example.", TYPE_A)]


@pytest.mark.parametrize("kind", ["socks5", "http"])
@async_test
async def test_sequential_queries_share_one_tunnel(kind: str, tmp_path: Path) -> None:
    records = {(f"host{i}.example.", TYPE_A): [(300, a_record(f"192.0.2.{i}"))] for i in range(6)}
    async with DnsTcpServer(records) as dns, proxy_of(kind, tmp_path) as (proxy, upstream, _):
        async with dns_relay(upstream, [at(dns)]) as (_relay, address):
            for i in range(4):
                reply = await udp_ask(address, build_query(f"host{i}.example.", qid=i))
                assert_answer(reply, qid=i, name=f"host{i}.example.", address=f"192.0.2.{i}")
            replies = await tcp_ask(address, build_query("host4.example.", qid=4))
            assert_answer(replies[0], qid=4, name="host4.example.", address="192.0.2.4")
        assert proxy.requests == [dns.address]
        assert dns.accepted == 1
        assert len(dns.queries) == 5


@async_test
async def test_tcp_queries_on_one_connection_are_answered_in_order() -> None:
    records = {(f"n{i}.example.", TYPE_A): [(300, a_record(f"198.51.100.{i}"))] for i in range(3)}
    async with (
        DnsTcpServer(records, reply_delay=0.02) as dns,
        Socks5Server() as proxy,
        dns_relay(spec(NetworkType.SOCKS5, proxy.port), [at(dns)]) as (_r, address),
    ):
        queries = [build_query(f"n{i}.example.", qid=100 + i) for i in (2, 0, 1)]
        replies = await tcp_ask(address, *queries)
        for reply, i in zip(replies, (2, 0, 1), strict=True):
            assert_answer(reply, qid=100 + i, name=f"n{i}.example.", address=f"198.51.100.{i}")


@async_test
async def test_concurrent_queries_are_all_answered() -> None:
    records = {(f"c{i}.example.", TYPE_A): [(300, a_record(f"192.0.2.{i}"))] for i in range(20)}
    async with DnsTcpServer(records, reply_delay=0.05) as dns, Socks5Server() as proxy:
        async with dns_relay(spec(NetworkType.SOCKS5, proxy.port), [at(dns)]) as (_r, address):
            replies = await asyncio.gather(
                *(udp_ask(address, build_query(f"c{i}.example.", qid=i)) for i in range(20))
            )
            for i, reply in enumerate(replies):
                assert_answer(reply, qid=i, name=f"c{i}.example.", address=f"192.0.2.{i}")
            tunnels = len(proxy.requests)
            await udp_ask(address, build_query("c0.example.", qid=99, edns=1232))  # cached
            await udp_ask(address, build_query("c1.example.", 28))  # NODATA: a new query
        assert len(dns.queries) == 21
        assert len(proxy.requests) == tunnels  # a pooled tunnel took the last one


# -- failures --------------------------------------------------------------------------


@async_test
async def test_first_server_dead_second_answers() -> None:
    dead = free_port()
    async with DnsTcpServer(WWW) as dns, Socks5Server() as proxy:
        async with dns_relay(spec(NetworkType.SOCKS5, proxy.port), [at(dead), at(dns)]) as (
            _relay,
            address,
        ):
            reply = await udp_ask(address, build_query("www.example.", qid=1))
            assert_answer(reply, qid=1, name="www.example.", address="192.0.2.10")
        assert proxy.requests == [(LOOPBACK, dead), dns.address]


@async_test
async def test_server_failure_answer_moves_on_and_is_kept_as_last_resort() -> None:
    async with (
        DnsTcpServer(WWW, rcode=RCODE_SERVFAIL) as failing,
        DnsTcpServer(WWW) as good,
        Socks5Server() as proxy,
    ):
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with dns_relay(upstream, [at(failing), at(good)]) as (_relay, address):
            reply = await udp_ask(address, build_query("www.example.", qid=3))
            assert_answer(reply, qid=3, name="www.example.", address="192.0.2.10")
        async with dns_relay(upstream, [at(failing)]) as (_relay, address):
            for qid in (4, 5):  # a server's SERVFAIL is passed on, and never cached
                assert_servfail(
                    await udp_ask(address, build_query("www.example.", qid=qid)),
                    qid=qid,
                    name="www.example.",
                )
        assert len(failing.queries) == 3


@async_test
async def test_all_servers_dead_is_servfail_at_once() -> None:
    async with Socks5Server() as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with dns_relay(upstream, [at(free_port()), at(free_port())]) as (_relay, address):
            started = time.monotonic()
            reply = await udp_ask(address, build_query("www.example.", qid=0x0BAD))
            assert time.monotonic() - started < 0.5
            assert_servfail(reply, qid=0x0BAD, name="www.example.")
            replies = await tcp_ask(address, build_query("www.example.", qid=0x0BAE))
            assert_servfail(replies[0], qid=0x0BAE, name="www.example.")
        assert len(proxy.requests) == 4


@pytest.mark.parametrize("proxy_state", ["refusing", "silent"])
@async_test
async def test_dead_proxy_is_servfail_within_the_deadline(proxy_state: str) -> None:
    async with DnsTcpServer(WWW) as dns, SilentServer() as silent:
        port = free_port() if proxy_state == "refusing" else silent.port
        servers = [at(dns)] * 3  # three silent attempts would exceed the overall deadline
        async with dns_relay(spec(NetworkType.SOCKS5, port), servers) as (_relay, address):
            started = time.monotonic()
            reply = await udp_ask(address, build_query("www.example.", qid=77))
            elapsed = time.monotonic() - started
            assert_servfail(reply, qid=77, name="www.example.")
            assert elapsed < FAST.query_timeout + 0.5
        assert dns.queries == []


@async_test
async def test_queries_beyond_the_inflight_limit_get_servfail_at_once() -> None:
    options = DnsOptions(attempt_timeout=2.0, query_timeout=3.0, max_inflight=1)
    async with DnsTcpServer(WWW, reply_delay=0.5) as dns, Socks5Server() as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with dns_relay(upstream, [at(dns)], options=options) as (_relay, address):
            first = asyncio.create_task(udp_ask(address, build_query("www.example.", qid=1)))
            await wait_for(lambda: len(dns.queries) == 1)
            started = time.monotonic()
            second = await udp_ask(address, build_query("other.example.", qid=2))
            assert time.monotonic() - started < 0.3
            assert_servfail(second, qid=2, name="other.example.")
            assert_answer(await first, qid=1, name="www.example.", address="192.0.2.10")


@async_test
async def test_pooled_tunnel_closed_by_the_server_is_replaced() -> None:
    records = {(f"p{i}.example.", TYPE_A): [(300, a_record(f"192.0.2.{i}"))] for i in range(3)}
    async with DnsTcpServer(records, close_after_answer=True) as dns, Socks5Server() as proxy:
        async with dns_relay(spec(NetworkType.SOCKS5, proxy.port), [at(dns)]) as (_r, address):
            for i in range(3):
                reply = await udp_ask(address, build_query(f"p{i}.example.", qid=i))
                assert_answer(reply, qid=i, name=f"p{i}.example.", address=f"192.0.2.{i}")
                if i == 1:
                    await asyncio.sleep(0.1)  # let the EOF reach the pooled tunnel first
        assert proxy.requests == [dns.address] * 3


@async_test
async def test_idle_tunnels_are_closed_after_the_idle_timeout() -> None:
    options = DnsOptions(attempt_timeout=1.0, query_timeout=2.0, pool_idle_timeout=0.2)
    async with DnsTcpServer(WWW) as dns, Socks5Server() as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with dns_relay(upstream, [at(dns)], options=options) as (_relay, address):
            await udp_ask(address, build_query("www.example."))
            await wait_for(lambda: dns.accepted == 1 and not dns._tasks)  # the tunnel ended
            await udp_ask(address, build_query("www.example.", 28))
        assert proxy.requests == [dns.address] * 2


@async_test
async def test_credentials_are_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with Socks5Server(username="alice", password="wrong") as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port, "alice", "pa55:word")
        async with dns_relay(upstream, [at(free_port())]) as (_relay, address):
            reply = await udp_ask(address, build_query("www.example.", qid=8))
            assert_servfail(reply, qid=8, name="www.example.")
    assert proxy.auth_failures == 1
    assert "pa55" not in caplog.text
    assert "DNS server" in caplog.text


# -- the cache -------------------------------------------------------------------------


@async_test
async def test_cache_answers_until_the_ttl_expires() -> None:
    records = {("short.example.", TYPE_A): [(1, a_record("192.0.2.1"))]}
    async with (
        DnsTcpServer(records, soa_minimum=60) as dns,
        Socks5Server() as proxy,
        dns_relay(spec(NetworkType.SOCKS5, proxy.port), [at(dns)]) as (_r, address),
    ):
        for qid in (1, 2):
            reply = await udp_ask(address, build_query("short.example.", qid=qid))
            assert_answer(reply, qid=qid, name="short.example.", address="192.0.2.1")
        replies = await tcp_ask(address, build_query("SHORT.example.", qid=3))
        assert_answer(replies[0], qid=3, name="SHORT.example.", address="192.0.2.1")
        assert dns.queries == [("short.example.", TYPE_A)]
        await asyncio.sleep(1.05)
        reply = await udp_ask(address, build_query("short.example.", qid=4))
        assert_answer(reply, qid=4, name="short.example.", address="192.0.2.1")
        assert len(dns.queries) == 2
        for qid in (5, 6):  # NXDOMAIN with an SOA is cached too (RFC 2308)
            reply = await udp_ask(address, build_query("nope.example.", qid=qid))
            assert (decode(reply).id, decode(reply).rcode) == (qid, 3)
        assert len(dns.queries) == 3


@async_test
async def test_new_servers_or_upstream_empty_the_cache_and_keep_the_address() -> None:
    other = {("www.example.", TYPE_A): [(300, a_record("203.0.113.9"))]}
    async with (
        DnsTcpServer(WWW) as first,
        DnsTcpServer(other) as second,
        Socks5Server() as socks,
        HttpConnectServer() as http,
    ):
        async with dns_relay(spec(NetworkType.SOCKS5, socks.port), [at(first)]) as (relay, address):
            assert_answer(
                await udp_ask(address, build_query("www.example.", qid=1)),
                qid=1,
                name="www.example.",
                address="192.0.2.10",
            )
            await relay.ensure_listener(
                container_id=CID,
                listen_ip=LOOPBACK,
                port=0,
                upstream=spec(NetworkType.SOCKS5, socks.port),
                dns_servers=[at(second)],
                dns_port=0,
            )
            assert relay.dns_addresses() == {CID: address}  # not reopened
            assert_answer(
                await udp_ask(address, build_query("www.example.", qid=2)),
                qid=2,
                name="www.example.",
                address="203.0.113.9",
            )
            await relay.ensure_listener(
                container_id=CID,
                listen_ip=LOOPBACK,
                port=0,
                upstream=spec(NetworkType.HTTP, http.port),
                dns_servers=[at(second)],
                dns_port=0,
            )
            assert relay.dns_addresses() == {CID: address}
            await udp_ask(address, build_query("www.example.", qid=3))
        assert socks.requests == [first.address, second.address]
        assert http.requests == [second.address]
        assert len(second.queries) == 2


# -- truncation ------------------------------------------------------------------------


@async_test
async def test_large_answer_is_truncated_over_udp_and_whole_over_tcp() -> None:
    texts = [(300, txt_rdata(bytes([65 + i]) * 60)) for i in range(20)]
    async with DnsTcpServer({("big.example.", TYPE_TXT): texts}) as dns, Socks5Server() as proxy:
        async with dns_relay(spec(NetworkType.SOCKS5, proxy.port), [at(dns)]) as (_r, address):
            cut = decode(await udp_ask(address, build_query("big.example.", TYPE_TXT, qid=1)))
            assert cut.tc and cut.qr and cut.id == 1
            assert (cut.ancount, cut.question) == (0, ("big.example.", TYPE_TXT, CLASS_IN))
            small_edns = await udp_ask(address, build_query("big.example.", TYPE_TXT, edns=1232))
            assert decode(small_edns).tc
            whole = await udp_ask(address, build_query("big.example.", TYPE_TXT, qid=2, edns=4096))
            assert not decode(whole).tc and len(decode(whole).answers) == 20
            (over_tcp,) = await tcp_ask(address, build_query("big.example.", TYPE_TXT, qid=3))
            decoded = decode(over_tcp)
            assert not decoded.tc and decoded.id == 3
            assert [rdata for _t, _ttl, rdata in decoded.answers] == [r for _ttl, r in texts]
        assert len(dns.queries) == 1  # the rest came from the cache


# -- malformed input -------------------------------------------------------------------


@async_test
async def test_malformed_queries_are_dropped_or_get_formerr() -> None:
    async with DnsTcpServer(WWW) as dns, Socks5Server() as proxy:
        async with dns_relay(spec(NetworkType.SOCKS5, proxy.port), [at(dns)]) as (_r, address):
            await udp_no_reply(address, b"\x12\x34\x01")  # shorter than a header
            query = build_query("www.example.", qid=5)
            await udp_no_reply(address, build_response(query))  # a response, not a query
            two = bytearray(query)
            two[5] = 2  # QDCOUNT 2
            formerr = decode(await udp_ask(address, bytes(two)))
            assert (formerr.id, formerr.qr, formerr.rcode) == (5, True, 1)
            looped = query[:12] + b"\xc0\x0c\x00\x01\x00\x01"
            assert decode(await udp_ask(address, looped)).rcode == 1
            (over_tcp,) = await tcp_ask(address, bytes(two))
            assert decode(over_tcp).rcode == 1
            assert_answer(
                await udp_ask(address, query), qid=5, name="www.example.", address="192.0.2.10"
            )
        assert len(dns.queries) == 1


@async_test
async def test_tcp_client_is_closed_when_idle_or_breaking_framing() -> None:
    options = DnsOptions(attempt_timeout=1.0, query_timeout=2.0, tcp_idle_timeout=0.2)
    async with DnsTcpServer(WWW) as dns, Socks5Server() as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with dns_relay(upstream, [at(dns)], options=options) as (_relay, address):
            async with connection(address) as (reader, _writer):
                started = time.monotonic()
                assert await read_until_closed(reader) == b""
                assert time.monotonic() - started < 2.0
            async with connection(address) as (reader, writer):
                writer.write(b"\x00\x05hello")  # shorter than a DNS header
                assert await read_until_closed(reader) == b""


# -- lifecycle -------------------------------------------------------------------------


@async_test
async def test_remove_listener_closes_dns_endpoints_and_cancels_queries() -> None:
    async with (
        DnsTcpServer(WWW, reply_delay=5.0) as dns,
        Socks5Server() as proxy,
        dns_relay(spec(NetworkType.SOCKS5, proxy.port), [at(dns)]) as (relay, address),
    ):
        pending = asyncio.create_task(udp_ask(address, build_query("www.example."), timeout=1))
        await wait_for(lambda: len(dns.queries) == 1)
        started = time.monotonic()
        await relay.remove_listener(CID)
        assert time.monotonic() - started < 1.0
        assert relay.dns_addresses() == {}
        with pytest.raises(TimeoutError):
            await pending
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*address)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind(address)  # no SO_REUSEADDR: succeeds only if the endpoint is gone
        await relay.remove_listener(CID)  # idempotent


@async_test
async def test_dns_endpoint_follows_the_configuration() -> None:
    async with DnsTcpServer(WWW) as dns, Socks5Server() as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port)
        async with dns_relay(upstream, [at(dns)]) as (relay, address):
            listener = relay.listener_addresses()[CID]
            new_port = free_port()
            await relay.ensure_listener(
                container_id=CID,
                listen_ip=LOOPBACK,
                port=0,
                upstream=upstream,
                dns_servers=[at(dns)],
                dns_port=new_port,
            )
            moved = (LOOPBACK, new_port)
            assert relay.dns_addresses() == {CID: moved}
            assert relay.listener_addresses() == {CID: listener}  # the TCP listener stayed
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*address)
            assert_answer(
                await udp_ask(moved, build_query("www.example.", qid=9)),
                qid=9,
                name="www.example.",
                address="192.0.2.10",
            )
            await relay.ensure_listener(
                container_id=CID, listen_ip=LOOPBACK, port=0, upstream=upstream
            )
            assert relay.dns_addresses() == {}
            assert relay.listener_addresses() == {CID: listener}
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection(*moved)


@async_test
async def test_bad_dns_servers_are_refused_before_anything_changes() -> None:
    relay = Relay(original_dst=no_original_dst)
    try:
        upstream = spec(NetworkType.SOCKS5, free_port())
        for servers, error in ((["dns.example"], ValueError), ("1.1.1.1", TypeError)):
            with pytest.raises(error):
                await relay.ensure_listener(
                    container_id=CID,
                    listen_ip=LOOPBACK,
                    port=0,
                    upstream=upstream,
                    dns_servers=servers,
                )
        assert relay.listener_addresses() == {}
    finally:
        await relay.close()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1.1.1.1", ("1.1.1.1", 53)),
        ("2606:4700:4700::1111", ("2606:4700:4700::1111", 53)),
        ("127.0.0.1:5353", ("127.0.0.1", 5353)),
        ("[::1]:5353", ("::1", 5353)),
    ],
)
def test_parse_dns_server(value: str, expected: tuple[str, int]) -> None:
    assert parse_dns_server(value) == expected


@pytest.mark.parametrize("value", ["dns.example", "1.1.1.1:0", "::1:99999", "[::1]", "1.1.1.1:x"])
def test_parse_dns_server_refuses(value: str) -> None:
    with pytest.raises(ValueError, match="DNS server"):
        parse_dns_server(value)


# -- framing ---------------------------------------------------------------------------


@async_test
async def test_dns_stream_reassembles_split_messages_and_checks_framing() -> None:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    with theirs:
        theirs.setblocking(False)
        stream = DnsStream(SocketChannel(ours), buffered=b"\x00")
        message = build_query("split.example.")
        data = bytes([len(message)]) + message + framed(message)
        for offset in range(0, len(data), 7):
            await loop.sock_sendall(theirs, data[offset : offset + 7])
        assert await stream.read_message() == message
        assert await stream.read_message() == message
        await loop.sock_sendall(theirs, framed(message)[:10])
        theirs.shutdown(socket.SHUT_WR)
        with pytest.raises(DnsStreamError, match="inside a message"):
            await stream.read_message()
        stream.abort()
    ours, theirs = socket.socketpair()
    with theirs:
        stream = DnsStream(SocketChannel(ours))
        theirs.sendall(framed(message))
        with pytest.raises(DnsStreamError, match="out of bounds"):
            await stream.read_message(max_size=len(message) - 1)
        theirs.shutdown(socket.SHUT_WR)
        await stream.close()
    ours, theirs = socket.socketpair()
    with theirs:
        stream = DnsStream(SocketChannel(ours))
        theirs.close()
        assert await stream.read_message() is None
        await stream.close()


def test_truncation_reference_sizes() -> None:
    """The fixture above really exceeds 512 bytes without EDNS and fits in 4096."""
    query = build_query("big.example.", TYPE_TXT)
    answers = tuple(rr(POINTER_TO_QUESTION, TYPE_TXT, 300, txt_rdata(b"x" * 60)) for _ in range(20))
    assert 1232 < len(build_response(query, answers=answers)) <= 4096


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
@async_test
async def test_dns_endpoint_on_ipv6() -> None:
    async with DnsTcpServer(WWW) as dns, Socks5Server() as proxy:
        relay = Relay(original_dst=no_original_dst, dns_options=FAST)
        try:
            await relay.ensure_listener(
                container_id=CID,
                listen_ip="0:0::1",
                port=0,
                upstream=spec(NetworkType.SOCKS5, proxy.port),
                dns_servers=[at(dns)],
                dns_port=0,
            )
            host, port = relay.dns_addresses()[CID]
            assert host == "::1"
            loop = asyncio.get_running_loop()
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.connect((host, port))
                await loop.sock_sendall(sock, build_query("www.example.", qid=6))
                reply = await asyncio.wait_for(loop.sock_recv(sock, 4096), 3)
            assert_answer(reply, qid=6, name="www.example.", address="192.0.2.10")
            (over_tcp,) = await tcp_ask((host, port), build_query("www.example.", qid=7))
            assert_answer(over_tcp, qid=7, name="www.example.", address="192.0.2.10")
        finally:
            await relay.close()
