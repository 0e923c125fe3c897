"""End to end, real parts: egressd serve, a netns container, dante, a remote host.

The container's own network reaches the remote host directly (see
``DirectContainer``), so every assertion "went through the proxy" is checked
against the remote host's view of the peer address, and every "blocked"
against what would otherwise have arrived.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from egressd.client import ApiError
from tests.integration.egressd_proc import (
    DirectContainer,
    EgressdServer,
    link_state,
    send_udp,
    udp_sink,
)
from tests.integration.peers import Dante, RemoteHttpServer, UpstreamWorld


@pytest.fixture
def server() -> Iterator[EgressdServer]:
    with EgressdServer() as srv:
        yield srv


@pytest.fixture
def container(upstream_world: UpstreamWorld) -> Iterator[DirectContainer]:
    with DirectContainer(upstream_world) as c:
        yield c


def register(server: EgressdServer, container: DirectContainer) -> str:
    with server.client() as c:
        return str(c.containers.create(ref=container.ns.name)["id"])


def test_socks5_then_stop_then_block(
    server: EgressdServer,
    container: DirectContainer,
    dante: Dante,
    remote_http: RemoteHttpServer,
    upstream_world: UpstreamWorld,
    tmp_path: Path,
) -> None:
    url = f"http://{upstream_world.remote_ip}/"
    # Before egressd: the container's own network reaches the remote host directly.
    before = link_state(container.ns)
    assert container.curl(url).stdout == remote_http.body.decode()
    assert remote_http.peers()[-1] == container.ip

    cid = register(server, container)
    with server.client() as c:
        c.containers.update_network_config(
            id=cid,
            data={"type": "socks5", "proxy": dante.url, "dns_servers": [upstream_world.remote_ip]},
        )
        started = c.containers.start_network(id=cid)
        assert started["status"] == "running" and started["is_running"] is True
        details = started["bridge_details"]

        # Through the proxy: the remote host sees dante's address, not the container's.
        r = container.curl(url)
        assert r.returncode == 0, r.stderr
        assert r.stdout == remote_http.body.decode()
        assert remote_http.peers()[-1] == dante.external_ip
        dante.wait_log(upstream_world.remote_ip)
        got = c.containers.get_network_config(id=cid)
        assert got["status"] == "running"
        assert got["remote_status"]["bridge_details"] == details
        assert got["remote_status"]["upstream"]["reachable"] is True

        # Nothing but TCP leaves: UDP to the remote host does not arrive, nor IPv6.
        with udp_sink(upstream_world.remote_ns, container.gw, 9999, tmp_path / "udp.log") as log:
            send_udp(container, container.gw, 9999, "leak-under-proxy")
            assert container.curl(f"http://[{container.gw6}]/", "-6").returncode != 0
            time.sleep(0.3)
            assert "leak" not in log.read_text()

        # Stop: back to exactly the earlier links, addresses and routes; direct again.
        stopped = c.containers.stop_network(id=cid)
        assert stopped["status"] == "stopped" and stopped["is_running"] is False
        assert link_state(container.ns) == before
        assert container.curl(url).returncode == 0
        assert remote_http.peers()[-1] == container.ip

        # Block: TCP, UDP and IPv6 all fail; nothing reaches the remote host.
        c.containers.update_network_config(id=cid, data={"type": "block"})
        assert c.containers.start_network(id=cid)["status"] == "running"
        seen = len(remote_http.peers())
        with udp_sink(upstream_world.remote_ns, container.gw, 9998, tmp_path / "udp2.log") as log:
            assert container.curl(url).returncode != 0
            assert send_udp(container, container.gw, 9998, "leak-under-block").startswith("error")
            assert container.sh(["ping", "-6", "-c", "1", "-W", "1", container.gw6]).returncode != 0
            time.sleep(0.3)
            assert "leak" not in log.read_text()
        assert len(remote_http.peers()) == seen

        # DELETE: the container's network is its own again.
        c.containers.remove_network_config(id=cid)
        assert link_state(container.ns) == before
        assert container.curl(url).returncode == 0


def test_wrong_credentials_report_error_and_pass_nothing(
    server: EgressdServer,
    container: DirectContainer,
    dante: Dante,
    remote_http: RemoteHttpServer,
    upstream_world: UpstreamWorld,
) -> None:
    cid = register(server, container)
    bad = f"socks5://{dante.username}:wrong-password@{dante.host}:{dante.port}"
    with server.client() as c:
        c.containers.update_network_config(
            id=cid, data={"type": "socks5", "proxy": bad, "dns_servers": [upstream_world.remote_ip]}
        )
        with pytest.raises(ApiError) as err:
            c.containers.start_network(id=cid)
        assert err.value.status_code == 500
        assert err.value.message == "Failed to start network service"
        assert err.value.reason and "rejected" in err.value.reason
        got = c.containers.get_network_config(id=cid)
        assert got["status"] == "error"
        assert "rejected" in got["status_reason"]
        assert got["remote_status"]["upstream"]["auth_failed"] is True
    assert container.curl(f"http://{upstream_world.remote_ip}/").returncode != 0
    assert remote_http.peers() == []


def test_config_survives_kill_9(server: EgressdServer, container: DirectContainer) -> None:
    import signal

    cid = register(server, container)
    with server.client() as c:
        c.containers.update_network_config(
            id=cid, data={"type": "block", "comment": "durable", "dns_servers": ["198.18.0.53"]}
        )
    server.kill(signal.SIGKILL)
    server.start()
    with server.client() as c:
        got = c.containers.get_network_config(id=cid)
    assert got["comment"] == "durable" and got["type"] == "block"
