"""``egressd serve`` as a real process for end-to-end tests, and a test "container".

The server runs in the host netns with its own nft table name, its own
subnet pool slice and its own data dir, so it never collides with a daemon
an operator runs on the same machine. On exit it removes every network
configuration through the API (the agent undoes the kernel state), stops
the server by PID, and removes the host table it created.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any, Self

from egressd.client import ApiError, Client
from tests.integration.peers import Netns, UpstreamWorld, run, veth_between

EGRESSD = str(Path(sys.executable).parent / "egressd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_pool() -> str:
    """A /24 of the egressd range that no address or route on the host uses yet.

    Other egressd instances (an operator's daemon on 10.20.0.0/16's low end,
    a benchmark, a concurrent test) must not collide with this one.
    """
    used = json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]")
    taken = [
        ipaddress.ip_network(r["dst"], strict=False)
        for r in used
        if r.get("dst", "default") != "default"
    ]
    for octet in random.sample(range(128, 256), 128):
        pool = ipaddress.ip_network(f"10.20.{octet}.0/24")
        if not any(pool.overlaps(net) for net in taken):
            return str(pool)
    raise RuntimeError("no free /24 left in 10.20.128.0/17")


class EgressdServer:
    def __init__(
        self,
        *,
        apply_timeout: float = 15.0,
        resync_interval: float = 30.0,
        probe_interval: float = 10.0,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.table = f"egressd_t{secrets.token_hex(3)}"
        self.pool = free_pool()
        self.data_dir = Path(tempfile.mkdtemp(prefix="egt-egressd-"))
        self.env = {
            **os.environ,
            "EGRESSD_NFT_TABLE": self.table,
            "EGRESSD_POOL": self.pool,
            "EGRESSD_APPLY_TIMEOUT": str(apply_timeout),
            "EGRESSD_RESYNC_INTERVAL": str(resync_interval),
            "EGRESSD_PROBE_INTERVAL": str(probe_interval),
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""

    def start(self) -> None:
        log = (self.data_dir / "server.log").open("ab")
        self.proc = subprocess.Popen(
            [EGRESSD, "serve", "--port", str(self.port), "--data-dir", str(self.data_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        log.close()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"egressd exited {self.proc.returncode}:\n{self.log()}")
            token_file = self.data_dir / "admin-token"
            if token_file.exists() and token_file.read_text().strip():
                with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                    self.token = token_file.read_text().strip()
                    return
            time.sleep(0.05)
        raise TimeoutError(f"egressd did not come up:\n{self.log()}")

    def _remove_links_left(self) -> None:
        """Bridges and veths of our containers that a failed test left (by name)."""
        for cid in _known_container_ids(self.data_dir / "egressd.db"):
            for name in (f"br-{cid[:12]}", f"ve-{cid[:12]}"):
                run(["ip", "link", "delete", name], check=False)

    def log(self) -> str:
        path = self.data_dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, token: str | None = None) -> Client:
        return Client(self.url, token=token or self.token, timeout=60)

    def kill(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self.proc is not None and self.proc.poll() is None:
                with self.client() as c:
                    for container in c.containers.list():
                        with suppress(ApiError):
                            c.containers.remove_network_config(id=container["id"])
        finally:
            self.kill()
            run(["nft", "delete", "table", "inet", self.table], check=False)
            self._remove_links_left()
            if not os.environ.get("EGT_KEEP"):
                for f in self.data_dir.iterdir():
                    f.unlink()
                self.data_dir.rmdir()


def _known_container_ids(db: Path) -> list[str]:
    if not db.exists():
        return []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute("select id from containers")]


def link_state(ns: Netns) -> dict[str, Any]:
    """What a container's network looks like: links, addresses, routes (v4 and v6)."""

    def j(*args: str) -> Any:
        return json.loads(run(["ip", "-n", ns.name, "-j", *args]).stdout or "[]")

    def strip(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        volatile = {"stats", "stats64", "valid_life_time", "preferred_life_time", "ifindex"}
        return [{k: v for k, v in item.items() if k not in volatile} for item in items]

    return {
        "links": sorted(link["ifname"] for link in j("link", "show")),
        "addrs": strip(j("addr", "show")),
        "routes4": j("-4", "route", "show", "table", "all"),
        "routes6": j("-6", "route", "show", "table", "all"),
    }


def enforce(
    server: EgressdServer, container: DirectContainer, data: dict[str, Any]
) -> tuple[str, dict[str, Any]]:
    """Register ``container``, PATCH ``data``, start; returns (id, start answer)."""
    with server.client() as c:
        cid = str(c.containers.create(ref=container.ns.name)["id"])
        c.containers.update_network_config(id=cid, data=data)
        return cid, c.containers.start_network(id=cid)


def wait_status(server: EgressdServer, cid: str, want: str, timeout: float = 20) -> dict[str, Any]:
    """Poll GET until ``status`` is ``want`` (AssertionError after ``timeout``)."""
    deadline = time.monotonic() + timeout
    with server.client() as c:
        while True:
            got = c.containers.get_network_config(id=cid)
            if got["status"] == want:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"status {got['status']!r}, wanted {want!r}: {got}")
            time.sleep(0.2)


class DirectContainer:
    """A container netns whose own network reaches the remote host directly.

    ``eth0`` is a veth straight into the remote-host netns (198.19.N.10/24 and
    2001:db8:N::10/64, default routes via .1 / ::1), as a container's normal
    network would be. So anything egressd fails to catch *would* arrive at
    the remote host directly, and the tests can see it.
    """

    def __init__(self, world: UpstreamWorld) -> None:
        self.world = world
        self.ns = Netns.unique("c")
        octet = random.randrange(0, 256)
        self.net = ipaddress.ip_network(f"198.19.{octet}.0/24")
        self.ip, self.gw = f"198.19.{octet}.10", f"198.19.{octet}.1"
        self.ip6, self.gw6 = f"2001:db8:{octet:x}::10", f"2001:db8:{octet:x}::1"
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            stack.enter_context(self.ns)
            veth = stack.enter_context(
                veth_between(
                    self.ns,
                    self.world.remote_ns,
                    f"{self.ip}/24",
                    f"{self.gw}/24",
                )
            )
            self.ifname = veth.name_a
            rns = self.world.remote_ns.name
            run(["ip", "-n", self.ns.name, "link", "set", veth.name_a, "name", "eth0"])
            run(["ip", "-n", self.ns.name, "link", "set", "eth0", "up"])
            run(["ip", "-n", self.ns.name, "addr", "add", f"{self.ip6}/64", "dev", "eth0", "nodad"])
            run(["ip", "-n", rns, "addr", "add", f"{self.gw6}/64", "dev", veth.name_b, "nodad"])
            run(["ip", "-n", self.ns.name, "route", "add", "default", "via", self.gw])
            run(["ip", "-n", self.ns.name, "-6", "route", "add", "default", "via", self.gw6])
            self._settle()
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def _settle(self) -> None:
        """Wait for IPv6 duplicate address detection, so link state stops changing."""
        deadline = time.monotonic() + 10
        while run(["ip", "-n", self.ns.name, "-6", "addr", "show", "tentative"]).stdout.strip():
            if time.monotonic() > deadline:
                raise TimeoutError("IPv6 addresses still tentative")
            time.sleep(0.05)

    def sh(self, argv: list[str], timeout: float = 20) -> subprocess.CompletedProcess[str]:
        return self.ns.run(argv, check=False, timeout=timeout)

    def curl(self, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.sh(["curl", "-sS", "--max-time", "5", "--noproxy", "*", *extra, url])


@contextmanager
def udp_sink(ns: Netns, ip: str, port: int, log: Path) -> Iterator[Path]:
    """A UDP listener in ``ns`` that writes one line per datagram received."""
    family = "socket.AF_INET6" if ":" in ip else "socket.AF_INET"
    code = (
        "import socket,sys\n"
        f"s=socket.socket({family}, socket.SOCK_DGRAM)\n"
        f"s.bind(({ip!r},{port}))\n"
        f"f=open({str(log)!r},'a',buffering=1)\n"
        "f.write('ready\\n')\n"
        "while True:\n"
        "    d,a=s.recvfrom(2048); f.write(a[0]+' '+d.decode(errors='replace')+'\\n')\n"
    )
    proc = subprocess.Popen(
        ["ip", "netns", "exec", ns.name, sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while not (log.exists() and "ready" in log.read_text()):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("udp sink did not start")
            time.sleep(0.05)
        yield log
    finally:
        proc.kill()
        proc.wait(timeout=5)


def send_udp(container: DirectContainer, ip: str, port: int, payload: str) -> str:
    family = "socket.AF_INET6" if ":" in ip else "socket.AF_INET"
    code = (
        "import socket\n"
        f"s=socket.socket({family}, socket.SOCK_DGRAM)\n"
        "try:\n"
        f"    s.sendto({payload.encode()!r}, ({ip!r}, {port})); print('sent')\n"
        "except OSError as e:\n"
        "    print('error', e.errno)\n"
    )
    return container.sh([sys.executable, "-c", code]).stdout.strip()
