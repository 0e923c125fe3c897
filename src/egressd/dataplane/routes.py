"""A container's default routes: record them, replace them, restore them exactly.

:class:`SavedRoute` is what the caller keeps in its database between
``apply`` and ``remove``: plain JSON through ``to_dict``/``from_dict``,
with interfaces by *name* (ifindexes are not stable across a link's
re-creation) and every attribute ``ip route`` shows for a default route:
table, protocol, scope, type, tos, metric, gateway, onlink, prefsrc, IPv6
preference, route metrics (mtu, ...), and multipath nexthops.

Not restorable and so not recorded: expiry of RA-learned IPv6 routes
(restored without it) and nexthop-object routes (``nhid``), which pyroute2
0.9 does not decode.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from egressd.dataplane._kernel_errors import kernel_errors
from egressd.dataplane.names import validate_ifname
from egressd.errors import InvalidInput, KernelError

RT_TABLE_MAIN = 254
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE = 0
RTN_UNICAST = 1
RTNH_F_ONLINK = 0x4
_FAMILIES = {4: socket.AF_INET, 6: socket.AF_INET6}


@dataclass(frozen=True)
class SavedNextHop:
    """One path of a multipath route."""

    gateway: str | None
    ifname: str | None
    weight: int = 1
    onlink: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "gateway": self.gateway,
            "ifname": self.ifname,
            "weight": self.weight,
            "onlink": self.onlink,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, family: int) -> SavedNextHop:
        weight = data.get("weight", 1)
        if not isinstance(weight, int) or not 1 <= weight <= 256:
            raise InvalidInput(f"Invalid nexthop weight {weight!r}")
        return cls(
            gateway=_opt_ip(data.get("gateway"), family),
            ifname=_opt_ifname(data.get("ifname")),
            weight=weight,
            onlink=bool(data.get("onlink", False)),
        )


@dataclass(frozen=True)
class SavedRoute:
    """A route as recorded before enforcement, enough to put it back exactly."""

    family: int  # 4 or 6
    dst: str  # "0.0.0.0/0" or "::/0"
    table: int = RT_TABLE_MAIN
    protocol: int = RTPROT_STATIC
    scope: int = RT_SCOPE_UNIVERSE
    type: int = RTN_UNICAST
    tos: int = 0
    priority: int | None = None
    gateway: str | None = None
    ifname: str | None = None
    onlink: bool = False
    prefsrc: str | None = None
    pref: int | None = None
    metrics: Mapping[str, int | str] = field(default_factory=dict)
    nexthops: tuple[SavedNextHop, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "dst": self.dst,
            "table": self.table,
            "protocol": self.protocol,
            "scope": self.scope,
            "type": self.type,
            "tos": self.tos,
            "priority": self.priority,
            "gateway": self.gateway,
            "ifname": self.ifname,
            "onlink": self.onlink,
            "prefsrc": self.prefsrc,
            "pref": self.pref,
            "metrics": dict(self.metrics),
            "nexthops": [nh.to_dict() for nh in self.nexthops],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SavedRoute:
        """Parse what :meth:`to_dict` produced; refuses anything else."""
        if not isinstance(data, Mapping):
            raise InvalidInput("A saved route must be an object")
        family = data.get("family")
        if family not in _FAMILIES:
            raise InvalidInput(f"Invalid saved route family {family!r}")
        try:
            dst = str(ipaddress.ip_network(data.get("dst", ""), strict=True))
        except (TypeError, ValueError):
            raise InvalidInput(f"Invalid saved route destination {data.get('dst')!r}") from None
        if ipaddress.ip_network(dst).version != family:
            raise InvalidInput("Saved route destination does not match its family")
        metrics = data.get("metrics") or {}
        if not isinstance(metrics, Mapping) or not all(
            isinstance(k, str) and k.isidentifier() and isinstance(v, int | str)
            for k, v in metrics.items()
        ):
            raise InvalidInput("Invalid saved route metrics")
        nexthops = data.get("nexthops") or []
        if not isinstance(nexthops, list):
            raise InvalidInput("Invalid saved route nexthops")
        priority = data.get("priority")
        pref = data.get("pref")
        return cls(
            family=family,
            dst=dst,
            table=_uint(data.get("table", RT_TABLE_MAIN), "table", 2**32 - 1),
            protocol=_uint(data.get("protocol", RTPROT_STATIC), "protocol", 255),
            scope=_uint(data.get("scope", RT_SCOPE_UNIVERSE), "scope", 255),
            type=_uint(data.get("type", RTN_UNICAST), "type", 255),
            tos=_uint(data.get("tos", 0), "tos", 255),
            priority=None if priority is None else _uint(priority, "priority", 2**32 - 1),
            gateway=_opt_ip(data.get("gateway"), family),
            ifname=_opt_ifname(data.get("ifname")),
            onlink=bool(data.get("onlink", False)),
            prefsrc=_opt_ip(data.get("prefsrc"), family),
            pref=None if pref is None else _uint(pref, "pref", 255),
            metrics=dict(metrics),
            nexthops=tuple(SavedNextHop.from_dict(nh, family=family) for nh in nexthops),
        )

    @property
    def ifnames(self) -> set[str]:
        names = {self.ifname} | {nh.ifname for nh in self.nexthops}
        return {n for n in names if n is not None}


def _uint(value: Any, what: str, maximum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise InvalidInput(f"Invalid saved route {what} {value!r}")
    return value


def _opt_ip(value: Any, family: int) -> str | None:
    if value is None:
        return None
    try:
        address = ipaddress.ip_address(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"Invalid saved route address {value!r}") from None
    if address.version != family:
        raise InvalidInput(f"Saved route address {value} is not IPv{family}")
    return str(address)


def _opt_ifname(value: Any) -> str | None:
    return None if value is None else validate_ifname(value)


def _link_names(ipr: Any) -> dict[int, str]:
    with kernel_errors("list links"):
        return {int(link["index"]): str(link.get("IFLA_IFNAME")) for link in ipr.link("dump")}


def _route_table(msg: Any) -> int:
    table = msg.get("RTA_TABLE")
    return int(table) if table is not None else int(msg["table"])


def _from_message(msg: Any, names: Mapping[int, str]) -> SavedRoute:
    version = 4 if msg["family"] == socket.AF_INET else 6
    oif = msg.get("RTA_OIF")
    metrics: dict[str, int | str] = {}
    raw_metrics = msg.get("RTA_METRICS")
    if raw_metrics is not None:
        for name, value in raw_metrics.get("attrs", []):
            metrics[name.removeprefix("RTAX_").lower()] = value
    nexthops = tuple(
        SavedNextHop(
            gateway=nh.get("RTA_GATEWAY"),
            ifname=names.get(int(nh["oif"])),
            weight=int(nh["hops"]) + 1,
            onlink=bool(int(nh["flags"]) & RTNH_F_ONLINK),
        )
        for nh in msg.get("RTA_MULTIPATH") or []
    )
    priority = msg.get("RTA_PRIORITY")
    pref = msg.get("RTA_PREF")
    return SavedRoute(
        family=version,
        dst="0.0.0.0/0" if version == 4 else "::/0",
        table=_route_table(msg),
        protocol=int(msg["proto"]),
        scope=int(msg["scope"]),
        type=int(msg["type"]),
        tos=int(msg["tos"]),
        priority=None if priority is None else int(priority),
        gateway=msg.get("RTA_GATEWAY"),
        ifname=names.get(int(oif)) if oif is not None else None,
        onlink=bool(int(msg["flags"]) & RTNH_F_ONLINK),
        prefsrc=msg.get("RTA_PREFSRC"),
        pref=None if pref is None else int(pref),
        metrics=metrics,
        nexthops=nexthops,
    )


def read_default_routes(ipr: Any, *, exclude_ifname: str | None = None) -> list[SavedRoute]:
    """The default routes (v4 then v6) of the main table, in kernel order."""
    names = _link_names(ipr)
    found: list[SavedRoute] = []
    for version in (4, 6):
        with kernel_errors("list routes"):
            messages = list(ipr.route("dump", family=_FAMILIES[version]))
        for msg in messages:
            if msg["dst_len"] != 0 or msg["src_len"] != 0 or _route_table(msg) != RT_TABLE_MAIN:
                continue
            route = _from_message(msg, names)
            if exclude_ifname is not None and exclude_ifname in route.ifnames:
                continue
            found.append(route)
    return found


def _route_spec(route: SavedRoute, indexes: Mapping[str, int]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "family": _FAMILIES[route.family],
        "dst_len": 0,
        "table": route.table,
        "proto": route.protocol,
        "scope": route.scope,
        "type": route.type,
        "tos": route.tos,
        "flags": RTNH_F_ONLINK if route.onlink else 0,
    }
    if route.priority is not None:
        spec["priority"] = route.priority
    if route.gateway is not None:
        spec["gateway"] = route.gateway
    if route.ifname is not None:
        spec["oif"] = indexes[route.ifname]
    if route.prefsrc is not None:
        spec["prefsrc"] = route.prefsrc
    if route.pref is not None:
        spec["RTA_PREF"] = route.pref
    if route.metrics:
        spec["metrics"] = dict(route.metrics)
    if route.nexthops:
        spec["multipath"] = [
            {
                "oif": indexes[nh.ifname] if nh.ifname is not None else 0,
                "hops": nh.weight - 1,
                "flags": RTNH_F_ONLINK if nh.onlink else 0,
                **({"gateway": nh.gateway} if nh.gateway is not None else {}),
            }
            for nh in route.nexthops
        ]
    return spec


def delete_routes(ipr: Any, routes: Iterable[SavedRoute]) -> None:
    """Delete these routes; one already gone is fine."""
    indexes = {name: index for index, name in _link_names(ipr).items()}
    for route in routes:
        if not route.ifnames <= indexes.keys():
            continue  # its link is gone, and the route with it
        try:
            with kernel_errors(f"delete route {route.dst} via {route.gateway}"):
                ipr.route("del", **_route_spec(route, indexes))
        except KernelError as exc:
            if exc.errno not in (errno.ESRCH, errno.ENOENT):
                raise


def restore_routes(ipr: Any, routes: Iterable[SavedRoute]) -> list[SavedRoute]:
    """Add back each route whose links still exist; returns the ones skipped."""
    indexes = {name: index for index, name in _link_names(ipr).items()}
    skipped: list[SavedRoute] = []
    for route in routes:
        if not route.ifnames <= indexes.keys():
            skipped.append(route)
            continue
        try:
            with kernel_errors(f"restore route {route.dst} via {route.gateway}"):
                ipr.route("add", **_route_spec(route, indexes))
        except KernelError as exc:
            if exc.errno != errno.EEXIST:
                raise
    return skipped


def ensure_default_route_via(ipr: Any, *, gateway: ipaddress.IPv4Address, ifname: str) -> None:
    """Make ``default via <gateway> dev <ifname>`` the only default route (v4 and v6).

    Every other default route of the main table is deleted first: the
    kernel refuses a second IPv4 default of the same metric (EEXIST).
    """
    if ifname not in _link_names(ipr).values():
        # Deleted since it was set up (by someone else's cleanup): fail like the kernel
        # would, before touching the routes the namespace has.
        raise KernelError(
            f"add default route via {gateway} dev {ifname}: no such device", errno=errno.ENODEV
        )
    others = [
        route
        for route in read_default_routes(ipr)
        if not (route.family == 4 and route.gateway == str(gateway) and route.ifname == ifname)
    ]
    delete_routes(ipr, others)
    indexes = {name: index for index, name in _link_names(ipr).items()}
    if ifname not in indexes:  # gone just now: the namespace is left without a default
        raise KernelError(
            f"add default route via {gateway} dev {ifname}: no such device", errno=errno.ENODEV
        )
    ours = SavedRoute(family=4, dst="0.0.0.0/0", gateway=str(gateway), ifname=ifname)
    with kernel_errors(f"add default route via {gateway} dev {ifname}"):
        ipr.route("replace", **_route_spec(ours, indexes))
