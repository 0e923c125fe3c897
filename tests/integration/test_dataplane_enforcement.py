"""The dataplane against the real kernel: namespaces, bridge, veth, routes, nftables.

Each test builds its own world and removes it, passed or failed::

    remote netns egt-dr-XXXXXXXX          container netns egt-dp-XXXXXXXX        host netns
    eth0 192.0.2.1/24, 2001:db8::1/64 ──  eth0 192.0.2.10/24, 2001:db8::10/64
                                          default via 192.0.2.1 / 2001:db8::1
                                          (+ egress0 .3/29 once enforced) ───── ve-… ─ br-… .1 .2

Traffic goes only to addresses inside these namespaces, to the bridge, or to
198.18.0.0/24 from the container, which the host table DNATs to a listener
of the test's own (and which the forward chain would drop otherwise). The
nft table is ``egressd_t<hex>``, never the daemon's ``egressd``.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import json
import os
import resource
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from egressd.dataplane import (
    SavedRoute,
    WallKind,
    apply_block_enforcement,
    apply_proxy_enforcement,
    inspect_container,
    list_host_containers,
    record_default_routes,
    remove_enforcement,
    remove_host_base,
    routes,
)
from egressd.dataplane.names import chain_names
from egressd.dataplane.netns import iproute, run_in_netns
from egressd.dataplane.nft_apply import apply_script, list_table
from egressd.dataplane.nft_gen import ruleset_stamp
from egressd.dataplane.nft_render import render_container_host_rules
from egressd.dataplane.rtnl_read import DefaultRoute, RtnlReader
from egressd.errors import KernelError
from egressd.model import Allocation, bridge_name_for, host_veth_name_for

# Skipped without root or nft, failed under CI instead (tests/conftest.py).
pytestmark = pytest.mark.root

SO_ORIGINAL_DST = 80
DNAT_TARGET = ("198.18.0.77", 80)


def sh(*argv: str, check: bool = True) -> str:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stderr.strip()}")
    return result.stdout


def ip_json(ns: str | None, *args: str) -> Any:
    prefix = ["ip", "-n", ns] if ns else ["ip"]
    return json.loads(sh(*prefix, "-j", *args) or "[]")


def strip_handles(value: Any) -> Any:
    """nft listings without rule/chain handles, which every flush+add renumbers."""
    if isinstance(value, dict):
        return {k: strip_handles(v) for k, v in value.items() if k != "handle"}
    if isinstance(value, list):
        return [strip_handles(v) for v in value]
    return value


@dataclass
class World:
    ns: str
    remote_ns: str
    path: str
    container_id: str
    allocation: Allocation
    table: str

    @property
    def bridge(self) -> str:
        return self.allocation.bridge_name

    @property
    def host_veth(self) -> str:
        return host_veth_name_for(self.container_id)

    def snapshot(self) -> dict[str, Any]:
        """The container's links, addresses and routes as ``ip -j`` shows them."""
        return {
            "link": ip_json(self.ns, "link"),
            "addr": ip_json(self.ns, "addr"),
            "route": ip_json(self.ns, "route"),
            "route6": ip_json(self.ns, "-6", "route"),
        }

    def host_table(self) -> Any:
        return strip_handles(list_table(self.table))

    def inspect(self) -> Any:
        """What the agent's inspection sees of this world's container."""
        return inspect_container(
            container_id=self.container_id,
            netns_path=self.path,
            allocation=self.allocation,
            table=self.table,
        )

    def wall(self) -> Any:
        return strip_handles(list_table(self.table, netns_path=self.path))

    def sock(self, family: int, kind: int, *, netns: str | None = None) -> socket.socket:
        """A socket living in the container (or another) netns, usable from here."""
        path = f"/run/netns/{netns or self.ns}"
        return run_in_netns(path, lambda: socket.socket(family, kind))

    def apply(self, saved: list[SavedRoute] | None = None) -> list[SavedRoute]:
        return apply_proxy_enforcement(
            container_id=self.container_id,
            netns_path=self.path,
            allocation=self.allocation,
            saved_routes=saved,
            table=self.table,
        )

    def remove(self, saved: list[SavedRoute], *, allocation: Allocation | None = None) -> None:
        remove_enforcement(
            container_id=self.container_id,
            netns_path=self.path,
            allocation=allocation,
            saved_routes=saved,
            table=self.table,
        )

    def host_side_gone(self) -> bool:
        names = {link["ifname"] for link in ip_json(None, "link")}
        return self.bridge not in names and self.host_veth not in names


def new_allocation(container_id: str) -> Allocation:
    # A random /29 in the upper half of the pool, away from a daemon's first picks.
    block = secrets.randbelow(4096) + 4096
    subnet = ipaddress.IPv4Network((int(ipaddress.IPv4Address("10.20.0.0")) + block * 8, 29))
    return Allocation(
        subnet=subnet,
        bridge_name=bridge_name_for(container_id),
        port=40000 + secrets.randbelow(20000),
    )


@pytest.fixture
def world() -> Iterator[World]:
    suffix = secrets.token_hex(4)
    ns, remote = f"egt-dp-{suffix}", f"egt-dr-{suffix}"
    container_id = secrets.token_hex(12)
    table = f"egressd_t{suffix}"
    w = World(ns, remote, f"/run/netns/{ns}", container_id, new_allocation(container_id), table)
    try:
        sh("ip", "netns", "add", ns)
        sh("ip", "netns", "add", remote)
        for name in (ns, remote):
            sh("ip", "-n", name, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0",
           "netns", remote)  # fmt: skip
        for name, v4, v6 in ((ns, "192.0.2.10/24", "2001:db8::10/64"),
                             (remote, "192.0.2.1/24", "2001:db8::1/64")):  # fmt: skip
            sh("ip", "-n", name, "addr", "add", v4, "dev", "eth0")
            sh("ip", "-n", name, "addr", "add", v6, "dev", "eth0", "nodad")
            sh("ip", "-n", name, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", "192.0.2.1", "dev", "eth0")
        sh("ip", "-n", ns, "-6", "route", "add", "default", "via", "2001:db8::1", "dev", "eth0")
        yield w
    finally:
        for name in (ns, remote):
            sh("ip", "netns", "del", name, check=False)
        for link in (w.host_veth, w.bridge):
            if link in {x["ifname"] for x in ip_json(None, "link")}:
                sh("ip", "link", "del", link, check=False)
        remove_host_base(table)


EXPECTED_SAVED = [
    SavedRoute(family=4, dst="0.0.0.0/0", protocol=3, gateway="192.0.2.1", ifname="eth0"),
    SavedRoute(
        family=6,
        dst="::/0",
        protocol=3,
        priority=1024,
        gateway="2001:db8::1",
        ifname="eth0",
        pref=0,
    ),
]


def test_proxy_apply_builds_exactly_the_topology(world: World) -> None:
    a = world.allocation
    saved = world.apply()
    assert saved == EXPECTED_SAVED

    (bridge,) = ip_json(None, "addr", "show", "dev", world.bridge)
    assert bridge["operstate"] in ("UP", "UNKNOWN") or "UP" in bridge["flags"]
    assert sorted((i["family"], i["local"], i["prefixlen"]) for i in bridge["addr_info"]) == sorted(
        [("inet", str(a.bridge_ip), 29), ("inet", str(a.listener_ip), 29)]
    )
    (port,) = ip_json(None, "link", "show", "master", world.bridge)
    assert port["ifname"] == world.host_veth and "UP" in port["flags"]

    (egress0,) = ip_json(world.ns, "addr", "show", "dev", "egress0")
    assert "UP" in egress0["flags"]
    assert [(i["family"], i["local"], i["prefixlen"]) for i in egress0["addr_info"]] == [
        ("inet", str(a.container_ip), 29)
    ]
    defaults = [r for r in ip_json(world.ns, "route") if r["dst"] == "default"]
    assert defaults == [
        {"dst": "default", "gateway": str(a.bridge_ip), "dev": "egress0", "protocol": "static",
         "flags": []}
    ]  # fmt: skip
    assert not [r for r in ip_json(world.ns, "-6", "route") if r["dst"] == "default"]

    for ifname, netns in ((world.bridge, None), (world.host_veth, None), ("egress0", world.ns)):
        prefix = ["ip", "netns", "exec", netns] if netns else []
        value = sh(*prefix, "cat", f"/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6")
        assert value.strip() == "1", ifname

    host = sh("nft", "list", "table", "inet", world.table)
    cid = world.container_id
    assert f"chain c-{cid}-pre" in host and f"chain c-{cid}-in" in host
    assert f"dnat ip to {a.listener_ip}:{a.port}" in host
    assert f'"{world.bridge}" : jump c-{cid}-pre' in host
    assert list_host_containers(world.table) == {cid}

    wall = sh("ip", "netns", "exec", world.ns, "nft", "list", "table", "inet", world.table)
    assert "policy drop;" in wall and 'oifname "egress0" meta l4proto tcp accept' in wall
    assert f"ip daddr {a.listener_ip} meta l4proto {{ tcp, udp }} th dport 53 accept" in wall
    assert "ct direction reply accept" in wall and "established" not in wall

    seen = inspect_container(
        container_id=cid, netns_path=world.path, allocation=a, table=world.table
    )
    assert seen.proxy_enforced and seen.wall is WallKind.PROXY and not seen.clean


def test_proxy_apply_twice_changes_nothing(world: World) -> None:
    saved = world.apply()
    host, wall, snap = world.host_table(), world.wall(), world.snapshot()
    assert world.apply(saved) == saved
    assert world.host_table() == host
    assert world.wall() == wall
    assert world.snapshot() == snap


def test_remove_restores_the_container_exactly(world: World) -> None:
    before = world.snapshot()
    saved = world.apply()
    assert world.snapshot() != before
    # The saved routes travel through JSON (the caller's database).
    stored = json.loads(json.dumps([r.to_dict() for r in saved]))
    world.remove([SavedRoute.from_dict(r) for r in stored], allocation=world.allocation)
    assert world.snapshot() == before
    assert world.host_side_gone()
    assert list_host_containers(world.table) == set()
    assert world.wall() is None
    seen = world.inspect()
    assert seen.clean and seen.netns_present
    # Removing again is fine.
    world.remove(saved, allocation=world.allocation)
    assert world.snapshot() == before


def test_removal_takes_only_its_own_host_rules(world: World) -> None:
    """Removal reads the host table narrowly (sets, maps, chain names), not whole.

    Another container's rules stay, and a chain of the same name in another
    table is not taken for ours (a second removal must find nothing to do).
    """
    other_id = secrets.token_hex(12)
    other = new_allocation(other_id)
    other_table = f"egressd_o{secrets.token_hex(4)}"
    saved = world.apply()
    apply_script(render_container_host_rules(world.table, other_id, other))
    _pre, inp = chain_names(world.container_id)
    sh("nft", "add", "table", "inet", other_table)
    try:
        # A change after every full read: removals must not find a whole-table state
        # cached under the current ruleset stamp, and read the narrow way.
        sh("nft", "add", "chain", "inet", other_table, inp)
        world.remove(saved, allocation=world.allocation)
        assert list_host_containers(world.table) == {other_id}
        listing = json.loads(sh("nft", "-j", "list", "table", "inet", world.table))
        elements = json.dumps(
            [i for i in listing["nftables"] if "map" in i or "set" in i], sort_keys=True
        )
        assert other.bridge_name in elements and world.allocation.bridge_name not in elements
        sh("nft", "add", "chain", "inet", other_table, "bump")
        world.remove(saved, allocation=world.allocation)  # nothing left to remove: no error
        sh("nft", "list", "chain", "inet", other_table, inp)  # the other table's chain stays
    finally:
        sh("nft", "delete", "table", "inet", other_table, check=False)
        remove_enforcement(
            container_id=other_id,
            netns_path=None,
            allocation=other,
            saved_routes=[],
            table=world.table,
        )
    assert list_host_containers(world.table) == set()


def test_block_apply_and_remove(world: World) -> None:
    before = world.snapshot()
    apply_block_enforcement(
        container_id=world.container_id, netns_path=world.path, table=world.table
    )
    apply_block_enforcement(
        container_id=world.container_id, netns_path=world.path, table=world.table
    )
    assert world.snapshot() == before  # no links, addresses or routes touched
    assert world.host_side_gone()
    seen = inspect_container(
        container_id=world.container_id, netns_path=world.path, allocation=None, table=world.table
    )
    assert seen.block_enforced and not seen.proxy_enforced

    for family, dst in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
        with world.sock(family, socket.SOCK_DGRAM) as s, pytest.raises(PermissionError):
            s.sendto(b"x", (dst, 9))
    with (
        world.sock(socket.AF_INET, socket.SOCK_DGRAM) as rx,
        world.sock(socket.AF_INET, socket.SOCK_DGRAM) as tx,
    ):
        rx.bind(("127.0.0.1", 0))
        rx.settimeout(2)
        tx.sendto(b"lo ok", rx.getsockname())
        assert rx.recv(16) == b"lo ok"

    world.remove([])
    assert world.wall() is None
    assert world.snapshot() == before
    with world.sock(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(b"x", ("192.0.2.1", 9))  # the wall is gone


def test_switch_proxy_block_proxy(world: World) -> None:
    before = world.snapshot()
    saved = world.apply()
    world.remove(saved, allocation=world.allocation)
    apply_block_enforcement(
        container_id=world.container_id, netns_path=world.path, table=world.table
    )
    world.remove([])
    saved = world.apply()
    assert saved == EXPECTED_SAVED
    world.remove(saved, allocation=world.allocation)
    assert world.snapshot() == before and world.host_side_gone()


def test_remove_when_netns_is_gone_cleans_the_host(world: World) -> None:
    saved = world.apply()
    sh("ip", "netns", "del", world.ns)
    world.remove(saved, allocation=world.allocation)
    assert world.host_side_gone()
    assert list_host_containers(world.table) == set()
    seen = world.inspect()
    assert seen.clean and not seen.netns_present
    with pytest.raises(KernelError) as excinfo:
        world.apply()
    assert excinfo.value.errno == errno.ENOENT
    assert world.host_side_gone()


def _partial_bridge_only(w: World) -> None:
    sh("ip", "link", "add", w.bridge, "type", "bridge")


def _partial_host_rules_only(w: World) -> None:
    apply_script(render_container_host_rules(w.table, w.container_id, w.allocation))


def _partial_lonely_host_veth(w: World) -> None:
    sh("ip", "link", "add", w.host_veth, "type", "veth", "peer", "name", f"egtv{w.table[-8:]}")


def _partial_lonely_egress0(w: World) -> None:
    sh("ip", "-n", w.ns, "link", "add", "egress0", "type", "veth", "peer", "name", "egtx0")
    sh("ip", "-n", w.ns, "addr", "add", "10.20.255.250/29", "dev", "egress0")


def _partial_stale_addresses(w: World) -> None:
    w.apply()
    sh("ip", "addr", "add", "10.20.255.1/29", "dev", w.bridge)
    sh("ip", "addr", "del", f"{w.allocation.listener_ip}/29", "dev", w.bridge)
    sh("ip", "-n", w.ns, "route", "del", "default")
    sh("ip", "link", "set", w.host_veth, "nomaster")


def _partial_other_allocation(w: World) -> None:
    other = new_allocation(w.container_id)
    apply_proxy_enforcement(
        container_id=w.container_id,
        netns_path=w.path,
        allocation=other,
        saved_routes=EXPECTED_SAVED,
        table=w.table,
    )


@pytest.mark.parametrize(
    "make_partial",
    [
        _partial_bridge_only,
        _partial_host_rules_only,
        _partial_lonely_host_veth,
        _partial_lonely_egress0,
        _partial_stale_addresses,
        _partial_other_allocation,
    ],
)
def test_partial_state_converges(world: World, make_partial: Any) -> None:
    before = world.snapshot()
    make_partial(world)
    saved = world.apply(EXPECTED_SAVED)
    assert saved == EXPECTED_SAVED
    seen = world.inspect()
    assert seen.proxy_enforced, seen
    assert seen.bridge_addresses == tuple(
        sorted(f"{ip}/29" for ip in (world.allocation.bridge_ip, world.allocation.listener_ip))
    )
    world.remove(saved, allocation=world.allocation)
    after = world.snapshot()
    # A lonely egress0 we planted took its in-netns peer with it when removed.
    if make_partial is _partial_lonely_egress0:
        before["link"] = [link for link in before["link"] if link["ifname"] != "egtx0"]
    assert after == before
    assert world.host_side_gone()
    assert list_host_containers(world.table) == set()


def test_bridge_name_taken_by_another_kind_is_refused(world: World) -> None:
    sh("ip", "link", "add", world.bridge, "type", "veth", "peer", "name", f"egtb{world.table[-8:]}")
    with pytest.raises(KernelError) as excinfo:
        world.apply()
    assert excinfo.value.errno == errno.EEXIST
    # Host rules went in first (fail closed) and go away with remove; the foreign link stays.
    world.remove([], allocation=world.allocation)
    assert list_host_containers(world.table) == set()
    assert world.bridge in sh("ip", "-br", "link")


def _original_dst(conn: socket.socket) -> tuple[str, int]:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


def test_traffic_is_redirected_or_dropped(world: World) -> None:
    a = world.allocation
    # A connection the container opened before enforcement, and a server in it.
    with world.sock(socket.AF_INET, socket.SOCK_STREAM, netns=world.remote_ns) as remote_srv:
        remote_srv.bind(("192.0.2.1", 8081))
        remote_srv.listen()
        remote_srv.settimeout(2)
        early = world.sock(socket.AF_INET, socket.SOCK_STREAM)
        early.settimeout(2)
        early.connect(("192.0.2.1", 8081))
        early_peer, _ = remote_srv.accept()
        # Its peer will speak first after enforcement (conntrack must not flip it).
        quiet = world.sock(socket.AF_INET, socket.SOCK_STREAM)
        quiet.settimeout(1)
        quiet.connect(("192.0.2.1", 8081))
        quiet_peer, _ = remote_srv.accept()
    inbound_srv = world.sock(socket.AF_INET, socket.SOCK_STREAM)
    inbound_srv.bind(("192.0.2.10", 8080))
    inbound_srv.listen()
    inbound_srv.settimeout(2)

    world.apply()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp_sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        listener.bind((str(a.listener_ip), a.port))
        listener.listen()
        listener.settimeout(3)
        udp_sink.bind((str(a.bridge_ip), 9999))
        udp_sink.settimeout(0.5)

        # TCP to anywhere is DNATed to the relay listener, original dst kept.
        with world.sock(socket.AF_INET, socket.SOCK_STREAM) as c:
            c.settimeout(3)
            c.connect(DNAT_TARGET)
            conn, peer = listener.accept()
            with conn:
                assert peer[0] == str(a.container_ip)
                assert _original_dst(conn) == DNAT_TARGET
                c.sendall(b"ping")
                assert conn.recv(4) == b"ping"

        # UDP (not DNS) to the bridge: the wall refuses it, and nothing arrives.
        with world.sock(socket.AF_INET, socket.SOCK_DGRAM) as u, pytest.raises(PermissionError):
            u.sendto(b"leak?", (str(a.bridge_ip), 9999))
        with pytest.raises(TimeoutError):
            udp_sink.recv(16)

        # ICMP echo to the bridge: no reply comes back.
        with run_in_netns(
            world.path,
            lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        ) as icmp:
            icmp.settimeout(0.5)
            echo = struct.pack("!BBHHH", 8, 0, 0, 0x4567, 1) + b"egressd"
            checksum = _inet_checksum(echo)
            with pytest.raises(PermissionError):  # the wall: no ICMP out
                icmp.sendto(
                    echo[:2] + struct.pack("!H", checksum) + echo[4:], (str(a.bridge_ip), 0)
                )
            with pytest.raises(TimeoutError):
                while True:  # skip our own echo request if the raw socket sees it
                    data = icmp.recv(256)
                    if data[20] == 0:
                        break

        # The wall: nothing leaves by eth0, v4 or v6; the old connection is cut.
        for family, dst in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):
            with world.sock(family, socket.SOCK_DGRAM) as s, pytest.raises(PermissionError):
                s.sendto(b"x", (dst, 9))
        with contextlib.suppress(PermissionError):
            early.sendall(b"after")
        early_peer.settimeout(1)
        with pytest.raises(TimeoutError):
            early_peer.recv(16)
        quiet_peer.sendall(b"remote speaks first")
        with pytest.raises(TimeoutError):
            quiet.recv(32)
        with contextlib.suppress(PermissionError):
            quiet.sendall(b"container answers")
        quiet_peer.settimeout(1)
        with pytest.raises(TimeoutError):
            quiet_peer.recv(32)

        # Connections that come in are still answered.
        with world.sock(socket.AF_INET, socket.SOCK_STREAM, netns=world.remote_ns) as r:
            r.settimeout(2)
            r.connect(("192.0.2.10", 8080))
            served, _ = inbound_srv.accept()
            with served:
                served.sendall(b"reply")
                assert r.recv(16) == b"reply"
    finally:
        for s in (listener, udp_sink, early, early_peer, quiet, quiet_peer, inbound_srv):
            s.close()


def _inet_checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data[: len(data) // 2 * 2]))
    if len(data) % 2:
        total += data[-1] << 8
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def test_rich_default_routes_are_restored_exactly(world: World) -> None:
    ns = world.ns
    sh("ip", "-n", ns, "route", "del", "default")
    sh("ip", "-n", ns, "-6", "route", "del", "default")
    sh("ip", "-n", ns, "route", "add", "default", "via", "192.0.2.1", "dev", "eth0", "metric",
       "100", "mtu", "1400", "onlink", "proto", "static")  # fmt: skip
    sh("ip", "-n", ns, "route", "add", "default", "via", "192.0.2.2", "dev", "eth0", "metric",
       "200", "src", "192.0.2.10")  # fmt: skip
    sh("ip", "-n", ns, "route", "add", "default", "metric", "300", "nexthop", "via", "192.0.2.1",
       "dev", "eth0", "weight", "2", "nexthop", "via", "192.0.2.3", "dev", "eth0")  # fmt: skip
    sh("ip", "-n", ns, "-6", "route", "add", "default", "via", "2001:db8::1", "dev", "eth0",
       "metric", "512", "pref", "high")  # fmt: skip
    before = world.snapshot()
    saved = world.apply()
    assert len(saved) == 4
    assert [r["dst"] for r in ip_json(ns, "route") if r["dst"] == "default"] == ["default"]
    stored = json.loads(json.dumps([r.to_dict() for r in saved]))
    world.remove([SavedRoute.from_dict(r) for r in stored], allocation=world.allocation)
    assert world.snapshot() == before


def test_routes_of_vanished_links_are_skipped(world: World) -> None:
    ns = world.ns
    sh("ip", "-n", ns, "link", "add", "eth1", "type", "veth", "peer", "name", "eth1p")
    sh("ip", "-n", ns, "addr", "add", "192.0.2.200/32", "dev", "eth1")
    sh("ip", "-n", ns, "link", "set", "eth1", "up")
    sh("ip", "-n", ns, "route", "add", "default", "dev", "eth1", "metric", "50")
    saved = world.apply()
    assert {r.ifname for r in saved} == {"eth0", "eth1"}
    sh("ip", "-n", ns, "link", "del", "eth1")
    world.remove(saved, allocation=world.allocation)
    defaults = [r for r in ip_json(ns, "route") if r["dst"] == "default"]
    assert defaults == [{"dst": "default", "gateway": "192.0.2.1", "dev": "eth0", "flags": []}]


def test_record_first_then_apply(world: World) -> None:
    """The agent's crash-safe order: record and store the routes, then apply."""
    recorded = record_default_routes(netns_path=world.path)
    assert recorded == EXPECTED_SAVED
    assert world.apply(recorded) == recorded
    # Ours (via egress0) is never recorded as an original.
    assert record_default_routes(netns_path=world.path) == []
    world.remove(recorded, allocation=world.allocation)
    assert record_default_routes(netns_path=world.path) == EXPECTED_SAVED


def test_proc_pid_netns_path(world: World) -> None:
    """A container known by a process's /proc/PID/ns/net path, not a named netns."""
    before = world.snapshot()
    proc = subprocess.Popen(["ip", "netns", "exec", world.ns, "sleep", "60"])
    try:
        path = f"/proc/{proc.pid}/ns/net"
        for _ in range(100):  # until `ip netns exec` has setns()'d and exec'd sleep
            if os.readlink(path) == os.readlink(f"/proc/{os.getpid()}/task/{os.getpid()}/ns/net"):
                time.sleep(0.02)
                continue
            break
        saved = apply_proxy_enforcement(
            container_id=world.container_id,
            netns_path=path,
            allocation=world.allocation,
            saved_routes=None,
            table=world.table,
        )
        assert saved == EXPECTED_SAVED
        assert inspect_container(
            container_id=world.container_id,
            netns_path=path,
            allocation=world.allocation,
            table=world.table,
        ).proxy_enforced
        remove_enforcement(
            container_id=world.container_id,
            netns_path=path,
            allocation=world.allocation,
            saved_routes=saved,
            table=world.table,
        )
        assert world.snapshot() == before and world.host_side_gone()
    finally:
        proc.kill()
        proc.wait()


def test_host_wall_holds_without_the_container_wall(world: World) -> None:
    """Fail closed in depth: with the container's wall gone (a container with
    CAP_NET_ADMIN could remove it), the host still drops everything from the
    bridge but the relay's TCP and DNS, and forwards nothing."""
    a = world.allocation
    world.apply()
    sh("ip", "netns", "exec", world.ns, "nft", "delete", "table", "inet", world.table)
    udp_sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp_sink.bind((str(a.bridge_ip), 9999))
        udp_sink.settimeout(0.5)
        with world.sock(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.sendto(b"leak?", (str(a.bridge_ip), 9999))  # leaves the container now
        with pytest.raises(TimeoutError):
            udp_sink.recv(16)
        counters = sh("nft", "list", "chain", "inet", world.table, f"c-{world.container_id}-in")
        assert "drop" in counters
    finally:
        udp_sink.close()


def test_inspection_sees_rules_changed_behind_its_back(world: World) -> None:
    """Inspections reuse what they read while a ruleset is unchanged; any change is seen."""

    world.apply()
    assert world.inspect().proxy_enforced
    assert world.inspect().proxy_enforced  # unchanged: from what the first look read
    sh("ip", "netns", "exec", world.ns, "nft", "delete", "table", "inet", world.table)
    seen = world.inspect()
    assert seen.wall is None and not seen.proxy_enforced
    world.apply()
    assert world.inspect().proxy_enforced
    _pre, inp = chain_names(world.container_id)
    sh("nft", "flush", "chain", "inet", world.table, inp)  # the host side, by someone else
    seen = world.inspect()
    assert not seen.host_rules_ok and not seen.proxy_enforced
    world.apply()
    assert world.inspect().proxy_enforced


def test_a_wall_that_leaves_without_a_new_generation_is_not_reported(world: World) -> None:
    """An ``owner`` table goes when its socket closes, and the generation does not move.

    A container allowed to administer its namespace swaps our wall for an
    identical one it owns (copying the fingerprint), then closes the socket:
    an inspection must not call that wall ours, neither while it stands nor
    (from a cache) after it went.
    """
    from egressd.dataplane.nft_render import render_wall

    world.apply()
    assert world.inspect().proxy_enforced
    script = render_wall(world.table, WallKind.PROXY, allocation=world.allocation)
    block = script[script.index(f"table inet {world.table} {{") :]
    one_line = "".join(
        line.strip() + (" " if line.strip().endswith(("{", ";")) else "; ")
        for line in block.strip().splitlines()
    ).replace("{", "{ flags owner;", 1)
    owner = subprocess.Popen(
        ["ip", "netns", "exec", world.ns, "nft", "-i"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert owner.stdin is not None
        owner.stdin.write(f"delete table inet {world.table}\n{one_line}\n")
        owner.stdin.flush()
        deadline = time.monotonic() + 10
        while "owner" not in sh("ip", "netns", "exec", world.ns, "nft", "list", "ruleset"):
            assert time.monotonic() < deadline, owner.stderr.read() if owner.stderr else ""
            time.sleep(0.05)
        assert (
            world.inspect().wall is None
        )  # flags: not taken for ours, though the rules are the same
        assert world.inspect().wall is None
    finally:
        if owner.stdin is not None:
            owner.stdin.close()
        owner.wait(timeout=10)
        if owner.stderr is not None:
            owner.stderr.close()
    assert world.wall() is None  # gone with its socket
    seen = world.inspect()
    assert seen.wall is None and not seen.proxy_enforced


def test_ruleset_stamps_follow_each_namespace(world: World) -> None:
    host = ruleset_stamp()
    inside = run_in_netns(world.path, ruleset_stamp)
    assert host is not None and inside is not None
    assert host.netns_cookie != inside.netns_cookie
    sh("ip", "netns", "exec", world.ns, "nft", "add", "table", "inet", world.table)
    after = run_in_netns(world.path, ruleset_stamp)
    assert after is not None and after.netns_cookie == inside.netns_cookie
    assert after.generation != inside.generation


def test_a_route_via_a_vanished_link_is_a_kernel_error(world: World) -> None:
    """egress0 deleted under an apply (another cleanup): an EgressdError, not a crash."""
    with iproute(world.path) as ns, pytest.raises(KernelError) as info:
        routes.ensure_default_route_via(ns, gateway=world.allocation.bridge_ip, ifname="egress0")
    assert info.value.errno == errno.ENODEV
    assert ip_json(world.ns, "route", "show", "default")  # the routes it had are still there


def test_rtnl_reader_agrees_with_iproute2(world: World) -> None:
    """The lean reader the agent inspects with sees what `ip` sees, in the container's netns."""
    sh("ip", "-n", world.ns, "addr", "add", "198.51.100.7/28", "dev", "eth0")
    with run_in_netns(world.path, RtnlReader.open) as reader:
        eth0 = reader.link("eth0")
        assert reader.link("no-such-link") is None
        assert eth0 is not None and eth0.kind == "veth" and eth0.is_up
        (shown,) = ip_json(world.ns, "link", "show", "dev", "eth0")
        assert eth0.index == shown["ifindex"] and eth0.name == "eth0"
        assert {str(a) for a in reader.ipv4_addresses(eth0.index)} == {
            "192.0.2.10/24",
            "198.51.100.7/28",
        }
        assert reader.ipv4_addresses(1) == {ipaddress.IPv4Interface("127.0.0.1/8")}
        assert reader.default_routes() == [DefaultRoute("192.0.2.1", eth0.index)]


def test_works_in_a_process_holding_more_than_1024_fds(world: World) -> None:
    """The daemon holds sockets for hundreds of containers: no kernel path may assume small fds.

    (libnftables 1.0.6 select()s on its socket and glibc aborts the process
    once that fd is >= FD_SETSIZE: seen at ~330 containers in the benchmark.)
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 1200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 1200), hard))
    fillers: list[int] = []
    try:
        while len(fillers) < 1100:
            fillers.append(os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC))
        assert fillers[-1] >= 1024
        world.apply()
        seen = world.inspect()
        assert seen.proxy_enforced
        assert list_table(world.table, netns_path=world.path) is not None
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
