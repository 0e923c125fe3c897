"""Validation of every name the dataplane puts into a kernel object or an nft script.

nft scripts are text: nothing reaches them that did not pass one of these
checks (container ids are 24 hex, table and interface names are short
identifiers, addresses are :mod:`ipaddress` values, ports are ints).
"""

from __future__ import annotations

import os
import re

from egressd.errors import InvalidInput
from egressd.model import Allocation, parse_container_id

TABLE_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
# IFNAMSIZ is 16 including the NUL; "/" and whitespace are refused by the kernel,
# and we refuse anything that would need quoting beyond "..." in nft.
IFNAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}$")
# Named netns (/run/netns/x), a process's (/proc/1/ns/net) or a CNI-style path.
NETNS_PATH_RE = re.compile(r"^/[A-Za-z0-9_.:@+/-]{1,4095}$")

CONTAINER_IFNAME = "egress0"
DEFAULT_TABLE = "egressd"


def validate_table(table: str) -> str:
    if not isinstance(table, str) or not TABLE_RE.match(table):
        raise InvalidInput(f"Invalid nftables table name {table!r}")
    return table


def validate_ifname(name: str) -> str:
    if not isinstance(name, str) or not IFNAME_RE.match(name) or name in (".", ".."):
        raise InvalidInput(f"Invalid interface name {name!r}")
    return name


def validate_container_id(container_id: str) -> str:
    return parse_container_id(container_id)


def validate_netns_path(path: str) -> str:
    if not isinstance(path, str) or not NETNS_PATH_RE.match(path) or os.path.normpath(path) != path:
        raise InvalidInput(f"Invalid network namespace path {path!r}")
    return path


def validate_allocation(allocation: Allocation) -> Allocation:
    validate_ifname(allocation.bridge_name)
    if allocation.subnet.version != 4 or allocation.subnet.prefixlen > 29:
        raise InvalidInput(f"Allocation subnet {allocation.subnet} is not an IPv4 /29 or larger")
    if not isinstance(allocation.port, int) or not 1 <= allocation.port <= 65535:
        raise InvalidInput(f"Invalid listener port {allocation.port!r}")
    return allocation


def chain_names(container_id: str) -> tuple[str, str]:
    """The container's host chains: (nat prerouting, filter input)."""
    validate_container_id(container_id)
    return f"c-{container_id}-pre", f"c-{container_id}-in"
