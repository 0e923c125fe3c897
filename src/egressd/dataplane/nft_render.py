"""nftables rulesets as text, rendered by pure functions (no I/O, no root).

Every script here is applied with one ``nft -f`` call, which the kernel
commits as one transaction: either all of it holds or none of it does.

Host table ``inet <table>`` (one per host, shared by all containers)::

    set bridges   { type ifname }            every bridge we own
    map nat_pre   { type ifname : verdict }  bridge -> jump c-<id>-pre
    map filter_in { type ifname : verdict }  bridge -> jump c-<id>-in
    chain prerouting (nat, dstnat)   iifname vmap @nat_pre
    chain input      (filter)        iifname vmap @filter_in
    chain forward    (filter)        iifname @bridges drop; oifname @bridges drop

Container wall: table ``inet <table>`` inside the container's netns with one
``output`` base chain, policy drop: ``lo``, replies to inbound connections,
and (proxy type) IPv4 TCP and UDP/53 out of ``egress0``. No IPv6, no ICMP,
no other UDP leaves the container while enforced.

Idempotency: ``add table/set/map/chain`` are no-ops when the object exists,
so the base objects are re-declared in every container transaction; the
rules of a chain we own are replaced by ``flush chain`` + ``add rule`` in the
same transaction (no window where the chain is empty). The container wall
is replaced whole: ``add table; delete table; table {...}`` converges from
any earlier state in one commit.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from egressd.dataplane.names import (
    CONTAINER_IFNAME,
    chain_names,
    validate_allocation,
    validate_container_id,
    validate_ifname,
    validate_table,
)
from egressd.model import Allocation

DNS_PORT = 53
BRIDGES_SET = "bridges"
NAT_PRE_MAP = "nat_pre"
FILTER_IN_MAP = "filter_in"
CONTAINER_CHAIN_RE = re.compile(r"^c-([0-9a-f]{24})-(pre|in)$")


class WallKind(enum.StrEnum):
    PROXY = "proxy"
    BLOCK = "block"


def _lines(*lines: str) -> str:
    return "".join(line + "\n" for line in lines)


def render_host_base(table: str) -> str:
    """The shared objects and base-chain rules of the host table."""
    t = f"inet {validate_table(table)}"
    return _lines(
        f"add table {t}",
        f"add set {t} {BRIDGES_SET} {{ type ifname; }}",
        f"add map {t} {NAT_PRE_MAP} {{ type ifname : verdict; }}",
        f"add map {t} {FILTER_IN_MAP} {{ type ifname : verdict; }}",
        f"add chain {t} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}",
        f"add chain {t} input {{ type filter hook input priority filter; policy accept; }}",
        f"add chain {t} forward {{ type filter hook forward priority filter; policy accept; }}",
        f"flush chain {t} prerouting",
        f"flush chain {t} input",
        f"flush chain {t} forward",
        f"add rule {t} prerouting iifname vmap @{NAT_PRE_MAP}",
        f"add rule {t} input iifname vmap @{FILTER_IN_MAP}",
        # A drop in any base chain is final, whatever other tables accept.
        f"add rule {t} forward iifname @{BRIDGES_SET} drop",
        f"add rule {t} forward oifname @{BRIDGES_SET} drop",
    )


def render_host_base_removal(table: str) -> str:
    t = f"inet {validate_table(table)}"
    return _lines(f"add table {t}", f"delete table {t}")


def _fingerprint(lines: Iterable[str]) -> str:
    """A tag for a ruleset's content, stored as a rule comment.

    Inspection compares it with the tag of what this version would render,
    so adoption keeps rules that are exactly ours and re-applies anything
    else (drift, or rules written by an older egressd).
    """
    return "egressd:" + hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _container_rule_lines(table: str, container_id: str, allocation: Allocation) -> list[str]:
    t = f"inet {validate_table(table)}"
    validate_allocation(allocation)
    pre, inp = chain_names(container_id)
    bridge = allocation.bridge_name
    listener = allocation.listener_ip
    port = allocation.port
    dns = DNS_PORT
    return [
        f"add chain {t} {pre}",
        f"flush chain {t} {pre}",
        f"add rule {t} {pre} meta nfproto ipv4 udp dport {dns} dnat ip to {listener}:{dns}",
        f"add rule {t} {pre} meta nfproto ipv4 tcp dport {dns} dnat ip to {listener}:{dns}",
        f"add rule {t} {pre} meta nfproto ipv4 meta l4proto tcp dnat ip to {listener}:{port}",
        f"add chain {t} {inp}",
        f"flush chain {t} {inp}",
        # Only the container's own address: a spoofed source would make the
        # relay answer towards wherever the host routes it.
        f"add rule {t} {inp} ip saddr != {allocation.container_ip} drop",
        f"add rule {t} {inp} ip daddr {listener} tcp dport {port} ct status dnat accept",
        f"add rule {t} {inp} ip daddr {listener} meta l4proto {{ tcp, udp }} th dport {dns} accept",
        f'add element {t} {BRIDGES_SET} {{ "{bridge}" }}',
        f'add element {t} {NAT_PRE_MAP} {{ "{bridge}" : jump {pre} }}',
        f'add element {t} {FILTER_IN_MAP} {{ "{bridge}" : jump {inp} }}',
    ]


def host_rules_fingerprint(table: str, container_id: str, allocation: Allocation) -> str:
    return _fingerprint(_container_rule_lines(table, container_id, allocation))


def render_container_host_rules(table: str, container_id: str, allocation: Allocation) -> str:
    """The container's chains and map elements (the host base is ensured too).

    DNS (udp and tcp port 53, to any address) is DNATed to the relay's DNS
    listener on the same address, port 53; every other TCP connection to the
    relay listener. At input only those are accepted; everything else from
    the bridge is dropped (v4, v6, every protocol). The final drop carries
    the ruleset's fingerprint.
    """
    lines = _container_rule_lines(table, container_id, allocation)
    t = f"inet {validate_table(table)}"
    _, inp = chain_names(container_id)
    drop = f'add rule {t} {inp} drop comment "{_fingerprint(lines)}"'
    return render_host_base(table) + _lines(*lines[:10], drop, *lines[10:])


@dataclass(frozen=True)
class HostTableState:
    """What matters to us in ``nft -j list table inet <table>`` output."""

    chains: frozenset[str] = frozenset()
    bridges: frozenset[str] = frozenset()
    # map name -> {bridge name: jump target chain}
    maps: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # chain -> "addr:port" of its dnat rule
    dnat_targets: Mapping[str, str] = field(default_factory=dict)
    # chain -> comments of its rules (fingerprints)
    comments: Mapping[str, frozenset[str]] = field(default_factory=dict)

    def container_ids(self) -> set[str]:
        return {m.group(1) for c in self.chains if (m := CONTAINER_CHAIN_RE.match(c))}

    def bridges_of(self, container_id: str) -> set[str]:
        """Bridges whose map elements jump to this container's chains."""
        ours = set(chain_names(container_id))
        return {
            bridge
            for elements in self.maps.values()
            for bridge, target in elements.items()
            if target in ours
        }

    def has_container(self, container_id: str, allocation: Allocation, table: str) -> bool:
        """The container's chains and elements are all there, exactly as this version renders."""
        pre, inp = chain_names(container_id)
        bridge = allocation.bridge_name
        expected = host_rules_fingerprint(table, container_id, allocation)
        return (
            expected in self.comments.get(inp, frozenset())
            and self.dnat_targets.get(pre) == f"{allocation.listener_ip}:{allocation.port}"
            and pre in self.chains
            and inp in self.chains
            and bridge in self.bridges
            and self.maps.get(NAT_PRE_MAP, {}).get(bridge) == pre
            and self.maps.get(FILTER_IN_MAP, {}).get(bridge) == inp
        )


def _elem_key(elem: Any) -> Any:
    # A set element is a plain value, or {"elem": {"val": ...}} when it
    # carries a timeout or comment; the same holds for a map key.
    if isinstance(elem, dict) and "elem" in elem:
        return elem["elem"].get("val")
    return elem


def parse_host_table(listing: Mapping[str, Any]) -> HostTableState:
    """Parse ``nft -j list table`` output into the parts we own."""
    chains: set[str] = set()
    bridges: set[str] = set()
    maps: dict[str, dict[str, str]] = {}
    dnat_targets: dict[str, str] = {}
    comments: dict[str, set[str]] = {}
    for item in listing.get("nftables", []):
        if "rule" in item:
            if item["rule"].get("comment"):
                chain_comments = comments.setdefault(str(item["rule"]["chain"]), set())
                chain_comments.add(str(item["rule"]["comment"]))
            for expr in item["rule"].get("expr", []):
                if isinstance(expr, dict) and "dnat" in expr:
                    dnat = expr["dnat"]
                    dnat_targets[str(item["rule"]["chain"])] = (
                        f"{dnat.get('addr')}:{dnat.get('port')}"
                    )
        elif "chain" in item:
            chains.add(str(item["chain"]["name"]))
        elif "set" in item and item["set"].get("name") == BRIDGES_SET:
            bridges.update(str(_elem_key(e)) for e in item["set"].get("elem", []))
        elif "map" in item and item["map"].get("name") in (NAT_PRE_MAP, FILTER_IN_MAP):
            elements: dict[str, str] = {}
            for entry in item["map"].get("elem", []):
                key, verdict = entry
                if isinstance(verdict, dict) and "jump" in verdict:
                    elements[str(_elem_key(key))] = str(verdict["jump"]["target"])
            maps[str(item["map"]["name"])] = elements
    return HostTableState(
        chains=frozenset(chains),
        bridges=frozenset(bridges),
        maps=maps,
        dnat_targets=dnat_targets,
        comments={chain: frozenset(c) for chain, c in comments.items()},
    )


def render_container_host_removal(
    table: str,
    container_id: str,
    state: HostTableState,
    *,
    extra_bridges: Iterable[str] = (),
) -> str:
    """Delete exactly this container's elements and chains that ``state`` shows.

    Elements go first: the kernel refuses to delete a chain that a map
    element still jumps to. ``extra_bridges`` (the allocation's bridge) is
    removed from ``@bridges`` only when no other container's chain uses it.
    Returns "" when there is nothing to delete.
    """
    t = f"inet {validate_table(table)}"
    validate_container_id(container_id)
    ours = set(chain_names(container_id))
    bridges = state.bridges_of(container_id)
    used_by_others = {
        bridge
        for elements in state.maps.values()
        for bridge, target in elements.items()
        if target not in ours
    }
    bridges |= {validate_ifname(b) for b in extra_bridges} - used_by_others
    lines: list[str] = []
    for map_name in (NAT_PRE_MAP, FILTER_IN_MAP):
        for bridge, target in sorted(state.maps.get(map_name, {}).items()):
            if target in ours:
                lines.append(f'delete element {t} {map_name} {{ "{validate_ifname(bridge)}" }}')
    for bridge in sorted(bridges & state.bridges):
        lines.append(f'delete element {t} {BRIDGES_SET} {{ "{bridge}" }}')
    for chain in chain_names(container_id):
        if chain in state.chains:
            lines.append(f"delete chain {t} {chain}")
    return _lines(*lines)


def render_wall(table: str, kind: WallKind, *, allocation: Allocation | None = None) -> str:
    """The container's own wall, replacing whatever table of that name was there.

    Proxy wall: DNS (udp/tcp 53) to any address but loopback is DNATed
    here, in the container, to the relay's DNS endpoint (the listener address), so a
    resolver on a network the container reaches through another interface
    is answered through the tunnel too, not refused. (TCP cannot be treated
    so: the relay reads the original destination from the *host's*
    conntrack, so it must be DNATed there.)

    ``ct direction reply`` lets answers to connections that came *in* leave;
    ``ct state established`` would also let connections the container opened
    before enforcement keep flowing, so it is not used.

    Conntrack starts in the container's namespace with this table, and by
    default it picks up TCP connections mid-stream: a connection the
    container opened earlier, whose peer happens to speak first, would be
    tracked *from the peer* and the container's side would pass as
    "reply". The input chain drops a new conntrack that does not begin with
    a SYN, so such a connection is never confirmed; the container's next
    packet then starts it in the original direction, and is dropped.
    """
    name = validate_table(table)
    t = f"inet {name}"
    body = _wall_body(kind, allocation)
    fingerprint = _fingerprint(body)
    lines = [f"add table {t}", f"delete table {t}", f"table {t} {{"]
    lines += [f'{line} comment "{fingerprint}"' if line == LO_ACCEPT else line for line in body]
    lines.append("}")
    return _lines(*lines)


LO_ACCEPT = '\t\toifname "lo" accept'


def _wall_body(kind: WallKind, allocation: Allocation | None) -> list[str]:
    lines: list[str] = []
    if kind is WallKind.PROXY:
        if allocation is None:
            raise ValueError("a proxy wall needs the container's allocation")
        dns_to = validate_allocation(allocation).listener_ip
        source = allocation.container_ip
        lines += [
            "\tchain dns {",
            "\t\ttype nat hook output priority -100; policy accept;",
            '\t\tmeta nfproto ipv4 oifname != "lo" meta l4proto { tcp, udp }'
            f" th dport {DNS_PORT} dnat ip to {dns_to}:{DNS_PORT}",
            "\t}",
            # A query first routed via another interface keeps that
            # interface's source address; give it egress0's, or the answer
            # could not come back.
            "\tchain dns_source {",
            "\t\ttype nat hook postrouting priority 100; policy accept;",
            f'\t\toifname "{CONTAINER_IFNAME}" ip daddr {dns_to} ip saddr != {source}'
            f" meta l4proto {{ tcp, udp }} th dport {DNS_PORT} snat ip to {source}",
            "\t}",
        ]
        lines += [
            "\tchain input {",
            "\t\ttype filter hook input priority filter; policy accept;",
            "\t\tmeta l4proto tcp ct state new tcp flags & (fin | syn | rst | ack) != syn drop",
            "\t}",
        ]
    lines += [
        "\tchain output {",
        "\t\ttype filter hook output priority filter; policy drop;",
        LO_ACCEPT,
    ]
    if kind is WallKind.PROXY:
        lines += [
            "\t\tct direction reply accept",
            f'\t\tmeta nfproto ipv4 oifname "{CONTAINER_IFNAME}" meta l4proto tcp accept',
            # After the DNAT above, oifname still names the interface routed
            # to *before* it (the hook's state is not updated), so DNS is
            # accepted by its new destination, which only egress0 reaches.
            f"\t\tip daddr {dns_to} meta l4proto {{ tcp, udp }} th dport {DNS_PORT} accept",
        ]
    lines.append("\t}")
    return lines


def render_wall_removal(table: str) -> str:
    return render_host_base_removal(table)


def parse_wall(
    listing: Mapping[str, Any] | None, *, allocation: Allocation | None = None
) -> WallKind | None:
    """Which wall a container table listing shows, or None if it is not ours.

    A wall is an ``output`` hook chain with policy drop; it is the proxy
    wall when a rule accepts ``egress0``. It is ours, as this version
    renders it, only when a rule carries the matching fingerprint, and only
    in a table without flags: a ``dormant`` table has its hooks unregistered
    (it filters nothing), and an ``owner`` table vanishes when the socket
    that made it closes -- without a new ruleset generation, so a cached
    "enforced" would outlive it (see ``nft_gen``). Either is re-applied.
    """
    if listing is None:
        return None
    has_drop_hook = False
    accepts_egress = False
    comments: set[str] = set()
    for item in listing.get("nftables", []):
        table = item.get("table")
        if table is not None and table.get("flags"):
            return None
        if item.get("rule", {}).get("comment"):
            comments.add(str(item["rule"]["comment"]))
        chain = item.get("chain")
        if chain and chain.get("hook") == "output" and chain.get("policy") == "drop":
            has_drop_hook = True
        rule = item.get("rule")
        if rule:
            for expr in rule.get("expr", []):
                match = expr.get("match") if isinstance(expr, dict) else None
                if (
                    match
                    and match.get("left") == {"meta": {"key": "oifname"}}
                    and match.get("right") == CONTAINER_IFNAME
                ):
                    accepts_egress = True
    if not has_drop_hook:
        return None
    kind = WallKind.PROXY if accepts_egress else WallKind.BLOCK
    if kind is WallKind.PROXY and allocation is None:
        return None  # cannot tell whether it is exactly ours
    return kind if _fingerprint(_wall_body(kind, allocation)) in comments else None
