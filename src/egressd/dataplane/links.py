"""Links and addresses through pyroute2: the bridge, the veth pair, their addresses.

Every function is ensure-or-remove: creating something that exists checks
it is what we want, deleting something missing succeeds. Functions take an
open ``IPRoute`` (see :func:`egressd.dataplane.netns.iproute`) for the
namespace they act in.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from typing import Any

from pyroute2.netlink.exceptions import NetlinkError

from egressd.dataplane._kernel_errors import kernel_errors
from egressd.dataplane.names import validate_ifname
from egressd.dataplane.netns import run_in_netns
from egressd.errors import KernelError

IFF_UP = 0x1


def get_link(ipr: Any, name: str) -> Any | None:
    """The link message of ``name``, or None.

    A GET by name, answered by the kernel for that one link: ``link_lookup``
    would dump and decode every link of the namespace, which with a bridge
    and a veth per container made each lookup O(containers).
    """
    validate_ifname(name)
    try:
        links = ipr.link("get", ifname=name)
    except NetlinkError as exc:
        if exc.code == errno.ENODEV:
            return None
        raise KernelError(f"look up link {name}: {exc}", errno=exc.code) from exc
    return links[0] if links else None


def link_kind(link: Any) -> str | None:
    kind = link.get(("linkinfo", "kind"))
    return str(kind) if kind is not None else None


def link_index(link: Any) -> int:
    return int(link["index"])


def link_is_up(link: Any) -> bool:
    return bool(int(link["flags"]) & IFF_UP)


def link_master(link: Any) -> int | None:
    master = link.get("IFLA_MASTER")
    return int(master) if master is not None else None


def link_peer_index(link: Any) -> int | None:
    """For a veth, the peer's ifindex (in the peer's namespace)."""
    peer = link.get("IFLA_LINK")
    return int(peer) if peer is not None else None


def ensure_bridge(ipr: Any, name: str) -> int:
    """Create bridge ``name`` unless it exists; refuse a same-named non-bridge."""
    try:
        with kernel_errors(f"create bridge {name}"):
            ipr.link("add", ifname=validate_ifname(name), kind="bridge")
    except KernelError as exc:
        if exc.errno != errno.EEXIST:
            raise
    link = get_link(ipr, name)
    if link is None:
        raise KernelError(f"bridge {name} vanished after creation", errno=errno.ENODEV)
    if link_kind(link) != "bridge":
        raise KernelError(
            f"{name} exists and is a {link_kind(link)}, not a bridge", errno=errno.EEXIST
        )
    return link_index(link)


def delete_link(ipr: Any, name: str, *, kind: str | None = None) -> bool:
    """Delete ``name`` if present (and, with ``kind``, only if of that kind)."""
    link = get_link(ipr, name)
    if link is None or (kind is not None and link_kind(link) != kind):
        return False
    try:
        with kernel_errors(f"delete link {name}"):
            ipr.link("del", index=link_index(link))
    except KernelError as exc:
        if exc.errno != errno.ENODEV:
            raise
    return True


def set_up(ipr: Any, index: int) -> None:
    with kernel_errors(f"set link {index} up"):
        ipr.link("set", index=index, state="up")


def set_master(ipr: Any, index: int, master: int) -> None:
    with kernel_errors(f"enslave link {index} to {master}"):
        ipr.link("set", index=index, master=master)


def disable_ipv6(ifname: str, *, netns_path: str | None = None) -> None:
    """``net.ipv6.conf.<ifname>.disable_ipv6 = 1`` in the host or a container netns.

    /proc/sys/net shows the namespace of the thread that opens it, hence the
    write runs in a thread inside the container's namespace. Set it before
    the link goes up, so no link-local address is ever configured. A link
    moved between namespaces gets fresh per-namespace defaults, so this is
    done after the move. No conf directory means IPv6 is off altogether.
    """
    path = f"/proc/sys/net/ipv6/conf/{validate_ifname(ifname)}/disable_ipv6"

    def write() -> None:
        try:
            with open(path, "w") as f:
                f.write("1\n")
        except FileNotFoundError:
            pass

    with kernel_errors(f"disable IPv6 on {ifname}"):
        if netns_path is None:
            write()
        else:
            run_in_netns(netns_path, write)


def ipv4_addresses(ipr: Any, index: int) -> set[ipaddress.IPv4Interface]:
    """The link's IPv4 addresses, asked of the kernel for that link alone.

    The socket has NETLINK_GET_STRICT_CHK (see
    :func:`egressd.dataplane.netns.iproute`), so the kernel reads
    ``ifa_index`` in the dump request and answers for one link. pyroute2
    puts ``index`` into the request header only when it is given its own
    ``dump_filter``; by default it would dump every address of the
    namespace (two per container on the host) and filter in Python, which
    took 136 ms per lookup with 1,500 bridges. The index is still checked
    here, for a kernel that ignores the header.
    """
    with kernel_errors(f"list addresses of link {index}"):
        messages = ipr.addr("dump", family=socket.AF_INET, index=index, dump_filter=_every_message)
        return {
            ipaddress.IPv4Interface(f"{m.get('IFA_ADDRESS')}/{m['prefixlen']}")
            for m in messages
            if int(m["index"]) == index
        }


def _every_message(_message: Any) -> bool:
    return True


def ensure_ipv4_addresses(ipr: Any, index: int, wanted: Iterable[ipaddress.IPv4Interface]) -> None:
    """Make the link's IPv4 addresses exactly ``wanted``.

    Stale addresses go first: deleting a primary address also deletes the
    secondaries of its subnet (unless promote_secondaries), so removing
    them after adding ours could take ours with them.
    """
    wanted_set = set(wanted)
    for stale in sorted(ipv4_addresses(ipr, index) - wanted_set):
        try:
            with kernel_errors(f"delete address {stale} from link {index}"):
                ipr.addr(
                    "del", index=index, address=str(stale.ip), prefixlen=stale.network.prefixlen
                )
        except KernelError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise
    for missing in sorted(wanted_set - ipv4_addresses(ipr, index)):
        try:
            with kernel_errors(f"add address {missing} to link {index}"):
                ipr.addr(
                    "add", index=index, address=str(missing.ip), prefixlen=missing.network.prefixlen
                )
        except KernelError as exc:
            if exc.errno != errno.EEXIST:
                raise


def create_veth_into_netns(ipr: Any, *, host_name: str, peer_name: str, netns_fd: int) -> None:
    """Create a veth pair whose peer is born inside the container's namespace.

    Creating the peer there directly (IFLA_NET_NS_FD in the peer info)
    means no half-moved peer is ever left in the host namespace under a
    name that the next container would collide with.
    """
    with kernel_errors(f"create veth {host_name} <-> {peer_name}"):
        ipr.link(
            "add",
            ifname=validate_ifname(host_name),
            kind="veth",
            peer={"ifname": validate_ifname(peer_name), "net_ns_fd": netns_fd},
        )
