"""Agent lifecycle with real parts: restarts, adoption, lost namespaces, garbage.

Issue "Agent lifecycle and scale-out": a restart (SIGTERM or SIGKILL) keeps
running containers fail-closed while the daemon is down, and the agent
adopts what it left without duplicating anything.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from egressd import dataplane
from egressd.model import Allocation
from tests.integration.egressd_proc import DirectContainer, EgressdServer, enforce, wait_status
from tests.integration.peers import Dante, RemoteHttpServer, UpstreamWorld, run


@pytest.fixture
def two_containers(
    upstream_world: UpstreamWorld,
) -> Iterator[tuple[DirectContainer, DirectContainer]]:
    with DirectContainer(upstream_world) as a, DirectContainer(upstream_world) as b:
        yield a, b


def start_socks5(server: EgressdServer, container: DirectContainer, proxy: str, dns: str) -> str:
    cid, started = enforce(
        server, container, {"type": "socks5", "proxy": proxy, "dns_servers": [dns]}
    )
    assert started["status"] == "running"
    return cid


def strip_handles(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: strip_handles(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [strip_handles(v) for v in value]
    return value


def ruleset(server: EgressdServer, cids: list[str], *containers: DirectContainer) -> Any:
    host = json.loads(run(["nft", "-j", "list", "table", "inet", server.table]).stdout)
    walls = [
        json.loads(container.ns.run(["nft", "-j", "list", "table", "inet", server.table]).stdout)
        for container in containers
    ]
    links = json.loads(run(["ip", "-j", "addr", "show"]).stdout)
    ours = sorted(
        (link["ifname"], [a["local"] for a in link.get("addr_info", [])])
        for link in links
        if link["ifname"][3:] in {cid[:12] for cid in cids}
    )
    return strip_handles({"host": host, "walls": walls, "links": ours})


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_restart_keeps_fail_closed_and_adopts_without_duplicates(
    sig: signal.Signals,
    upstream_world: UpstreamWorld,
    two_containers: tuple[DirectContainer, DirectContainer],
    dante: Dante,
    remote_http: RemoteHttpServer,
) -> None:
    a, b = two_containers
    url = f"http://{upstream_world.remote_ip}/"
    with EgressdServer() as server:
        cid_a = start_socks5(server, a, dante.url, upstream_world.remote_ip)
        cid_b = start_socks5(server, b, dante.url, upstream_world.remote_ip)
        before = ruleset(server, [cid_a, cid_b], a, b)
        long = subprocess.Popen(
            a.ns.argv(["curl", "-sS", "--max-time", "30", "--limit-rate", "500K", "-o", "/dev/null",
                       f"http://{upstream_world.remote_ip}/bytes/20000000"]),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            dante.wait_log(upstream_world.remote_ip)
            server.kill(sig)
            # Down: the walls stay, nothing gets out, nothing goes direct.
            assert ruleset(server, [cid_a, cid_b], a, b) == before
            assert b.curl(url).returncode != 0
            assert a.curl(url).returncode != 0
            long.wait(timeout=40)
        finally:
            if long.poll() is None:
                long.kill()
                long.wait()
        assert set(remote_http.peers()) == {upstream_world.proxy_egress_ip}
        seen = len(remote_http.peers())

        server.start()
        wait_status(server, cid_a, "running")
        wait_status(server, cid_b, "running")
        # The stored status still says running from before the crash; traffic
        # resumes on new connections once the agent has reopened the listeners.
        for container in (a, b):
            deadline = time.monotonic() + 20
            while (r := container.curl(url)).returncode != 0:
                assert time.monotonic() < deadline, r.stderr
                time.sleep(0.2)
        assert remote_http.peers()[seen:] == [upstream_world.proxy_egress_ip] * 2
        assert (
            ruleset(server, [cid_a, cid_b], a, b) == before
        )  # adopted: nothing duplicated, nothing moved


def test_namespace_removal_and_return(
    upstream_world: UpstreamWorld,
    dante: Dante,
    remote_http: RemoteHttpServer,
) -> None:
    url = f"http://{upstream_world.remote_ip}/"
    with EgressdServer(resync_interval=1) as server, DirectContainer(upstream_world) as container:
        cid = start_socks5(server, container, dante.url, upstream_world.remote_ip)
        bridge = f"br-{cid[:12]}"
        run(["ip", "netns", "delete", container.ns.name])
        try:
            got = wait_status(server, cid, "error")
            assert container.ns.name in got["status_reason"]
            deadline = time.monotonic() + 10
            while run(["ip", "link", "show", bridge], check=False).returncode == 0:
                assert time.monotonic() < deadline, "bridge of a lost container left behind"
                time.sleep(0.2)
            assert f"c-{cid}-" not in run(["nft", "list", "table", "inet", server.table]).stdout
        finally:
            # The container comes back (and the fixture has a namespace to delete).
            run(["ip", "netns", "add", container.ns.name], check=False)
        run(["ip", "-n", container.ns.name, "link", "set", "lo", "up"])
        wait_status(server, cid, "running")
        r = container.curl(url)
        assert r.returncode == 0, r.stderr
        assert remote_http.peers() == [upstream_world.proxy_egress_ip]


def test_garbage_collection_of_untracked_kernel_objects(upstream_world: UpstreamWorld) -> None:
    import ipaddress

    stray = "0123456789abcdef01234567"
    server = EgressdServer(resync_interval=1)
    with DirectContainer(upstream_world) as c:
        net = ipaddress.ip_network(server.pool).subnets(new_prefix=29)
        allocation = Allocation(subnet=list(net)[-1], bridge_name=f"br-{stray[:12]}", port=1080)
        try:
            # Before the daemon runs: its collector would otherwise race the apply.
            dataplane.apply_proxy_enforcement(
                container_id=stray,
                netns_path=f"/run/netns/{c.ns.name}",
                allocation=allocation,
                saved_routes=None,
                table=server.table,
            )
            with server:
                deadline = time.monotonic() + 15
                while stray in dataplane.list_host_containers(server.table):
                    assert time.monotonic() < deadline, "orphan not collected"
                    time.sleep(0.2)
                assert run(["ip", "link", "show", allocation.bridge_name], check=False).returncode
        finally:
            dataplane.remove_enforcement(
                container_id=stray,
                netns_path=f"/run/netns/{c.ns.name}",
                allocation=allocation,
                saved_routes=[],
                table=server.table,
            )
            dataplane.remove_host_base(server.table)
