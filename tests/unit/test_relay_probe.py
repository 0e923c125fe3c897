"""probe_upstream against loopback proxies: ok, auth failed, unreachable, silent, garbage."""

from __future__ import annotations

import asyncio
from pathlib import Path

from egressd.model import NetworkType
from egressd.relay import ProbeResult, probe_upstream
from tests.unit.test_relay_peers import (
    HttpConnectServer,
    LoopbackServer,
    Pki,
    SilentServer,
    Socks5Server,
    async_test,
    free_port,
    spec,
)


class GarbageServer(LoopbackServer):
    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await reader.read()


def assert_healthy(result: ProbeResult) -> None:
    assert result == ProbeResult(
        reachable=True, latency_ms=result.latency_ms, error=None, auth_failed=False
    )
    assert result.healthy
    assert result.latency_ms is not None and 0 <= result.latency_ms < 5000


@async_test
async def test_socks5_without_auth_ok() -> None:
    async with Socks5Server() as proxy:
        assert_healthy(await probe_upstream(spec(NetworkType.SOCKS5, proxy.port), timeout=2))
    assert proxy.requests == []  # the probe stops before CONNECT


@async_test
async def test_socks5_with_auth_ok() -> None:
    async with Socks5Server(username="alice", password="pw") as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port, "alice", "pw")
        assert_healthy(await probe_upstream(upstream, timeout=2))
    assert proxy.requests == []
    assert proxy.auth_failures == 0


@async_test
async def test_socks5_wrong_password() -> None:
    async with Socks5Server(username="alice", password="pw") as proxy:
        upstream = spec(NetworkType.SOCKS5, proxy.port, "alice", "nope")
        result = await probe_upstream(upstream, timeout=2)
    assert result.reachable and result.auth_failed and not result.healthy
    assert result.error == (
        f"socks5 proxy 127.0.0.1:{upstream.port} rejected the username/password "
        "(RFC 1929 status 0x01)"
    )
    assert result.latency_ms is not None


@async_test
async def test_socks5_credentials_missing() -> None:
    async with Socks5Server(username="alice", password="pw") as proxy:
        result = await probe_upstream(spec(NetworkType.SOCKS5, proxy.port), timeout=2)
    assert result.reachable and result.auth_failed
    assert result.error is not None and "requires authentication" in result.error


@async_test
async def test_http_ok_even_though_connect_is_refused() -> None:
    async with HttpConnectServer(username="alice", password="pw") as proxy:
        upstream = spec(NetworkType.HTTP, proxy.port, "alice", "pw")
        assert_healthy(
            await probe_upstream(upstream, timeout=2, probe_destination=("127.0.0.1", free_port()))
        )
    assert len(proxy.heads) == 1 and proxy.heads[0].startswith(b"CONNECT 127.0.0.1:")


@async_test
async def test_http_default_probe_destination_is_discard_port() -> None:
    async with HttpConnectServer() as proxy:
        result = await probe_upstream(spec(NetworkType.HTTP, proxy.port), timeout=2)
    assert result.healthy
    assert proxy.requests == [("127.0.0.1", 9)]


@async_test
async def test_http_407() -> None:
    async with HttpConnectServer(username="alice", password="pw") as proxy:
        upstream = spec(NetworkType.HTTP, proxy.port, "alice", "bad")
        result = await probe_upstream(upstream, timeout=2)
    assert result.reachable and result.auth_failed
    assert result.error == (
        f"http proxy 127.0.0.1:{upstream.port} answered 407 Proxy Authentication Required "
        "(credentials were sent)"
    )
    assert "bad" not in result.error


@async_test
async def test_https_ok_with_given_context(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with HttpConnectServer(tls=pki.server_context()) as proxy:
        result = await probe_upstream(
            spec(NetworkType.HTTPS, proxy.port), timeout=2, ssl_context=pki.client_context()
        )
    assert_healthy(result)


@async_test
async def test_https_untrusted_certificate(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    async with HttpConnectServer(tls=pki.server_context()) as proxy:
        port = proxy.port
        result = await probe_upstream(spec(NetworkType.HTTPS, port), timeout=2)
    assert not result.reachable and not result.auth_failed
    assert result.error is not None and "certificate verify failed" in result.error
    assert result.error.startswith(f"TLS to https proxy 127.0.0.1:{port} failed")


@async_test
async def test_unreachable() -> None:
    port = free_port()
    result = await probe_upstream(spec(NetworkType.SOCKS5, port), timeout=2)
    assert result == ProbeResult(
        reachable=False,
        latency_ms=None,
        error=f"cannot connect to socks5 proxy 127.0.0.1:{port}: Connection refused",
        auth_failed=False,
    )


@async_test
async def test_silent_proxy_times_out() -> None:
    async with SilentServer() as proxy:
        result = await probe_upstream(spec(NetworkType.HTTP, proxy.port), timeout=0.3)
    assert not result.reachable and not result.auth_failed
    assert result.error is not None and "within 0.3s" in result.error


@async_test
async def test_not_a_proxy() -> None:
    async with GarbageServer() as proxy:
        result = await probe_upstream(spec(NetworkType.SOCKS5, proxy.port), timeout=2)
    assert result.reachable and not result.auth_failed and not result.healthy
    assert result.error is not None and "is not a SOCKS5 proxy" in result.error
