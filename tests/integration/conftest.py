"""Fixtures around the real peers of ``peers.py``.

Every test in this directory is marked ``root`` (see ``tests/conftest.py``). Each
fixture is function-scoped: a test gets its own namespaces, addresses, users and
processes, all removed when it ends, passed or failed.

``upstream_world``  UpstreamWorld: proxy_ns, remote_ns (Netns), host_ip, proxy_ip,
                    proxy_egress_ip, remote_ip, host_link_net, remote_net, *_if names
``remote_http``     RemoteHttpServer on remote_ip:80: url, body, peers(), requests()
``proxy_user``      SystemUser: name, password
``dante``           Dante, username auth as proxy_user: url, endpoint, host, port,
                    username, password, external_ip, log_text(), wait_log(needle)
``dante_noauth``    Dante, method none, on port 1081 (same attributes, no credentials)
``tinyproxy``       Tinyproxy (HTTP CONNECT, Basic auth) on 8888: url, endpoint, host, port,
                    username, password, log_text(), wait_log(needle)
``tinyproxy_noauth``, ``https_proxy_noauth``: the same without credentials (ports 8890, 8444)
``dnsmasq``         Dnsmasq on remote_ip:53 answering TEST_NAME: log_text(), queries()
``https_proxy``     HttpsProxy: stunnel 8443 -> tinyproxy 8889: url, endpoint, ca_path,
                    username, password, .tinyproxy, .stunnel (each with log_text/wait_log)

Proxies log asynchronously: assert on their logs with ``wait_log(needle)``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.dns_peer import Dnsmasq
from tests.integration.peers import (
    Dante,
    HttpsProxy,
    RemoteHttpServer,
    SystemUser,
    Tinyproxy,
    UpstreamWorld,
)

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.root)


def require_tools(*tools: str) -> None:
    """Skip when a peer's program is missing; under CI, fail instead."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        message = f"needs {', '.join(missing)} (run `make setup`)"
        if os.environ.get("CI"):
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture
def upstream_world() -> Iterator[UpstreamWorld]:
    require_tools("ip", "ss", "sysctl")
    with UpstreamWorld() as world:
        yield world


@pytest.fixture
def remote_http(upstream_world: UpstreamWorld) -> Iterator[RemoteHttpServer]:
    with RemoteHttpServer(upstream_world.remote_ns, upstream_world.remote_ip) as server:
        yield server


@pytest.fixture
def proxy_user() -> Iterator[SystemUser]:
    require_tools("useradd", "userdel", "chpasswd")
    with SystemUser() as user:
        yield user


@pytest.fixture
def dante(upstream_world: UpstreamWorld, proxy_user: SystemUser) -> Iterator[Dante]:
    require_tools("danted")
    with Dante(upstream_world, user=proxy_user) as proxy:
        yield proxy


@pytest.fixture
def dante_noauth(upstream_world: UpstreamWorld) -> Iterator[Dante]:
    require_tools("danted")
    with Dante(upstream_world, user=None, port=1081) as proxy:
        yield proxy


@pytest.fixture
def tinyproxy(upstream_world: UpstreamWorld) -> Iterator[Tinyproxy]:
    require_tools("tinyproxy")
    with Tinyproxy(upstream_world) as proxy:
        yield proxy


@pytest.fixture
def https_proxy(upstream_world: UpstreamWorld) -> Iterator[HttpsProxy]:
    require_tools("tinyproxy", "stunnel4", "openssl")
    with HttpsProxy(upstream_world, backend_port=8889) as proxy:
        yield proxy


@pytest.fixture
def tinyproxy_noauth(upstream_world: UpstreamWorld) -> Iterator[Tinyproxy]:
    require_tools("tinyproxy")
    with Tinyproxy(upstream_world, port=8890, auth=False) as proxy:
        yield proxy


@pytest.fixture
def https_proxy_noauth(upstream_world: UpstreamWorld) -> Iterator[HttpsProxy]:
    require_tools("tinyproxy", "stunnel4", "openssl")
    with HttpsProxy(upstream_world, port=8444, backend_port=8891, auth=False) as proxy:
        yield proxy


@pytest.fixture
def dnsmasq(upstream_world: UpstreamWorld) -> Iterator[Dnsmasq]:
    require_tools("dnsmasq")
    with Dnsmasq(upstream_world.remote_ns, upstream_world.remote_ip) as server:
        yield server
