"""The dataplane's pure parts: nft rendering and parsing, names, saved routes. No root."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

import pytest

from egressd.dataplane import SavedNextHop, SavedRoute, WallKind
from egressd.dataplane.names import validate_netns_path
from egressd.dataplane.nft_apply import parse_listing
from egressd.dataplane.nft_render import (
    HostTableState,
    host_rules_fingerprint,
    parse_host_table,
    parse_wall,
    render_container_host_removal,
    render_container_host_rules,
    render_host_base,
    render_host_base_removal,
    render_wall,
    render_wall_removal,
)
from egressd.errors import InvalidInput
from egressd.model import Allocation, bridge_name_for

CID = "0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba98"
ALLOC = Allocation(
    subnet=ipaddress.IPv4Network("10.20.0.8/29"), bridge_name=bridge_name_for(CID), port=41000
)

HOST_BASE = """\
add table inet egressd
add set inet egressd bridges { type ifname; }
add map inet egressd nat_pre { type ifname : verdict; }
add map inet egressd filter_in { type ifname : verdict; }
add chain inet egressd prerouting { type nat hook prerouting priority dstnat; policy accept; }
add chain inet egressd input { type filter hook input priority filter; policy accept; }
add chain inet egressd forward { type filter hook forward priority filter; policy accept; }
flush chain inet egressd prerouting
flush chain inet egressd input
flush chain inet egressd forward
add rule inet egressd prerouting iifname vmap @nat_pre
add rule inet egressd input iifname vmap @filter_in
add rule inet egressd forward iifname @bridges drop
add rule inet egressd forward oifname @bridges drop
"""

CONTAINER_RULES = """\
add chain inet egressd c-0123456789abcdef01234567-pre
flush chain inet egressd c-0123456789abcdef01234567-pre
add rule inet egressd c-0123456789abcdef01234567-pre meta nfproto ipv4 udp dport 53 dnat ip to 10.20.0.10:53
add rule inet egressd c-0123456789abcdef01234567-pre meta nfproto ipv4 tcp dport 53 dnat ip to 10.20.0.10:53
add rule inet egressd c-0123456789abcdef01234567-pre meta nfproto ipv4 meta l4proto tcp dnat ip to 10.20.0.10:41000
add chain inet egressd c-0123456789abcdef01234567-in
flush chain inet egressd c-0123456789abcdef01234567-in
add rule inet egressd c-0123456789abcdef01234567-in ip saddr != 10.20.0.11 drop
add rule inet egressd c-0123456789abcdef01234567-in ip daddr 10.20.0.10 tcp dport 41000 ct status dnat accept
add rule inet egressd c-0123456789abcdef01234567-in ip daddr 10.20.0.10 meta l4proto { tcp, udp } th dport 53 accept
add rule inet egressd c-0123456789abcdef01234567-in drop comment "egressd:ffd0ffa34b53c753"
add element inet egressd bridges { "br-0123456789ab" }
add element inet egressd nat_pre { "br-0123456789ab" : jump c-0123456789abcdef01234567-pre }
add element inet egressd filter_in { "br-0123456789ab" : jump c-0123456789abcdef01234567-in }
"""

PROXY_WALL = """\
add table inet egressd
delete table inet egressd
table inet egressd {
\tchain dns {
\t\ttype nat hook output priority -100; policy accept;
\t\tmeta nfproto ipv4 oifname != "lo" meta l4proto { tcp, udp } th dport 53 dnat ip to 10.20.0.10:53
\t}
\tchain dns_source {
\t\ttype nat hook postrouting priority 100; policy accept;
\t\toifname "egress0" ip daddr 10.20.0.10 ip saddr != 10.20.0.11 meta l4proto { tcp, udp } th dport 53 snat ip to 10.20.0.11
\t}
\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tmeta l4proto tcp ct state new tcp flags & (fin | syn | rst | ack) != syn drop
\t}
\tchain output {
\t\ttype filter hook output priority filter; policy drop;
\t\toifname "lo" accept comment "egressd:3cf74b980743f13b"
\t\tct direction reply accept
\t\tmeta nfproto ipv4 oifname "egress0" meta l4proto tcp accept
\t\tip daddr 10.20.0.10 meta l4proto { tcp, udp } th dport 53 accept
\t}
}
"""

BLOCK_WALL = """\
add table inet egressd
delete table inet egressd
table inet egressd {
\tchain output {
\t\ttype filter hook output priority filter; policy drop;
\t\toifname "lo" accept comment "egressd:aca483db75b9e2d3"
\t}
}
"""


def _listing(*containers: tuple[str, str, int], extra_bridges: tuple[str, ...] = ()) -> Any:
    """A host table listing shaped like ``nft -j list table`` (nft 1.0.6)."""
    items: list[dict[str, Any]] = [
        {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "egressd", "handle": 1}},
    ]
    bridges = [bridge_name_for(cid) for cid, _, _ in containers] + list(extra_bridges)
    items.append(
        {
            "set": {
                "family": "inet",
                "name": "bridges",
                "table": "egressd",
                "type": "ifname",
                "handle": 1,
                "elem": bridges,
            }
        }
    )
    for name, suffix in (("nat_pre", "pre"), ("filter_in", "in")):
        elem = [
            [bridge_name_for(cid), {"jump": {"target": f"c-{cid}-{suffix}"}}]
            for cid, _, _ in containers
        ]
        items.append(
            {
                "map": {
                    "family": "inet",
                    "name": name,
                    "table": "egressd",
                    "type": "ifname",
                    "map": "verdict",
                    "handle": 2,
                    "elem": elem,
                }
            }
        )
    for chain in ("prerouting", "input", "forward"):
        items.append(
            {
                "chain": {
                    "family": "inet",
                    "table": "egressd",
                    "name": chain,
                    "handle": 3,
                    "type": "filter",
                    "hook": chain,
                    "prio": 0,
                    "policy": "accept",
                }
            }
        )
    for cid, listener, port in containers:
        for suffix in ("pre", "in"):
            items.append(
                {
                    "chain": {
                        "family": "inet",
                        "table": "egressd",
                        "name": f"c-{cid}-{suffix}",
                        "handle": 5,
                    }
                }
            )
        items.append(
            {
                "rule": {
                    "family": "inet",
                    "table": "egressd",
                    "chain": f"c-{cid}-pre",
                    "handle": 6,
                    "expr": [{"dnat": {"family": "ip", "addr": listener, "port": port}}],
                }
            }
        )
        subnet = ipaddress.IPv4Network(f"{ipaddress.IPv4Address(listener) - 2}/29")
        alloc = Allocation(subnet=subnet, bridge_name=bridge_name_for(cid), port=port)
        items.append(
            {
                "rule": {
                    "family": "inet",
                    "table": "egressd",
                    "chain": f"c-{cid}-in",
                    "handle": 7,
                    "comment": host_rules_fingerprint("egressd", cid, alloc),
                    "expr": [{"drop": None}],
                }
            }
        )
    return json.loads(json.dumps({"nftables": items}))  # fmt: skip


def test_host_base_is_exact() -> None:
    assert render_host_base("egressd") == HOST_BASE


def test_container_rules_are_exact_and_carry_the_base() -> None:
    assert render_container_host_rules("egressd", CID, ALLOC) == HOST_BASE + CONTAINER_RULES


def test_rendering_is_pure() -> None:
    first = render_container_host_rules("egressd", CID, ALLOC)
    assert render_container_host_rules("egressd", CID, ALLOC) == first


def test_table_name_is_a_parameter() -> None:
    script = render_container_host_rules("egressd_t1a2b", CID, ALLOC)
    assert "inet egressd " not in script
    assert all(line.split()[2:4] == ["inet", "egressd_t1a2b"] for line in script.splitlines())


@pytest.mark.parametrize(
    "bad_id", ["", "0123456789ABCDEF01234567", "0123456789abcdef0123456", 'x" ; flush ruleset']
)
def test_container_id_is_validated(bad_id: str) -> None:
    with pytest.raises(InvalidInput):
        render_container_host_rules("egressd", bad_id, ALLOC)


@pytest.mark.parametrize("bad_table", ["", "1abc", "egressd; flush ruleset", "a" * 33, 'e"x'])
def test_table_is_validated(bad_table: str) -> None:
    with pytest.raises(InvalidInput):
        render_host_base(bad_table)
    with pytest.raises(InvalidInput):
        render_wall(bad_table, WallKind.BLOCK)


@pytest.mark.parametrize("bad_bridge", ['br-"x', "br-0123456789abc", "br x", "", "br/x"])
def test_bridge_name_is_validated(bad_bridge: str) -> None:
    alloc = Allocation(subnet=ALLOC.subnet, bridge_name=bad_bridge, port=41000)
    with pytest.raises(InvalidInput):
        render_container_host_rules("egressd", CID, alloc)


@pytest.mark.parametrize("port", [0, 65536, -1])
def test_port_is_validated(port: int) -> None:
    alloc = Allocation(subnet=ALLOC.subnet, bridge_name=ALLOC.bridge_name, port=port)
    with pytest.raises(InvalidInput):
        render_container_host_rules("egressd", CID, alloc)


def test_walls_are_exact() -> None:
    assert render_wall("egressd", WallKind.PROXY, allocation=ALLOC) == PROXY_WALL
    assert render_wall("egressd", WallKind.BLOCK) == BLOCK_WALL
    assert render_wall_removal("egressd") == "add table inet egressd\ndelete table inet egressd\n"
    assert render_host_base_removal("egressd") == render_wall_removal("egressd")


def test_parse_host_table_finds_containers() -> None:
    state = parse_host_table(_listing((CID, "10.20.0.10", 41000), (OTHER, "10.20.0.18", 41001)))
    assert state.container_ids() == {CID, OTHER}
    assert state.bridges_of(CID) == {bridge_name_for(CID)}
    assert state.has_container(CID, ALLOC, "egressd")
    moved = Allocation(subnet=ALLOC.subnet, bridge_name=ALLOC.bridge_name, port=41002)
    assert not state.has_container(CID, moved, "egressd")


def test_parse_empty_table() -> None:
    state = parse_host_table(_listing())
    assert state.container_ids() == set()
    assert state == HostTableState(
        chains=frozenset({"prerouting", "input", "forward"}),
        maps={"nat_pre": {}, "filter_in": {}},
    )


def test_removal_renders_exactly_the_containers_objects() -> None:
    state = parse_host_table(_listing((CID, "10.20.0.10", 41000), (OTHER, "10.20.0.18", 41001)))
    script = render_container_host_removal("egressd", CID, state, extra_bridges=["br-0123456789ab"])
    assert script == (
        'delete element inet egressd nat_pre { "br-0123456789ab" }\n'
        'delete element inet egressd filter_in { "br-0123456789ab" }\n'
        'delete element inet egressd bridges { "br-0123456789ab" }\n'
        "delete chain inet egressd c-0123456789abcdef01234567-pre\n"
        "delete chain inet egressd c-0123456789abcdef01234567-in\n"
    )
    assert OTHER not in script and bridge_name_for(OTHER) not in script


def test_removal_of_absent_container_is_empty() -> None:
    state = parse_host_table(_listing((OTHER, "10.20.0.18", 41001)))
    assert render_container_host_removal("egressd", CID, state) == ""
    assert render_container_host_removal("egressd", CID, HostTableState()) == ""


def test_removal_never_takes_a_bridge_another_container_uses() -> None:
    state = parse_host_table(_listing((OTHER, "10.20.0.18", 41001)))
    script = render_container_host_removal(
        "egressd", CID, state, extra_bridges=[bridge_name_for(OTHER)]
    )
    assert script == ""


def test_removal_takes_an_orphan_bridge_element() -> None:
    state = parse_host_table(_listing(extra_bridges=("br-0123456789ab",)))
    script = render_container_host_removal("egressd", CID, state, extra_bridges=["br-0123456789ab"])
    assert script == 'delete element inet egressd bridges { "br-0123456789ab" }\n'


def _wall_listing(rules: list[list[dict[str, Any]]], policy: str = "drop") -> dict[str, Any]:
    items: list[dict[str, Any]] = [
        {"table": {"family": "inet", "name": "egressd", "handle": 1}},
        {"chain": {"family": "inet", "table": "egressd", "name": "output", "handle": 1,
                   "type": "filter", "hook": "output", "prio": 0, "policy": policy}},
    ]  # fmt: skip
    kind = WallKind.PROXY if EGRESS in rules else WallKind.BLOCK
    tag = re.search(r'comment "([^"]+)"', render_wall("egressd", kind, allocation=ALLOC))
    assert tag is not None
    items += [
        {"rule": {"chain": "output", "expr": expr, **({"comment": tag[1]} if expr is LO else {})}}
        for expr in rules
    ]
    return {"nftables": items}


LO = [
    {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "lo"}},
    {"accept": None},
]
EGRESS = [
    {"match": {"op": "==", "left": {"meta": {"key": "nfproto"}}, "right": "ipv4"}},
    {"match": {"op": "==", "left": {"meta": {"key": "oifname"}}, "right": "egress0"}},
    {"accept": None},
]


def test_parse_wall() -> None:
    assert parse_wall(None) is None
    untagged = _wall_listing([LO])
    for item in untagged["nftables"]:
        item.get("rule", {}).pop("comment", None)
    assert parse_wall(untagged) is None  # not ours as this version renders it: re-apply
    assert parse_wall(_wall_listing([LO, EGRESS]), allocation=ALLOC) is WallKind.PROXY
    assert parse_wall(_wall_listing([LO, EGRESS])) is None  # cannot tell without the address
    other = Allocation(subnet=ipaddress.IPv4Network("10.20.0.64/29"), bridge_name="br-x", port=1)
    assert parse_wall(_wall_listing([LO, EGRESS]), allocation=other) is None
    assert parse_wall(_wall_listing([LO])) is WallKind.BLOCK
    assert parse_wall(_wall_listing([LO], policy="accept")) is None


def test_a_wall_in_a_table_with_flags_is_not_ours() -> None:
    """dormant: hooks unregistered; owner: gone, unannounced, when its socket closes."""
    for flags in (["dormant"], ["owner"], "Lester Gooch #5"):  # nft 1.0.6 prints owner so
        listing = _wall_listing([LO, EGRESS])
        listing["nftables"][0]["table"]["flags"] = flags
        assert parse_wall(listing, allocation=ALLOC) is None


ROUTE_V4 = SavedRoute(family=4, dst="0.0.0.0/0", protocol=3, gateway="192.0.2.1", ifname="eth0")
ROUTE_V6 = SavedRoute(
    family=6,
    dst="::/0",
    priority=1024,
    gateway="2001:db8::1",
    ifname="eth0",
    pref=0,
    metrics={"mtu": 1400},
)
ROUTE_MP = SavedRoute(
    family=4,
    dst="0.0.0.0/0",
    nexthops=(
        SavedNextHop(gateway="192.0.2.1", ifname="eth0", weight=2),
        SavedNextHop(gateway="198.18.0.1", ifname="eth1", onlink=True),
    ),
)


@pytest.mark.parametrize("route", [ROUTE_V4, ROUTE_V6, ROUTE_MP])
def test_saved_route_round_trips_through_json(route: SavedRoute) -> None:
    data = json.loads(json.dumps(route.to_dict()))
    assert SavedRoute.from_dict(data) == route


def test_saved_route_ifnames() -> None:
    assert ROUTE_MP.ifnames == {"eth0", "eth1"}
    assert SavedRoute(family=4, dst="0.0.0.0/0", type=6).ifnames == set()


@pytest.mark.parametrize(
    "patch",
    [
        {"family": 5},
        {"dst": "::/0"},
        {"dst": "not a net"},
        {"gateway": "2001:db8::1"},
        {"ifname": "eth0; reboot"},
        {"table": -1},
        {"protocol": 256},
        {"metrics": {"mtu; x": 1}},
        {"nexthops": "eth0"},
        {"nexthops": [{"gateway": "192.0.2.1", "ifname": "eth0", "weight": 0}]},
    ],
)
def test_saved_route_from_dict_rejects_bad_data(patch: dict[str, Any]) -> None:
    data = ROUTE_V4.to_dict() | patch
    with pytest.raises(InvalidInput):
        SavedRoute.from_dict(data)


@pytest.mark.parametrize(
    "path", ["/run/netns/egt-1", "/proc/123/ns/net", "/var/run/docker/netns/abc123"]
)
def test_netns_paths_accepted(path: str) -> None:
    assert validate_netns_path(path) == path


@pytest.mark.parametrize(
    "path", ["", "run/netns/x", "/run/netns/../x", "/run/netns/x y", "/run//netns/x", "/run/\0"]
)
def test_netns_paths_refused(path: str) -> None:
    with pytest.raises(InvalidInput):
        validate_netns_path(path)


def test_nft_listing_is_parsed_item_by_item_to_the_same_result() -> None:
    doc = {
        "nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"table": {"family": "inet", "name": "egressd", "handle": 3}},
            {"rule": {"chain": "c-x-pre", "expr": [{"accept": None}], "comment": "a, ] }"}},
        ]
    }
    for text in (json.dumps(doc), json.dumps(doc, indent=2) + "\n", '{"nftables": []}'):
        assert parse_listing(text) == json.loads(text)
    assert parse_listing('{"other": 1}') == {"other": 1}  # not the nft shape: parsed whole
    with pytest.raises(ValueError):
        parse_listing('{"nftables": [{"a": 1} {"b": 2}]}')
