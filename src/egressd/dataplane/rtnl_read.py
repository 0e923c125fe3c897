"""A small, fast rtnetlink reader: one link by name, one link's IPv4 addresses, IPv4 default routes.

The agent checks every container's links, addresses and routes on each
resync (and all of them after a restart). Through pyroute2 each request
costs about a millisecond of Python (an asyncio round per call, every
attribute decoded); here a request is one ``send``/``recv`` on a plain
netlink socket and only the attributes we compare are read, about 50 µs.
Writes stay with pyroute2 (:mod:`egressd.dataplane.links`): they are rare.

Read-only. A :class:`RtnlReader` wraps a socket opened in the namespace to
read (see :func:`egressd.dataplane.netns.rtnl_reader`); not thread-safe
(one reader per thread). The byte layouts are the kernel's
(``linux/netlink.h``, ``linux/rtnetlink.h``, ``linux/if_link.h``,
``linux/if_addr.h``); the parsing helpers are pure and unit-tested.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from egressd.dataplane.names import validate_ifname
from egressd.errors import KernelError

NETLINK_ROUTE = 0
SOL_NETLINK = 270
NETLINK_GET_STRICT_CHK = 12  # Linux 4.20+: dump requests are filtered by their header

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26
IFLA_IFNAME, IFLA_MASTER, IFLA_LINKINFO = 3, 10, 18
IFLA_INFO_KIND = 1
IFA_ADDRESS = 1
RTA_OIF, RTA_GATEWAY, RTA_TABLE = 4, 5, 15
RT_TABLE_MAIN = 254
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
# family, dst_len, src_len, tos, table, protocol, scope, type, flags
_RTMSG = struct.Struct("=BBBBBBBBI")
_RTATTR = struct.Struct("=HH")  # len, type
RECV_BYTES = 1 << 16


@dataclass(frozen=True)
class LinkInfo:
    index: int
    name: str
    flags: int
    kind: str | None  # "bridge", "veth", ...; None for a link without linkinfo
    master: int | None  # ifindex of the bridge it is enslaved to

    @property
    def is_up(self) -> bool:
        return bool(self.flags & 0x1)  # IFF_UP


@dataclass(frozen=True)
class DefaultRoute:
    """An IPv4 default route of the main table (single path)."""

    gateway: str | None
    oif: int | None


def _align(n: int) -> int:
    return (n + 3) & ~3


def attributes(data: bytes, offset: int = 0) -> dict[int, bytes]:
    """Netlink attributes from ``offset`` to the end: type -> payload (the last one wins)."""
    found: dict[int, bytes] = {}
    while offset + _RTATTR.size <= len(data):
        length, kind = _RTATTR.unpack_from(data, offset)
        if length < _RTATTR.size or offset + length > len(data):
            break
        found[kind & NLA_TYPE_MASK] = data[offset + _RTATTR.size : offset + length]
        offset += _align(length)
    return found


def _attribute(kind: int, payload: bytes) -> bytes:
    header = _RTATTR.pack(_RTATTR.size + len(payload), kind)
    return (header + payload).ljust(_align(_RTATTR.size + len(payload)), b"\0")


def _u32(value: bytes | None) -> int | None:
    return None if value is None or len(value) < 4 else int(struct.unpack_from("=I", value)[0])


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.split(b"\0", 1)[0].decode("ascii", "replace")


def parse_link(payload: bytes) -> LinkInfo:
    """An RTM_NEWLINK message body (after the netlink header)."""
    _family, _type, index, flags, _change = _IFINFOMSG.unpack_from(payload)
    attrs = attributes(payload, _IFINFOMSG.size)
    linkinfo = attrs.get(IFLA_LINKINFO)
    kind = _text(attributes(linkinfo).get(IFLA_INFO_KIND)) if linkinfo is not None else None
    return LinkInfo(
        index=index,
        name=_text(attrs.get(IFLA_IFNAME)) or "",
        flags=flags,
        kind=kind,
        master=_u32(attrs.get(IFLA_MASTER)),
    )


def parse_ipv4_address(payload: bytes) -> tuple[int, ipaddress.IPv4Interface] | None:
    """(ifindex, address/prefix) of an RTM_NEWADDR body; None if not IPv4."""
    family, prefixlen, _flags, _scope, index = _IFADDRMSG.unpack_from(payload)
    raw = attributes(payload, _IFADDRMSG.size).get(IFA_ADDRESS)
    if family != socket.AF_INET or raw is None or len(raw) != 4:
        return None
    return index, ipaddress.IPv4Interface((ipaddress.IPv4Address(raw), prefixlen))


def parse_default_route(payload: bytes) -> DefaultRoute | None:
    """An IPv4 default route of the main table from an RTM_NEWROUTE body, else None."""
    family, dst_len, src_len, _tos, table, _proto, _scope, _type, _flags = _RTMSG.unpack_from(
        payload
    )
    attrs = attributes(payload, _RTMSG.size)
    table = _u32(attrs.get(RTA_TABLE)) or table
    if family != socket.AF_INET or dst_len != 0 or src_len != 0 or table != RT_TABLE_MAIN:
        return None
    raw_gateway = attrs.get(RTA_GATEWAY)
    gateway = (
        str(ipaddress.IPv4Address(raw_gateway))
        if raw_gateway is not None and len(raw_gateway) == 4
        else None
    )
    return DefaultRoute(gateway=gateway, oif=_u32(attrs.get(RTA_OIF)))


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, seq, body) of each netlink message in one datagram."""
    offset = 0
    while offset + _NLMSGHDR.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSGHDR.unpack_from(data, offset)
        if length < _NLMSGHDR.size or offset + length > len(data):
            break
        yield kind, seq, data[offset + _NLMSGHDR.size : offset + length]
        offset += _align(length)


class RtnlReader:
    """Requests on one NETLINK_ROUTE socket (owned: closed with the reader)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._seq = itertools.count(1)

    @classmethod
    def open(cls) -> RtnlReader:
        """A reader in the calling thread's namespace."""
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        try:
            sock.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
            sock.settimeout(10.0)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> RtnlReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _request(self, kind: int, flags: int, body: bytes, what: str) -> Iterator[bytes]:
        """Send one request; yield the bodies of its answer (to NLMSG_DONE for dumps)."""
        seq = next(self._seq)
        header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags, seq, 0)
        try:
            self._sock.send(header + body)
            while True:
                data = self._sock.recv(RECV_BYTES)
                for mtype, mseq, payload in messages(data):
                    if mseq != seq:
                        continue  # an answer to an earlier, abandoned request
                    if mtype == NLMSG_DONE:
                        return
                    if mtype == NLMSG_ERROR:
                        code = -int(struct.unpack_from("=i", payload)[0])
                        if code:
                            raise KernelError(f"{what}: {os.strerror(code)}", errno=code)
                        return
                    yield payload
                    if not flags & NLM_F_DUMP:
                        return
        except OSError as exc:
            raise KernelError(f"{what}: {exc}", errno=exc.errno) from None

    def link(self, name: str) -> LinkInfo | None:
        """The link called ``name``, or None."""
        body = _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0) + _attribute(
            IFLA_IFNAME, validate_ifname(name).encode() + b"\0"
        )
        try:
            for payload in self._request(RTM_GETLINK, 0, body, f"look up link {name}"):
                return parse_link(payload)
        except KernelError as exc:
            if exc.errno == errno.ENODEV:
                return None
            raise
        return None

    def ipv4_addresses(self, index: int) -> set[ipaddress.IPv4Interface]:
        """The IPv4 addresses of link ``index`` (the kernel filters: strict checking)."""
        body = _IFADDRMSG.pack(socket.AF_INET, 0, 0, 0, index)
        found = set()
        for payload in self._request(RTM_GETADDR, NLM_F_DUMP, body, f"list addresses of {index}"):
            parsed = parse_ipv4_address(payload)
            if parsed is not None and parsed[0] == index:  # a kernel may ignore the filter
                found.add(parsed[1])
        return found

    def default_routes(self) -> list[DefaultRoute]:
        """The IPv4 default routes of the main table, in kernel order."""
        body = _RTMSG.pack(socket.AF_INET, 0, 0, 0, 0, 0, 0, 0, 0)
        found = []
        for payload in self._request(RTM_GETROUTE, NLM_F_DUMP, body, "list routes"):
            route = parse_default_route(payload)
            if route is not None:
                found.append(route)
        return found
