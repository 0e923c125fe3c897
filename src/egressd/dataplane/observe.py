"""What is really in the kernel for one container, for the reconciler to compare.

Read-only: nothing here changes kernel state. Same concurrency model as
:mod:`egressd.dataplane.enforcement`.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from egressd.dataplane import links, routes
from egressd.dataplane.enforcement import read_host_table
from egressd.dataplane.names import (
    CONTAINER_IFNAME,
    DEFAULT_TABLE,
    chain_names,
    validate_allocation,
    validate_container_id,
    validate_netns_path,
    validate_table,
)
from egressd.dataplane.netns import NetnsGone, iproute, netns_exists
from egressd.dataplane.nft_apply import list_table
from egressd.dataplane.nft_render import HostTableState, WallKind, parse_wall
from egressd.model import Allocation, bridge_name_for, host_veth_name_for


@dataclass(frozen=True)
class ContainerObservation:
    """Observed state of one container's enforcement.

    ``*_ok`` fields compare with the allocation passed to
    :func:`inspect_container` (False when none was passed).
    """

    container_id: str
    netns_present: bool
    wall: WallKind | None
    egress0_present: bool
    egress0_ok: bool  # up, exactly the .3 address
    default_route_ok: bool  # default via .1 dev egress0
    bridge_name: str
    bridge_present: bool
    bridge_up: bool
    bridge_addresses: tuple[str, ...]
    bridge_ok: bool  # up, exactly .1 and .2
    host_veth_present: bool
    host_veth_ok: bool  # up, enslaved to the bridge
    host_chains_present: bool
    host_rules_ok: bool  # chains and all three elements for the bridge

    @property
    def proxy_enforced(self) -> bool:
        return (
            self.netns_present
            and self.wall is WallKind.PROXY
            and self.egress0_ok
            and self.default_route_ok
            and self.bridge_ok
            and self.host_veth_ok
            and self.host_rules_ok
        )

    @property
    def block_enforced(self) -> bool:
        return self.netns_present and self.wall is WallKind.BLOCK

    @property
    def host_side_clean(self) -> bool:
        return not (self.bridge_present or self.host_veth_present or self.host_chains_present)

    @property
    def clean(self) -> bool:
        """Nothing of ours left, in the host or in the container."""
        return self.host_side_clean and self.wall is None and not self.egress0_present


def _interfaces(allocation: Allocation, *hosts: ipaddress.IPv4Address) -> set[str]:
    return {f"{ip}/{allocation.prefixlen}" for ip in hosts}


def inspect_container(
    *,
    container_id: str,
    netns_path: str | None,
    allocation: Allocation | None,
    table: str = DEFAULT_TABLE,
    host_state: HostTableState | None = None,
) -> ContainerObservation:
    """What is in the kernel for one container.

    ``host_state`` is a host table read once for many containers (see
    :func:`read_host_table`); without it the table is read here.
    """
    validate_container_id(container_id)
    validate_table(table)
    if allocation is not None:
        validate_allocation(allocation)
    bridge_name = allocation.bridge_name if allocation else bridge_name_for(container_id)

    netns_present = False
    wall: WallKind | None = None
    egress0_present = egress0_ok = default_route_ok = False
    if netns_path is not None and netns_exists(validate_netns_path(netns_path)):
        try:
            with iproute(netns_path) as ns:
                peer = links.get_link(ns, CONTAINER_IFNAME)
                egress0_present = peer is not None
                if peer is not None and allocation is not None:
                    addresses = {str(a) for a in links.ipv4_addresses(ns, links.link_index(peer))}
                    egress0_ok = links.link_is_up(peer) and addresses == _interfaces(
                        allocation, allocation.container_ip
                    )
                    default_route_ok = routes.default_route_via(
                        ns, gateway=allocation.bridge_ip, ifname=CONTAINER_IFNAME
                    )
            wall = parse_wall(
                list_table(table, netns_path=netns_path),
                allocation=allocation,
            )
            netns_present = True
        except NetnsGone:
            wall = None
            egress0_present = egress0_ok = default_route_ok = False

    with iproute() as host:
        bridge = links.get_link(host, bridge_name)
        bridge_present = bridge is not None and links.link_kind(bridge) == "bridge"
        bridge_up = bridge_present and links.link_is_up(bridge)
        bridge_addresses: tuple[str, ...] = ()
        if bridge is not None and bridge_present:
            bridge_addresses = tuple(
                sorted(str(a) for a in links.ipv4_addresses(host, links.link_index(bridge)))
            )
        host_veth = links.get_link(host, host_veth_name_for(container_id))
        host_veth_present = host_veth is not None
        host_veth_ok = (
            host_veth is not None
            and bridge is not None
            and bridge_present
            and links.link_is_up(host_veth)
            and links.link_master(host_veth) == links.link_index(bridge)
        )

    state = host_state if host_state is not None else read_host_table(table)
    host_chains_present = any(chain in state.chains for chain in chain_names(container_id))
    bridge_ok = False
    if allocation is not None:
        bridge_ok = bridge_up and set(bridge_addresses) == _interfaces(
            allocation, allocation.bridge_ip, allocation.listener_ip
        )

    return ContainerObservation(
        container_id=container_id,
        netns_present=netns_present,
        wall=wall,
        egress0_present=egress0_present,
        egress0_ok=egress0_ok,
        default_route_ok=default_route_ok,
        bridge_name=bridge_name,
        bridge_present=bridge_present,
        bridge_up=bridge_up,
        bridge_addresses=bridge_addresses,
        bridge_ok=bridge_ok,
        host_veth_present=host_veth_present,
        host_veth_ok=host_veth_ok,
        host_chains_present=host_chains_present,
        host_rules_ok=allocation is not None
        and state.has_container(container_id, allocation, table),
    )
