"""Complete, leak-proof enforcement with real peers (issue: http/https, DNS, leaks).

Every container here also has a direct path to the remote host (its own
``eth0``), so a leak would show up at the remote host; each test checks
both that traffic went through the proxy and that nothing went around it.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.dns_peer import TEST_ANSWER, Capture, Dnsmasq, resolve_in
from tests.integration.egressd_proc import (
    DirectContainer,
    EgressdServer,
    enforce,
    send_udp,
    udp_sink,
    wait_status,
)
from tests.integration.peers import Dante, RemoteHttpServer, UpstreamWorld


@pytest.fixture
def container(upstream_world: UpstreamWorld) -> Iterator[DirectContainer]:
    with DirectContainer(upstream_world) as c:
        yield c


UPSTREAMS = {
    "socks5-auth": "dante",
    "socks5-noauth": "dante_noauth",
    "http-auth": "tinyproxy",
    "http-noauth": "tinyproxy_noauth",
    "https-auth": "https_proxy",
    "https-noauth": "https_proxy_noauth",
}


@pytest.mark.parametrize("kind", list(UPSTREAMS))
def test_each_upstream_type_carries_the_containers_tcp(
    kind: str,
    request: pytest.FixtureRequest,
    upstream_world: UpstreamWorld,
    container: DirectContainer,
    remote_http: RemoteHttpServer,
) -> None:
    proxy = request.getfixturevalue(UPSTREAMS[kind])
    ca = getattr(proxy, "ca_path", None)
    env = {"EGRESSD_UPSTREAM_CA_FILE": str(ca)} if ca else {}
    with EgressdServer(extra_env=env) as server:
        _, started = enforce(
            server,
            container,
            {
                "type": kind.split("-")[0],
                "proxy": proxy.url,
                "dns_servers": [upstream_world.remote_ip],
            },
        )
        assert started["status"] == "running", started
        r = container.curl(f"http://{upstream_world.remote_ip}/")
        assert r.returncode == 0, r.stderr
        assert r.stdout == remote_http.body.decode()
        # The remote host saw the proxy's address, and the proxy logged the session.
        assert remote_http.peers() == [upstream_world.proxy_egress_ip]
        log_owner = proxy.tinyproxy if hasattr(proxy, "tinyproxy") else proxy
        log_owner.wait_log(upstream_world.remote_ip)


def test_dns_goes_through_the_tunnel_and_never_direct(
    upstream_world: UpstreamWorld,
    container: DirectContainer,
    dante: Dante,
    dnsmasq: Dnsmasq,
    tmp_path: Path,
) -> None:
    with EgressdServer() as server:
        enforce(
            server,
            container,
            {"type": "socks5", "proxy": dante.url, "dns_servers": [upstream_world.remote_ip]},
        )
        direct = Capture(
            upstream_world.remote_ns, "any", f"port 53 and host {container.ip}", tmp_path / "direct"
        )
        host = Capture(None, upstream_world.host_if, "port 53", tmp_path / "host")
        with direct, host:
            # Whatever resolver the container names, the answer comes through the tunnel.
            for server_ip, tcp in (
                ("10.99.99.99", False),
                (container.gw, False),
                ("10.1.2.3", True),
            ):
                got = resolve_in(container.ns, server=server_ip, tcp=tcp)
                assert got == {"rcode": 0, "answers": [TEST_ANSWER]}, (server_ip, tcp, got)
            time.sleep(0.5)
            assert direct.lines() == []  # nothing to or from the container on port 53
            assert host.lines() == []  # the host itself sent no DNS: only the tunnel
        assert set(dnsmasq.query_sources()) == {upstream_world.proxy_egress_ip}


def test_dns_servfail_when_no_server_answers(
    upstream_world: UpstreamWorld, container: DirectContainer, dante: Dante
) -> None:
    dead = [f"{upstream_world.remote_ip.rsplit('.', 1)[0]}.250", "198.18.0.251"]
    with EgressdServer() as server:
        enforce(server, container, {"type": "socks5", "proxy": dante.url, "dns_servers": dead})
        started = time.monotonic()
        assert resolve_in(container.ns, server="10.99.99.99") == {"rcode": 2, "answers": []}
        assert time.monotonic() - started < 8


def test_nothing_but_tcp_and_dns_leaves_a_proxied_container(
    upstream_world: UpstreamWorld,
    container: DirectContainer,
    dante: Dante,
    remote_http: RemoteHttpServer,
    tmp_path: Path,
) -> None:
    with EgressdServer() as server:
        enforce(
            server,
            container,
            {"type": "socks5", "proxy": dante.url, "dns_servers": [upstream_world.remote_ip]},
        )
        with udp_sink(upstream_world.remote_ns, container.gw, 9999, tmp_path / "udp.log") as log:
            assert send_udp(container, container.gw, 9999, "leak-udp").startswith("error")
            assert container.sh(["ping", "-c", "1", "-W", "1", container.gw]).returncode != 0
            assert container.curl(f"http://[{container.gw6}]/", "-6").returncode != 0
            assert container.sh(["ping", "-6", "-c", "1", "-W", "1", container.gw6]).returncode != 0
            time.sleep(0.3)
            assert "leak" not in log.read_text()
        assert remote_http.peers() == []


def test_relay_killed_means_no_traffic(
    upstream_world: UpstreamWorld,
    container: DirectContainer,
    dante: Dante,
    remote_http: RemoteHttpServer,
) -> None:
    url = f"http://{upstream_world.remote_ip}/"
    with EgressdServer() as server:
        cid, _ = enforce(
            server,
            container,
            {"type": "socks5", "proxy": dante.url, "dns_servers": [upstream_world.remote_ip]},
        )
        assert container.curl(url).returncode == 0
        server.kill(signal.SIGKILL)  # the relay dies with the process
        assert container.curl(url).returncode != 0
        assert resolve_in(container.ns, server="10.99.99.99").get("rcode") is None
        assert remote_http.peers() == [upstream_world.proxy_egress_ip]  # only the first one
        # Back up: the agent adopts what it left and the relay listens again.
        server.start()
        wait_status(server, cid, "running")
        r = container.curl(url)
        assert r.returncode == 0, r.stderr
        assert remote_http.peers()[-1] == upstream_world.proxy_egress_ip


def test_upstream_down_fails_closed_and_status_follows(
    upstream_world: UpstreamWorld,
    container: DirectContainer,
    dante_noauth: Dante,
    remote_http: RemoteHttpServer,
) -> None:
    url = f"http://{upstream_world.remote_ip}/"
    with EgressdServer(probe_interval=0.5) as server:
        cid, _ = enforce(
            server,
            container,
            {
                "type": "socks5",
                "proxy": dante_noauth.url,
                "dns_servers": [upstream_world.remote_ip],
            },
        )
        assert container.curl(url).returncode == 0
        dante_noauth.process.stop()
        assert container.curl(url).returncode != 0
        got = wait_status(server, cid, "error")
        assert got["remote_status"]["upstream"]["reachable"] is False
        assert got["remote_status"]["is_running"] is True
        assert remote_http.peers() == [upstream_world.proxy_egress_ip]
        with Dante(upstream_world, user=None, port=dante_noauth.port):
            got = wait_status(server, cid, "running")
            assert got["status_reason"] is None
            assert container.curl(url).returncode == 0


def test_upstream_swap_drains_open_connections(
    upstream_world: UpstreamWorld,
    container: DirectContainer,
    dante: Dante,
    dante_noauth: Dante,
    remote_http: RemoteHttpServer,
) -> None:
    size = 6_000_000
    with EgressdServer() as server:
        cid, _ = enforce(
            server,
            container,
            {"type": "socks5", "proxy": dante.url, "dns_servers": [upstream_world.remote_ip]},
        )
        long = subprocess.Popen(
            container.ns.argv(
                ["curl", "-sS", "--max-time", "30", "--limit-rate", "1M", "-o", "/dev/null",
                 "-w", "%{size_download}", f"http://{upstream_world.remote_ip}/bytes/{size}"]
            ),
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            dante.wait_log(upstream_world.remote_ip)
            time.sleep(1)
            with server.client() as c:
                c.containers.update_network_config(
                    id=cid, data={"type": "socks5", "proxy": dante_noauth.url}
                )
            r = container.curl(f"http://{upstream_world.remote_ip}/")
            assert r.returncode == 0, r.stderr
            dante_noauth.wait_log(upstream_world.remote_ip)  # the new connection: new upstream
            out, _ = long.communicate(timeout=40)
        finally:
            if long.poll() is None:
                long.kill()
                long.wait()
        assert long.returncode == 0
        assert int(out) == size  # the open transfer finished on the old upstream
