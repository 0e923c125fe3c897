"""The rtnetlink reader's parsing, on messages laid out as the kernel sends them."""

from __future__ import annotations

import ipaddress
import socket
import struct

import pytest

from egressd.dataplane import rtnl_read as r


def attr(kind: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return (struct.pack("=HH", length, kind) + payload).ljust((length + 3) & ~3, b"\0")


def nlmsg(kind: int, seq: int, body: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body


def link_body(index: int, name: str, *, kind: str | None, master: int | None, up: bool) -> bytes:
    body = struct.pack("=BxHiII", socket.AF_UNSPEC, 1, index, 0x1 if up else 0, 0)
    body += attr(r.IFLA_IFNAME, name.encode() + b"\0")
    if master is not None:
        body += attr(r.IFLA_MASTER, struct.pack("=I", master))
    if kind is not None:
        # IFLA_LINKINFO arrives with NLA_F_NESTED set on some kernels.
        body += attr(r.IFLA_LINKINFO | 0x8000, attr(r.IFLA_INFO_KIND, kind.encode() + b"\0"))
    return body


def test_link_fields_and_nested_kind() -> None:
    link = r.parse_link(link_body(7, "ve-0123456789ab", kind="veth", master=5, up=True))
    assert link == r.LinkInfo(7, "ve-0123456789ab", 0x1, "veth", 5)
    assert link.is_up
    bare = r.parse_link(link_body(1, "lo", kind=None, master=None, up=False))
    assert bare.kind is None and bare.master is None and not bare.is_up


def test_ipv4_address_and_other_families() -> None:
    body = struct.pack("=BBBBI", socket.AF_INET, 29, 0, 0, 9) + attr(
        r.IFA_ADDRESS, ipaddress.IPv4Address("10.20.0.1").packed
    )
    assert r.parse_ipv4_address(body) == (9, ipaddress.IPv4Interface("10.20.0.1/29"))
    v6 = struct.pack("=BBBBI", socket.AF_INET6, 64, 0, 0, 9) + attr(r.IFA_ADDRESS, bytes(16))
    assert r.parse_ipv4_address(v6) is None


def route_body(*, dst_len: int, table: int, gateway: str | None, oif: int | None) -> bytes:
    body = struct.pack("=BBBBBBBBI", socket.AF_INET, dst_len, 0, 0, min(table, 255), 3, 0, 1, 0)
    body += attr(r.RTA_TABLE, struct.pack("=I", table))
    if gateway is not None:
        body += attr(r.RTA_GATEWAY, ipaddress.IPv4Address(gateway).packed)
    if oif is not None:
        body += attr(r.RTA_OIF, struct.pack("=I", oif))
    return body


def test_only_main_table_defaults_count() -> None:
    ours = route_body(dst_len=0, table=254, gateway="10.20.0.1", oif=3)
    assert r.parse_default_route(ours) == r.DefaultRoute("10.20.0.1", 3)
    assert (
        r.parse_default_route(route_body(dst_len=0, table=1000, gateway="1.2.3.4", oif=3)) is None
    )
    assert r.parse_default_route(route_body(dst_len=29, table=254, gateway=None, oif=3)) is None
    assert r.parse_default_route(route_body(dst_len=0, table=254, gateway=None, oif=2)) == (
        r.DefaultRoute(None, 2)
    )


def test_messages_split_a_datagram_and_stop_at_truncation() -> None:
    first = nlmsg(r.RTM_NEWADDR, 4, b"\x01\x02\x03")  # unaligned length: padded in the stream
    datagram = first.ljust((len(first) + 3) & ~3, b"\0") + nlmsg(r.NLMSG_DONE, 4, b"\0" * 4)
    assert [(kind, seq) for kind, seq, _ in r.messages(datagram)] == [
        (r.RTM_NEWADDR, 4),
        (r.NLMSG_DONE, 4),
    ]
    assert list(r.messages(datagram[:-3])) == [(r.RTM_NEWADDR, 4, b"\x01\x02\x03")]


@pytest.mark.parametrize("cut", [1, 3, 5, 7])
def test_truncated_attributes_are_ignored(cut: int) -> None:
    data = attr(r.IFLA_IFNAME, b"eth0\0") + attr(r.IFLA_MASTER, struct.pack("=I", 2))
    parsed = r.attributes(data[: len(data) - cut])
    assert parsed == {r.IFLA_IFNAME: b"eth0\0"}
