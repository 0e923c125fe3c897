"""The integration peers work, and prove what later tests rely on.

The remote host answers only through a proxy, sees the proxy's egress address,
and the proxies refuse bad credentials and targets outside 198.18.0.0/15. Every
fixture leaves nothing behind, even when the test body fails.
"""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest

from tests.integration.peers import (
    REFUSED_TARGET,
    Dante,
    HttpsProxy,
    ManagedProcess,
    RemoteHttpServer,
    SystemUser,
    Tinyproxy,
    UpstreamWorld,
    curl,
    netns_names,
    run,
)

pytestmark = pytest.mark.root


def test_proxy_host_reaches_remote_host(
    upstream_world: UpstreamWorld, remote_http: RemoteHttpServer
) -> None:
    result = curl(remote_http.url, ns=upstream_world.proxy_ns)

    assert result.returncode == 0, result.stderr
    assert result.stdout.encode() == remote_http.body
    assert remote_http.peers() == [upstream_world.proxy_egress_ip]


def test_host_has_no_path_to_remote_host(
    upstream_world: UpstreamWorld, remote_http: RemoteHttpServer
) -> None:
    # Checked before anything is sent: the host must never fall back to its default route.
    route = run(["ip", "route", "get", upstream_world.remote_ip], check=False)
    assert route.returncode != 0 or route.stdout.startswith("unreachable"), route.stdout

    with pytest.raises(OSError) as excinfo:
        socket.create_connection((upstream_world.remote_ip, 80), timeout=2).close()

    assert excinfo.value.errno in {errno.EHOSTUNREACH, errno.ENETUNREACH}
    assert remote_http.peers() == []
    back = upstream_world.remote_ns.run(["ip", "route", "get", upstream_world.host_ip], check=False)
    assert back.returncode != 0, f"remote host has a route back to the host: {back.stdout}"


def test_dante_relays_with_username_auth(dante: Dante, remote_http: RemoteHttpServer) -> None:
    result = curl(remote_http.url, proxy=dante.url)

    assert result.returncode == 0, result.stderr
    assert result.stdout.encode() == remote_http.body
    assert remote_http.peers() == [dante.external_ip]
    log = dante.wait_log("pass(1): tcp/connect ]")  # the session's end line
    assert f"username%{dante.username}@" in log
    assert f"{remote_http.ip}.80" in log


def test_dante_rejects_wrong_password(dante: Dante, remote_http: RemoteHttpServer) -> None:
    wrong = f"socks5://{dante.username}:not-{dante.password}@{dante.host}:{dante.port}"

    result = curl(remote_http.url, proxy=wrong)

    assert result.returncode != 0
    assert remote_http.peers() == []
    dante.wait_log(f'password authentication failed for user "{dante.username}"')


def test_dante_without_auth(dante_noauth: Dante, remote_http: RemoteHttpServer) -> None:
    assert dante_noauth.username is None

    result = curl(remote_http.url, proxy=dante_noauth.url)

    assert result.returncode == 0, result.stderr
    assert remote_http.peers() == [dante_noauth.external_ip]


def test_dante_refuses_targets_outside_test_net(dante_noauth: Dante) -> None:
    result = curl(f"http://{REFUSED_TARGET}/", proxy=dante_noauth.url)

    assert result.returncode != 0
    log = dante_noauth.wait_log(f"{REFUSED_TARGET}.80")
    assert "block(2): tcp/connect ]: " in log


def test_tinyproxy_connect_with_basic_auth(
    tinyproxy: Tinyproxy, remote_http: RemoteHttpServer
) -> None:
    result = curl(remote_http.url, proxy=tinyproxy.url, tunnel=True)

    assert result.returncode == 0, result.stderr
    assert result.stdout.encode() == remote_http.body
    assert remote_http.peers() == [tinyproxy.world.proxy_egress_ip]
    tinyproxy.wait_log(f"CONNECT {remote_http.ip}:80")


def test_tinyproxy_rejects_wrong_password(
    tinyproxy: Tinyproxy, remote_http: RemoteHttpServer
) -> None:
    wrong = (
        f"http://{tinyproxy.username}:not-{tinyproxy.password}@{tinyproxy.host}:{tinyproxy.port}"
    )

    result = curl(remote_http.url, proxy=wrong, tunnel=True)

    assert result.returncode != 0
    assert "response 401" in result.stderr
    assert remote_http.peers() == []


def test_tinyproxy_refuses_targets_outside_test_net(tinyproxy: Tinyproxy) -> None:
    result = curl(f"http://{REFUSED_TARGET}/", proxy=tinyproxy.url, tunnel=True)

    assert "response 403" in result.stderr
    tinyproxy.wait_log(f'refused on filtered domain "{REFUSED_TARGET}"')


def test_https_proxy_connect_over_tls(
    https_proxy: HttpsProxy, remote_http: RemoteHttpServer
) -> None:
    result = curl(
        remote_http.url, proxy=https_proxy.url, proxy_cacert=https_proxy.ca_path, tunnel=True
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.encode() == remote_http.body
    assert remote_http.peers() == [https_proxy.tinyproxy.world.proxy_egress_ip]
    https_proxy.stunnel.wait_log("TLS accepted")
    https_proxy.tinyproxy.wait_log(f"CONNECT {remote_http.ip}:80")


def test_https_proxy_certificate_is_verified(
    https_proxy: HttpsProxy, remote_http: RemoteHttpServer
) -> None:
    # Without the test CA, curl must refuse the proxy's certificate.
    result = curl(remote_http.url, proxy=https_proxy.url, tunnel=True)

    assert result.returncode == 60, result.stderr
    assert remote_http.peers() == []


def _alive(process: ManagedProcess) -> bool:
    try:
        os.kill(process.pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_teardown_leaves_nothing_even_on_failure() -> None:
    class Boom(Exception):
        pass

    with (
        pytest.raises(Boom),
        UpstreamWorld() as world,
        RemoteHttpServer(world.remote_ns, world.remote_ip) as server,
        SystemUser() as user,
        Dante(world, user=user) as dante,
        HttpsProxy(world) as https_proxy,
    ):
        processes = [
            server.process,
            dante.process,
            https_proxy.tinyproxy.process,
            https_proxy.stunnel.process,
        ]
        dirs = [server.dir, dante.dir, https_proxy.tinyproxy.dir, https_proxy.stunnel.dir]
        assert curl(server.url, proxy=dante.url).returncode == 0
        raise Boom

    assert {world.proxy_ns.name, world.remote_ns.name}.isdisjoint(netns_names())
    links = run(["ip", "-br", "link"]).stdout
    assert world.suffix not in links
    assert str(world.remote_net) not in run(["ip", "route", "show", "table", "all"]).stdout
    assert run(["getent", "passwd", user.name], check=False).returncode == 2
    assert not [p.argv[0] for p in processes if _alive(p)]
    if not os.environ.get("EGT_KEEP"):
        assert not [d for d in dirs if Path(d).exists()]
