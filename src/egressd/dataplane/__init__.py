"""The dataplane: kernel state that enforces each container's egress policy.

Network namespaces, links, addresses and routes go through pyroute2
(netlink); nftables rulesets are rendered by pure functions
(:mod:`~egressd.dataplane.nft_render`) and committed as one ``nft -f``
transaction each (:mod:`~egressd.dataplane.nft_apply`, the only module
that starts a process). :mod:`~egressd.dataplane.enforcement` composes
them; :mod:`~egressd.dataplane.observe` reads back what is there.

All functions are synchronous, idempotent and crash-safe; call them from
one reconciler thread. Kernel failures raise
:class:`egressd.errors.KernelError` with the errno kept.
"""

from egressd.dataplane.enforcement import (
    apply_block_enforcement,
    apply_proxy_enforcement,
    ensure_host_base,
    list_host_containers,
    read_host_table,
    record_default_routes,
    remove_enforcement,
    remove_host_base,
)
from egressd.dataplane.names import CONTAINER_IFNAME, DEFAULT_TABLE
from egressd.dataplane.netns import NetnsGone, netns_exists
from egressd.dataplane.nft_apply import nft_available
from egressd.dataplane.nft_render import HostTableState, WallKind
from egressd.dataplane.observe import ContainerObservation, inspect_container
from egressd.dataplane.routes import SavedNextHop, SavedRoute

__all__ = [
    "CONTAINER_IFNAME",
    "DEFAULT_TABLE",
    "ContainerObservation",
    "HostTableState",
    "NetnsGone",
    "SavedNextHop",
    "SavedRoute",
    "WallKind",
    "apply_block_enforcement",
    "apply_proxy_enforcement",
    "ensure_host_base",
    "inspect_container",
    "list_host_containers",
    "netns_exists",
    "nft_available",
    "read_host_table",
    "record_default_routes",
    "remove_enforcement",
    "remove_host_base",
]
