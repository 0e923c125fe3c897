"""Several egressd "hosts" on one machine, for multi-host tests on PostgreSQL.

``HostWorld`` is ``UpstreamWorld`` with the host side moved into a network
namespace of its own, so each agent gets its own bridges, nft tables and
upstream path::

    host netns (egt-hs-X)      proxy host (egt-px-X)        remote host (egt-rh-X)
    egth-X ─────────────────── egtp-X                       (no route back)
    198.18.A.B+1/30            198.18.A.B+2/30 "proxy_ip"
                               egtx-X ───────────────────── egtr-X
                               198.18.N.1/24               198.18.N.2/24 "remote_ip"

Nothing of it is in the machine's own namespace, so no host route is
needed: the host netns has only its connected /30 and no default route.
``Dante``, ``RemoteHttpServer`` and ``DirectContainer`` accept it as they
accept an ``UpstreamWorld``.

``EgressdProcess`` runs ``egressd api`` or ``egressd agent`` (optionally in
a netns via ``ip netns exec``, which execs: the PID is egressd's) with its
settings in the environment, never on the command line, so the database
password does not show in ``ps``. Stopped by PID.
"""

from __future__ import annotations

import ipaddress
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any, Self

from egressd.client import Client
from tests.integration.peers import (
    HOST_LINK_POOL,
    REMOTE_THIRD_OCTETS,
    Netns,
    UpstreamWorld,
    veth_between,
)

EGRESSD = str(Path(sys.executable).parent / "egressd")


class HostWorld(UpstreamWorld):
    """A host netns with its own proxy host and remote host; see the module docstring."""

    def __init__(self) -> None:
        super().__init__()
        self.host_ns = Netns.unique("hs", self.suffix)

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            for ns in (self.host_ns, self.proxy_ns, self.remote_ns):
                stack.enter_context(ns)
            self.host_link_net = random.choice(list(HOST_LINK_POOL.subnets(new_prefix=30)))
            octet = random.choice(REMOTE_THIRD_OCTETS)
            host_ip, proxy_ip = (str(ip) for ip in self.host_link_net.hosts())
            self.host_ip, self.proxy_ip = host_ip, proxy_ip
            self.remote_net = ipaddress.ip_network(f"198.18.{octet}.0/24")
            self.proxy_egress_ip, self.remote_ip = f"198.18.{octet}.1", f"198.18.{octet}.2"
            stack.enter_context(
                veth_between(
                    self.host_ns,
                    self.proxy_ns,
                    f"{host_ip}/30",
                    f"{proxy_ip}/30",
                    names=(self.host_if, self.proxy_if),
                )
            )
            stack.enter_context(
                veth_between(
                    self.proxy_ns,
                    self.remote_ns,
                    f"{self.proxy_egress_ip}/24",
                    f"{self.remote_ip}/24",
                    names=(self.proxy_egress_if, self.remote_if),
                )
            )
            self._stack = stack.pop_all()
        return self


class EgressdProcess:
    """``egressd <argv>`` as our child (in ``ns`` when given); log in ``log_path``."""

    def __init__(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        log_path: Path,
        ns: Netns | None = None,
    ) -> None:
        self.argv, self.ns, self.log_path = argv, ns, log_path
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("EGRESSD_") and not k.lower().endswith("_proxy")
        } | env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Self:
        command = [EGRESSD, *self.argv]
        if self.ns is not None:
            command = self.ns.argv(command)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: int) -> None:
        if self.alive():
            with suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout=timeout)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 20 s. The exit code, or None if never started."""
        if self.proc is None:
            return None
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(timeout=10)


def wait_for(
    what: str, check: Callable[[], Any], *, timeout: float, on_fail: Callable[[], str] = str
) -> Any:
    """Poll ``check()`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{on_fail()}")
        time.sleep(0.05)


def api_ready(api: EgressdProcess, *, port: int, data_dir: Path, timeout: float = 30) -> str:
    """Wait until the API answers; returns the admin token it wrote."""
    token_file = data_dir / "admin-token"

    def up() -> str | None:
        if not api.alive():
            raise RuntimeError(f"egressd api exited:\n{api.log()}")
        if not (token_file.exists() and token_file.read_text().strip()):
            return None
        try:
            with socket.create_connection(("127.0.0.1", port), 0.2):
                return token_file.read_text().strip()
        except OSError:
            return None

    token: str = wait_for("egressd api up", up, timeout=timeout, on_fail=api.log)
    return token


def nodes_by_name(client: Client) -> dict[str, dict[str, Any]]:
    return {n["name"]: n for n in client.request("GET", "/api/v1/nodes")}
