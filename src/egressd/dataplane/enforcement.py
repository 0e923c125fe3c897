"""Putting a container's enforcement in place and taking it away again.

Concurrency model: plain synchronous functions, meant to be called from one
reconciler thread, one container at a time (two calls for the same
container must not overlap; calls for different containers may run one
after the other in any order). Namespaces are entered only by short-lived
helper threads (:mod:`egressd.dataplane.netns`).

Every function is idempotent and converges from any partial state a crash
can leave: re-running it after a failure finishes the job.

Apply order (proxy), each step fail-closed for the ones after it:

1. host nftables (one transaction): nothing from the bridge can be
   forwarded or reach the host before the bridge even exists;
2. bridge with .1 and .2; 3. veth, peer born in the container as egress0;
4. the container wall; 5. only then the container's default routes.

Remove order is the reverse: container side (egress0, whose deletion takes
our default route with it, then the original routes, then the wall), then
the host links, and the host rules last, so a bridge never exists without
the rules that fence it.
"""

from __future__ import annotations

import errno
import ipaddress
from collections.abc import Sequence
from functools import partial
from typing import Any

from egressd.dataplane import links, routes
from egressd.dataplane.names import (
    CONTAINER_IFNAME,
    DEFAULT_TABLE,
    validate_allocation,
    validate_container_id,
    validate_netns_path,
    validate_table,
)
from egressd.dataplane.netns import NetnsGone, iproute, netns_exists, netns_fd
from egressd.dataplane.nft_apply import apply_script, list_items, list_table
from egressd.dataplane.nft_gen import StampedCache, ruleset_stamp
from egressd.dataplane.nft_render import (
    BRIDGES_SET,
    FILTER_IN_MAP,
    NAT_PRE_MAP,
    HostTableState,
    WallKind,
    parse_host_table,
    render_container_host_removal,
    render_container_host_rules,
    render_host_base,
    render_host_base_removal,
    render_wall,
    render_wall_removal,
)
from egressd.dataplane.routes import SavedRoute
from egressd.errors import KernelError
from egressd.model import Allocation, bridge_name_for, host_veth_name_for


def ensure_host_base(table: str = DEFAULT_TABLE) -> None:
    """The shared host table, sets, maps and base chains (idempotent)."""
    apply_script(render_host_base(table))


def remove_host_base(table: str) -> None:
    """Delete the whole host table. For tests and uninstall only."""
    apply_script(render_host_base_removal(table))


# The host table as last parsed, under the host ruleset's stamp (see nft_gen): at a
# thousand containers it is megabytes of JSON, and every resync needs it.
_host_tables: StampedCache[str, HostTableState] = StampedCache(max_entries=16)


def _list_host_table(table: str) -> HostTableState:
    listing = list_table(table)
    return HostTableState() if listing is None else parse_host_table(listing)


def read_host_table(table: str = DEFAULT_TABLE) -> HostTableState:
    """The host table's state; read again only if the host's nftables changed since."""
    return _host_tables.get_or_read(table, ruleset_stamp(), partial(_list_host_table, table))


def _host_state_for_removal(table: str) -> HostTableState:
    """What removing one container's host rules needs: the bridges, both maps, chain names.

    The whole table (every container's rules: ~2.5 MB of JSON and ~0.5 s at a
    thousand containers) only if it is cached under the current stamp anyway;
    else four small listings (~35 ms there). Rules, DNAT targets and
    comments stay out: a removal deletes chains whole.
    """
    cached = _host_tables.peek(table, ruleset_stamp())
    if cached is not None:
        return cached
    items: list[dict[str, Any]] = []
    for what in (
        ["set", "inet", table, BRIDGES_SET],
        ["map", "inet", table, NAT_PRE_MAP],
        ["map", "inet", table, FILTER_IN_MAP],
    ):
        items += list_items(what) or []
    # Chains also when the set or maps are gone (deleted by hand): ours must still go.
    chains = list_items(["chains", "inet"]) or []
    items += [i for i in chains if "chain" in i and i["chain"].get("table") == table]
    return parse_host_table({"nftables": items}) if items else HostTableState()


def list_host_containers(table: str = DEFAULT_TABLE) -> set[str]:
    """Container ids that have chains in the host table (for garbage collection)."""
    return read_host_table(table).container_ids()


def record_default_routes(*, netns_path: str) -> list[SavedRoute]:
    """The container's current default routes, ours (via egress0) left out.

    A caller that wants to survive a crash between "routes replaced" and
    "routes stored" records and stores these first, then passes them to
    :func:`apply_proxy_enforcement`.
    """
    with iproute(validate_netns_path(netns_path)) as ns:
        return routes.read_default_routes(ns, exclude_ifname=CONTAINER_IFNAME)


def apply_proxy_enforcement(
    *,
    container_id: str,
    netns_path: str,
    allocation: Allocation,
    saved_routes: list[SavedRoute] | None,
    table: str = DEFAULT_TABLE,
) -> list[SavedRoute]:
    """Route the container through its bridge to the relay, fenced on both sides.

    Returns the container's original default routes: ``saved_routes`` when
    given (never re-recorded, so a re-apply cannot overwrite the originals
    with our own route), otherwise the ones found now, ours excluded.
    """
    validate_container_id(container_id)
    validate_netns_path(netns_path)
    validate_allocation(allocation)
    validate_table(table)
    if not netns_exists(netns_path):
        raise NetnsGone(netns_path)

    apply_script(render_container_host_rules(table, container_id, allocation))

    prefix = allocation.prefixlen
    with iproute() as host, iproute(netns_path) as ns:
        bridge = links.ensure_bridge(host, allocation.bridge_name)
        links.disable_ipv6(allocation.bridge_name)
        links.ensure_ipv4_addresses(
            host,
            bridge,
            [
                ipaddress.IPv4Interface(f"{allocation.bridge_ip}/{prefix}"),
                ipaddress.IPv4Interface(f"{allocation.listener_ip}/{prefix}"),
            ],
        )
        links.set_up(host, bridge)

        host_veth = host_veth_name_for(container_id)
        host_index, peer_index = _ensure_veth_pair(
            host, ns, host_name=host_veth, netns_path=netns_path
        )
        links.disable_ipv6(host_veth)
        links.set_master(host, host_index, bridge)
        links.set_up(host, host_index)
        links.disable_ipv6(CONTAINER_IFNAME, netns_path=netns_path)
        links.ensure_ipv4_addresses(
            ns, peer_index, [ipaddress.IPv4Interface(f"{allocation.container_ip}/{prefix}")]
        )
        links.set_up(ns, peer_index)

        apply_script(
            render_wall(table, WallKind.PROXY, allocation=allocation),
            netns_path=netns_path,
        )

        if saved_routes is None:
            saved = routes.read_default_routes(ns, exclude_ifname=CONTAINER_IFNAME)
        else:
            saved = list(saved_routes)
        routes.ensure_default_route_via(ns, gateway=allocation.bridge_ip, ifname=CONTAINER_IFNAME)
    return saved


def _ensure_veth_pair(host: Any, ns: Any, *, host_name: str, netns_path: str) -> tuple[int, int]:
    """The host end and egress0 as one veth pair: reuse it or build it anew.

    Anything else under those names (one end alone, ends of different
    pairs, a peer left in an earlier namespace of the container) is
    deleted first. Returns (host ifindex, egress0 ifindex).
    """
    host_end = links.get_link(host, host_name)
    peer = links.get_link(ns, CONTAINER_IFNAME)
    if host_end is not None and links.link_kind(host_end) != "veth":
        raise KernelError(
            f"{host_name} exists and is a {links.link_kind(host_end)}, not a veth",
            errno=errno.EEXIST,
        )
    if (
        host_end is not None
        and peer is not None
        and links.link_kind(peer) == "veth"
        and links.link_peer_index(host_end) == links.link_index(peer)
        and links.link_peer_index(peer) == links.link_index(host_end)
    ):
        return links.link_index(host_end), links.link_index(peer)
    # Deleting one end of a veth deletes the other: look again in between.
    links.delete_link(host, host_name, kind="veth")
    links.delete_link(ns, CONTAINER_IFNAME, kind="veth")
    with netns_fd(netns_path) as fd:
        links.create_veth_into_netns(
            host, host_name=host_name, peer_name=CONTAINER_IFNAME, netns_fd=fd
        )
    host_end = links.get_link(host, host_name)
    peer = links.get_link(ns, CONTAINER_IFNAME)
    if host_end is None or peer is None:
        raise KernelError(f"veth {host_name} vanished after creation", errno=errno.ENODEV)
    return links.link_index(host_end), links.link_index(peer)


def apply_block_enforcement(
    *, container_id: str, netns_path: str, table: str = DEFAULT_TABLE
) -> None:
    """No egress at all: only loopback may send (v4 and v6, every protocol)."""
    validate_container_id(container_id)
    validate_netns_path(netns_path)
    apply_script(render_wall(table, WallKind.BLOCK), netns_path=netns_path)


def remove_enforcement(
    *,
    container_id: str,
    netns_path: str | None,
    allocation: Allocation | None,
    saved_routes: Sequence[SavedRoute],
    table: str = DEFAULT_TABLE,
) -> None:
    """Take away proxy or block enforcement; restore the container's routes.

    Works for either type and for any partial state. A container whose
    namespace is gone (deleted) still gets its host side cleaned.
    """
    validate_container_id(container_id)
    validate_table(table)
    if allocation is not None:
        validate_allocation(allocation)
    bridge_name = allocation.bridge_name if allocation else bridge_name_for(container_id)

    if netns_path is not None:
        validate_netns_path(netns_path)
        try:
            with iproute(netns_path) as ns:
                links.delete_link(ns, CONTAINER_IFNAME, kind="veth")
                routes.restore_routes(ns, saved_routes)
            apply_script(render_wall_removal(table), netns_path=netns_path)
        except NetnsGone:
            pass

    with iproute() as host:
        links.delete_link(host, host_veth_name_for(container_id), kind="veth")
        links.delete_link(host, bridge_name, kind="bridge")

    state = _host_state_for_removal(table)
    apply_script(
        render_container_host_removal(table, container_id, state, extra_bridges=[bridge_name])
    )
