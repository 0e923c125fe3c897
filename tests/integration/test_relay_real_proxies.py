"""The relay and the probe against real third-party proxies (dante, tinyproxy, stunnel).

The relay runs in the host namespace on 127.0.0.1 with an injected original
destination: the remote HTTP server of ``upstream_world``, which the host
cannot reach except through the proxy host. The remote server's view of the
peer address proves each request went through the proxy.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import pytest

from egressd.model import NetworkType, ProxySpec
from egressd.relay import Relay, probe_upstream
from tests.integration.peers import REMOTE_BODY, Dante, HttpsProxy, RemoteHttpServer, Tinyproxy
from tests.unit.test_relay_peers import close_writer, read_until_closed

CID = "0123456789abcdef01234567"


def proxy_spec(
    scheme: NetworkType, peer: Dante | Tinyproxy | HttpsProxy, *, password: str | None = None
) -> ProxySpec:
    return ProxySpec(
        scheme=scheme,
        host=peer.host,
        port=peer.port,
        username=peer.username,
        password=password if password is not None else peer.password,
    )


def http_get(remote: RemoteHttpServer, *, half_close: bool, upstream: ProxySpec,
             ssl_context: ssl.SSLContext | None = None) -> bytes:  # fmt: skip
    """One HTTP/1.0 GET through a fresh relay; returns the raw response."""

    async def main() -> bytes:
        relay = Relay(
            connect_timeout=5,
            handshake_timeout=5,
            original_dst=lambda _sock: (remote.ip, remote.port),
            ssl_context=ssl_context,
        )
        try:
            await relay.ensure_listener(
                container_id=CID, listen_ip="127.0.0.1", port=0, upstream=upstream
            )
            reader, writer = await asyncio.open_connection(*relay.listener_addresses()[CID])
            try:
                writer.write(f"GET / HTTP/1.0\r\nHost: {remote.ip}\r\n\r\n".encode())
                if half_close:
                    writer.write_eof()
                return await read_until_closed(reader)
            finally:
                await close_writer(writer)
        finally:
            await relay.close()

    return asyncio.run(asyncio.wait_for(main(), 30))


@pytest.mark.parametrize("half_close", [False, True])
def test_relay_through_dante_with_auth(
    dante: Dante, remote_http: RemoteHttpServer, half_close: bool
) -> None:
    response = http_get(
        remote_http, half_close=half_close, upstream=proxy_spec(NetworkType.SOCKS5, dante)
    )
    assert response.startswith(b"HTTP/1.") and b" 200 " in response[:20]
    assert response.endswith(REMOTE_BODY)
    assert remote_http.peers() == [dante.external_ip]


def test_relay_through_dante_without_auth(
    dante_noauth: Dante, remote_http: RemoteHttpServer
) -> None:
    upstream = proxy_spec(NetworkType.SOCKS5, dante_noauth)
    assert upstream.username is None
    response = http_get(remote_http, half_close=True, upstream=upstream)
    assert response.endswith(REMOTE_BODY)
    assert remote_http.peers() == [dante_noauth.external_ip]


def test_relay_with_wrong_password_reaches_nothing(
    dante: Dante, remote_http: RemoteHttpServer
) -> None:
    upstream = proxy_spec(NetworkType.SOCKS5, dante, password="wrong-password")
    assert http_get(remote_http, half_close=False, upstream=upstream) == b""
    assert remote_http.peers() == []


# No half-close through tinyproxy: it ends the whole tunnel at the client's EOF (its own
# limitation; the relay passes the EOF on as it should), so the answer would be lost.
def test_relay_through_tinyproxy(tinyproxy: Tinyproxy, remote_http: RemoteHttpServer) -> None:
    response = http_get(
        remote_http, half_close=False, upstream=proxy_spec(NetworkType.HTTP, tinyproxy)
    )
    assert response.endswith(REMOTE_BODY)
    assert remote_http.peers() == [tinyproxy.world.proxy_egress_ip]


def test_relay_through_stunnel_and_tinyproxy(
    https_proxy: HttpsProxy, remote_http: RemoteHttpServer
) -> None:
    context = ssl.create_default_context(cafile=str(https_proxy.ca_path))
    response = http_get(
        remote_http,
        half_close=False,
        upstream=proxy_spec(NetworkType.HTTPS, https_proxy),
        ssl_context=context,
    )
    assert response.endswith(REMOTE_BODY)
    assert len(remote_http.peers()) == 1


def probe(upstream: ProxySpec, *, ca_path: Path | None = None) -> tuple[bool, bool, str | None]:
    context = ssl.create_default_context(cafile=str(ca_path)) if ca_path else None
    result = asyncio.run(probe_upstream(upstream, timeout=5, ssl_context=context))
    if result.reachable and result.error is None:
        assert result.latency_ms is not None
    return result.reachable, result.auth_failed, result.error


def test_probe_dante(dante: Dante) -> None:
    assert probe(proxy_spec(NetworkType.SOCKS5, dante)) == (True, False, None)
    reachable, auth_failed, error = probe(proxy_spec(NetworkType.SOCKS5, dante, password="nope"))
    assert (reachable, auth_failed) == (True, True)
    assert error is not None and "rejected the username/password" in error


def test_probe_tinyproxy(tinyproxy: Tinyproxy) -> None:
    assert probe(proxy_spec(NetworkType.HTTP, tinyproxy)) == (True, False, None)
    reachable, auth_failed, error = probe(proxy_spec(NetworkType.HTTP, tinyproxy, password="no"))
    assert (reachable, auth_failed) == (True, True)
    assert error is not None and "answered 401 Unauthorized" in error  # tinyproxy's way


def test_probe_https(https_proxy: HttpsProxy) -> None:
    upstream = proxy_spec(NetworkType.HTTPS, https_proxy)
    assert probe(upstream, ca_path=https_proxy.ca_path) == (True, False, None)
    reachable, auth_failed, error = probe(upstream)  # system trust store: test CA unknown
    assert (reachable, auth_failed) == (False, False)
    assert error is not None and "certificate verify failed" in error
