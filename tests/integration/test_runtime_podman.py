"""End to end with a real Podman: a container registered by NAME, its egress through dante.

egressd finds the container's namespace through Podman's Docker-compatible
API (``EGRESSD_PODMAN_SOCKET`` -> a private ``podman system service``, see
``runtime_podman.py``). The container has ``--network none``: before
egressd it cannot reach anything, so a request that arrives at the remote
host went through egressd, and the remote host's view of the peer address
proves it went through the proxy.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from egressd.client import ApiError
from tests.integration.conftest import require_tools
from tests.integration.egressd_proc import EgressdServer
from tests.integration.peers import Dante, RemoteHttpServer, UpstreamWorld, run
from tests.integration.runtime_podman import PodmanSandbox, busybox_is_static


@pytest.fixture
def podman() -> Iterator[PodmanSandbox]:
    require_tools("podman", "runc", "conmon", "ldd")
    if not busybox_is_static():
        pytest.skip("needs a static /bin/busybox (apt package busybox-static, `make setup`)")
    with PodmanSandbox() as sandbox:
        yield sandbox


@pytest.fixture
def server(podman: PodmanSandbox) -> Iterator[EgressdServer]:
    with EgressdServer(extra_env={"EGRESSD_PODMAN_SOCKET": str(podman.socket_path)}) as srv:
        yield srv


def links_of(podman: PodmanSandbox, name: str) -> list[str]:
    netns = f"/proc/{podman.pid(name)}/ns/net"
    out = run(["nsenter", f"--net={netns}", "ip", "-j", "link", "show"]).stdout
    return sorted(link["ifname"] for link in json.loads(out))


def test_podman_container_by_name_egresses_through_dante(
    podman: PodmanSandbox,
    server: EgressdServer,
    dante: Dante,
    remote_http: RemoteHttpServer,
    upstream_world: UpstreamWorld,
) -> None:
    name = podman.run_container()
    remote_ip = upstream_world.remote_ip
    # --network none: no way out before egressd.
    assert links_of(podman, name) == ["lo"]
    assert podman.http_get(name, remote_ip).returncode != 0
    assert remote_http.peers() == []

    with server.client() as c:
        created = c.containers.create(ref=name, runtime="podman")
        assert created["runtime"] == "podman" and created["ref"] == name
        cid = str(created["id"])
        c.containers.update_network_config(
            id=cid, data={"type": "socks5", "proxy": dante.url, "dns_servers": [remote_ip]}
        )
        started = c.containers.start_network(id=cid)
        assert started["status"] == "running" and started["is_running"] is True, started
        assert links_of(podman, name) == ["egress0", "lo"]

        r = podman.http_get(name, remote_ip)
        assert r.returncode == 0, r.stderr
        assert remote_http.body.decode() in r.stdout
        assert remote_http.peers() == [upstream_world.proxy_egress_ip]
        dante.wait_log(remote_ip)

        c.containers.remove_network_config(id=cid)
        assert links_of(podman, name) == ["lo"]
        assert podman.http_get(name, remote_ip).returncode != 0
        assert len(remote_http.peers()) == 1


def test_podman_lookup_errors_are_reported(podman: PodmanSandbox, server: EgressdServer) -> None:
    stopped = podman.run_container()
    podman.podman("stop", "-t", "0", stopped)
    with server.client() as c:
        for ref, reason in (
            ("egt-pod-nosuch", "podman container 'egt-pod-nosuch' not found"),
            (stopped, f"podman container '{stopped}' is not running (status: exited)"),
        ):
            cid = str(c.containers.create(ref=ref, runtime="podman")["id"])
            c.containers.update_network_config(id=cid, data={"type": "block"})
            with pytest.raises(ApiError) as err:
                c.containers.start_network(id=cid)
            assert err.value.status_code == 500
            assert err.value.reason is not None and reason in err.value.reason
            got = c.containers.get_network_config(id=cid)
            assert got["status"] == "error" and reason in got["status_reason"]
