"""What is really in the kernel for one container, for the reconciler to compare.

Read-only: nothing here changes kernel state. Same concurrency model as
:mod:`egressd.dataplane.enforcement`. Reads go through the lean
:mod:`egressd.dataplane.rtnl_read`, and a container's nftables wall is listed
(an ``nft`` process) only when its namespace's ruleset changed since the last
look (:mod:`egressd.dataplane.nft_gen`): the agent inspects every container
on each resync.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import partial

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
from egressd.dataplane.netns import NetnsGone, netns_exists, run_in_netns
from egressd.dataplane.nft_apply import list_table
from egressd.dataplane.nft_gen import StampedCache, ruleset_stamp
from egressd.dataplane.nft_render import HostTableState, WallKind, parse_wall
from egressd.dataplane.rtnl_read import RtnlReader
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


# Each container's wall as last parsed, under the stamp of its namespace's ruleset
# (see nft_gen): a resync that finds the stamp unchanged skips the ``nft`` process.
_walls: StampedCache[tuple[int, str, Allocation | None], WallKind | None] = StampedCache()


def _open_in_container(
    table: str, allocation: Allocation | None
) -> tuple[RtnlReader, WallKind | None]:
    """Run inside the container's namespace: a netlink reader there, and its wall.

    One thread enters the namespace for both (the reader's socket stays in
    it after the thread ends).
    """
    reader = RtnlReader.open()
    try:
        stamp = ruleset_stamp()
        key = (stamp.netns_cookie if stamp is not None else 0, table, allocation)
        wall = _walls.get_or_read(
            key, stamp, lambda: parse_wall(list_table(table), allocation=allocation)
        )
        return reader, wall
    except BaseException:
        reader.close()
        raise


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
            reader, wall = run_in_netns(netns_path, partial(_open_in_container, table, allocation))
            with reader:
                peer = reader.link(CONTAINER_IFNAME)
                egress0_present = peer is not None
                if peer is not None and allocation is not None:
                    addresses = {str(a) for a in reader.ipv4_addresses(peer.index)}
                    egress0_ok = peer.is_up and addresses == _interfaces(
                        allocation, allocation.container_ip
                    )
                    default_route_ok = any(
                        route.gateway == str(allocation.bridge_ip) and route.oif == peer.index
                        for route in reader.default_routes()
                    )
            netns_present = True
        except NetnsGone:
            wall = None
            egress0_present = egress0_ok = default_route_ok = False

    with RtnlReader.open() as host:
        bridge = host.link(bridge_name)
        bridge_present = bridge is not None and bridge.kind == "bridge"
        bridge_up = bridge is not None and bridge_present and bridge.is_up
        bridge_addresses: tuple[str, ...] = ()
        if bridge is not None and bridge_present:
            bridge_addresses = tuple(sorted(str(a) for a in host.ipv4_addresses(bridge.index)))
        host_veth = host.link(host_veth_name_for(container_id))
        host_veth_present = host_veth is not None
        host_veth_ok = (
            host_veth is not None
            and bridge is not None
            and bridge_present
            and host_veth.is_up
            and host_veth.master == bridge.index
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
