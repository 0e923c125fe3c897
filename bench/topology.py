"""The benchmark's network: the tests' UpstreamWorld plus one "container" per path.

::

  path a "direct"    egt-ca-X ══ veth ══ remote host            (plain routing, no proxy)
  path b "dante"     host netns ── the client speaks SOCKS5 ── dante ── remote host
  path c "redsocks"  egt-cr-X ══ veth ══ host: nft DNAT ─▶ redsocks ── dante ── remote host
  path d "egressd"   egt-cd-X ══ egress0/bridge (egressd) ─▶ egressd relay ── dante ── remote host

The remote host (``egt-rh-X``) runs nginx (:80), an iperf3 server (:5201) and
the stream sink (:5202) on ``remote_ip`` in 198.18.N.0/24; dante (no auth, CONNECT
only into 198.18.0.0/15) runs in the proxy host as in the integration tests,
with one listener per path that uses it (``DANTE_PORTS``).
Neither the host nor any namespace gets a route towards the uplink, and no
NAT but the DNAT onto redsocks (in a table of our own) is ever added.

Path c's veth uses a free /30 of 198.18.64.0/18 (checked against the host's
routes). Its nft table (``ip egb_rs_<hex>``) DNATs the container's TCP to
redsocks on the host end of the veth, accepts only that in ``input`` and drops
every forward from or to the veth; it is deleted on exit.
"""

from __future__ import annotations

import ipaddress
import json
import random
import secrets
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Self

from tests.integration.peers import (
    HOST_LINK_POOL,
    Netns,
    UpstreamWorld,
    run,
    veth_between,
)

from bench.peers import (
    REDSOCKS_PORT,
    Iperf3Server,
    Nginx,
    QuietDante,
    Redsocks,
    StreamServer,
)

NGINX_PORT, IPERF3_PORT, STREAM_PORT = 80, 5201, 5202
DANTE_PORT = 1080
# One dante listener per path that goes through it (b, c, d), so that the TIME_WAIT
# sockets one path leaves towards dante (~20-35% of its connections, ~60 s each) do
# not take the source ports of the next path measured: every connect from the host
# netns to one ip:port draws on the same ~28k ports.
DANTE_PORTS = {"dante": 1080, "redsocks": 1081, "egressd": 1082}


@dataclass(frozen=True)
class BenchPath:
    """Where a client runs and how it reaches the remote host on one path."""

    name: str
    ns: Netns | None  # None: the host netns
    socks: tuple[str, int] | None  # the client speaks SOCKS5 to this (path b)
    relay_pid: int | None = None  # the relay process whose CPU we account (c, d)
    transparent: bool = True  # iperf3/wrk can run on it (no SOCKS in the client)


def host_networks() -> list[ipaddress.IPv4Network]:
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]")
    return [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in routes
        if r.get("dst", "default") != "default"
    ]


def free_subnet(pool: ipaddress.IPv4Network, prefix: int) -> ipaddress.IPv4Network:
    """A random subnet of ``pool`` with ``prefix`` that no host route overlaps."""
    taken = host_networks()
    candidates = list(pool.subnets(new_prefix=prefix))
    random.shuffle(candidates)
    for net in candidates[:4096]:
        if not any(net.overlaps(other) for other in taken):
            return net
    raise RuntimeError(f"no free /{prefix} in {pool}")


class UpstreamSide:
    """UpstreamWorld + dante + the remote host's servers: what every case needs."""

    def __init__(self, *, servers: bool) -> None:
        self.servers = servers
        self.world = UpstreamWorld()
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            w = stack.enter_context(self.world)
            self.dante = stack.enter_context(
                QuietDante(w, user=None, port=DANTE_PORT, more_ports=DANTE_PORTS.values())
            )
            if self.servers:
                stack.enter_context(Nginx(w.remote_ns, w.remote_ip, NGINX_PORT))
                stack.enter_context(Iperf3Server(w.remote_ns, w.remote_ip, IPERF3_PORT))
                stack.enter_context(StreamServer(w.remote_ns, w.remote_ip, STREAM_PORT))
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    @property
    def remote_ip(self) -> str:
        return self.world.remote_ip

    @property
    def dante_endpoint(self) -> tuple[str, int]:
        return self.world.proxy_ip, DANTE_PORT

    def dante_for(self, path: str) -> tuple[str, int]:
        """The dante listener of data path ``path`` (dante, redsocks, egressd)."""
        return self.world.proxy_ip, DANTE_PORTS[path]


def tune_client_netns(ns: Netns) -> None:
    """Let a client namespace open connections back to back without running out of ports.

    Connection-rate runs leave thousands of TIME_WAIT sockets in the
    client's namespace; without reuse, one run after another was capped at
    ~400-1,200 conn/s whichever relay was measured. Only in namespaces the
    benchmark created.
    """
    ns.run(["sysctl", "-q", "-w", "net.ipv4.tcp_tw_reuse=1"])
    ns.run(["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000"])


class DirectContainer:
    """Path a: a netns with a veth straight into the remote host, default route via it."""

    def __init__(self, side: UpstreamSide) -> None:
        self.side = side
        self.ns = Netns.unique("ca")
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            stack.enter_context(self.ns)
            tune_client_netns(self.ns)
            # Only the remote netns sees this /30, so any free octet there will do.
            octet = random.randrange(0, 256)
            gw, me = f"198.19.{octet}.1", f"198.19.{octet}.2"
            stack.enter_context(
                veth_between(self.ns, self.side.world.remote_ns, f"{me}/30", f"{gw}/30")
            )
            run(["ip", "-n", self.ns.name, "route", "add", "default", "via", gw])
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def path(self) -> BenchPath:
        return BenchPath("direct", self.ns, None)


class RedsocksContainer:
    """Path c: a netns routed to the host, its TCP DNATed onto one redsocks -> dante."""

    def __init__(self, side: UpstreamSide) -> None:
        self.side = side
        self.ns = Netns.unique("cr")
        self.table = f"egb_rs_{secrets.token_hex(3)}"
        self._stack = ExitStack()

    def _ruleset(self, host_if: str, host_ip: str) -> str:
        t = f"ip {self.table}"
        return f"""\
add table {t}
add chain {t} rs_pre {{ type nat hook prerouting priority dstnat; policy accept; }}
add chain {t} rs_in {{ type filter hook input priority filter; policy accept; }}
add chain {t} rs_fwd {{ type filter hook forward priority filter; policy accept; }}
add rule {t} rs_pre iifname "{host_if}" meta l4proto tcp dnat to {host_ip}:{REDSOCKS_PORT}
add rule {t} rs_in iifname "{host_if}" ip daddr {host_ip} tcp dport {REDSOCKS_PORT} accept
add rule {t} rs_in iifname "{host_if}" drop
add rule {t} rs_fwd iifname "{host_if}" drop
add rule {t} rs_fwd oifname "{host_if}" drop
"""

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            stack.enter_context(self.ns)
            tune_client_netns(self.ns)
            link = free_subnet(HOST_LINK_POOL, 30)
            host_ip, container_ip = (str(a) for a in link.hosts())
            veth = stack.enter_context(
                veth_between(None, self.ns, f"{host_ip}/30", f"{container_ip}/30")
            )
            run(["ip", "-n", self.ns.name, "route", "add", "default", "via", host_ip])
            run(["nft", "-f", "-"], stdin=self._ruleset(veth.name_a, host_ip))
            stack.callback(run, ["nft", "delete", "table", "ip", self.table], check=False)
            self.redsocks = stack.enter_context(
                Redsocks(listen=(host_ip, REDSOCKS_PORT), upstream=self.side.dante_for("redsocks"))
            )
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def path(self) -> BenchPath:
        return BenchPath("redsocks", self.ns, None, relay_pid=self.redsocks.pid)
