"""``egressd serve`` as the benchmark runs it: a real process, its own table and pool.

Like the integration tests' server, but sized for the scale case: the pool is
a free slice of 10.20.0.0/16 large enough for the containers asked for
(checked against the host's routes), the nft table name is unique
(``EGRESSD_NFT_TABLE=egb_<hex>``), and the data dir is a temp dir. It can be
stopped and started again on the same data dir (the re-adopt measurement).

Cleanup, on exit whatever happened: a few containers are deleted through the
API (the agent's own teardown); then the process is stopped by PID, the host
table deleted, and the bridge and host veth of every container registered
through :meth:`register` deleted by exact name (for the scale case this is
the fast path: 1000 API DELETEs would be a benchmark of their own). The
containers' namespaces belong to whoever created them and go with them.
"""

from __future__ import annotations

import ipaddress
import math
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any, Self

from tests.integration.peers import Netns, run

from bench.procs import CLEAN_ENV, cpu_seconds, pss_bytes, rss_bytes, thread_count
from bench.topology import BenchPath, UpstreamSide, free_subnet, tune_client_netns
from egressd.client import ApiError, Client
from egressd.model import bridge_name_for, host_veth_name_for

EGRESSD = str(Path(sys.executable).parent / "egressd")
POOL = ipaddress.ip_network("10.20.0.0/16")
API_TEARDOWN_MAX = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pool_prefix(containers: int, subnet_prefix: int = 29) -> int:
    """The smallest pool prefix (at most /24) holding ``containers`` subnets."""
    addresses = max(containers, 1) * 2 ** (32 - subnet_prefix)
    return min(24, 32 - math.ceil(math.log2(addresses)))


class BenchEgressd:
    def __init__(
        self, *, containers: int, log_level: str = "info", extra_env: dict[str, str] | None = None
    ) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.table = f"egb_{secrets.token_hex(3)}"
        self.pool = free_subnet(POOL, pool_prefix(containers))
        self.data_dir = Path(tempfile.mkdtemp(prefix="egt-bench-egressd-"))
        self.log_level = log_level
        self.env = {
            **CLEAN_ENV,
            "EGRESSD_NFT_TABLE": self.table,
            "EGRESSD_POOL": str(self.pool),
            **(extra_env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.token = ""
        self.container_ids: list[str] = []
        self.started_at = 0.0

    # -- process ---------------------------------------------------------------------

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, *, timeout: float = 60.0) -> float:
        """Start and wait until the API answers; returns the seconds that took."""
        t0 = time.monotonic()
        self.started_at = time.time()
        with (self.data_dir / "server.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(EGRESSD, "serve", "--port", str(self.port)),
                    *("--data-dir", str(self.data_dir), "--log-level", self.log_level),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        token_file = self.data_dir / "admin-token"
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"egressd exited {self.proc.returncode}:\n{self.log()[-3000:]}")
            if token_file.exists() and token_file.read_text().strip():
                with suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                    self.token = token_file.read_text().strip()
                    return time.monotonic() - t0
            time.sleep(0.02)
        raise TimeoutError(f"egressd did not come up:\n{self.log()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, *, timeout: float = 60.0) -> float:
        """Signal the process and wait for it to exit (SIGKILL after ``timeout``)."""
        t0 = time.monotonic()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        return time.monotonic() - t0

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        path = self.data_dir / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def client(self, *, timeout: float = 60.0) -> Client:
        return Client(self.url, token=self.token, timeout=timeout)

    def stats(self) -> dict[str, Any]:
        return {
            "rss_bytes": rss_bytes(self.pid),
            "pss_bytes": pss_bytes(self.pid),
            "threads": thread_count(self.pid),
            "cpu_s": cpu_seconds(self.pid),
        }

    # -- containers ------------------------------------------------------------------

    def register(self, client: Client, *, container_id: str, netns: str) -> None:
        self.container_ids.append(container_id)  # before: the call may fail half-way
        client.containers.create(id=container_id, ref=netns, runtime="netns")

    def listener_count(self, port: int = 1080) -> int:
        """Relay TCP listeners (in our pool, on ``port``) the kernel has right now."""
        out = run(["ss", "-Hltn", f"sport = :{port}"]).stdout
        count = 0
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 4:
                ip = parts[3].rpartition(":")[0]
                with suppress(ValueError):
                    count += ipaddress.ip_address(ip) in self.pool
        return count

    # -- cleanup ---------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        try:
            if self.alive() and len(self.container_ids) <= API_TEARDOWN_MAX:
                with self.client(timeout=20) as c:
                    for cid in self.container_ids:
                        with suppress(ApiError, OSError):
                            c.containers.remove_network_config(id=cid)
        except Exception as exc:  # cleanup goes on whatever the API did
            print(f"bench: egressd API teardown failed: {exc}", file=sys.stderr)
        finally:
            # A busy agent may take its time to stop; nothing here needs it graceful.
            self.stop(signal.SIGTERM, timeout=10)
            run(["nft", "delete", "table", "inet", self.table], check=False)
            self._delete_links()
            if os.environ.get("EGT_KEEP"):
                print(f"bench: kept {self.data_dir}", file=sys.stderr)
            else:
                shutil.rmtree(self.data_dir, ignore_errors=True)

    def _delete_links(self) -> None:
        present = link_names()
        names = [
            name
            for cid in self.container_ids
            for name in (host_veth_name_for(cid), bridge_name_for(cid))
            if name in present
        ]
        if names:
            script = "".join(f"link del {name}\n" for name in names)
            run(["ip", "-force", "-batch", "-"], check=False, stdin=script, timeout=300)


def link_names() -> set[str]:
    """Names of the host netns's links (``ip -o link`` gives ``N: name@peer: ...``)."""
    lines = run(["ip", "-o", "link", "show"]).stdout.splitlines()
    return {line.split(": ", 2)[1].split("@")[0] for line in lines if ": " in line}


def new_container_id() -> str:
    return secrets.token_hex(12)


def network_config(side: UpstreamSide, *, path: str | None = None) -> dict[str, Any]:
    """socks5 to the benchmark's dante (``path``'s listener if given); DNS (never used
    here) also only inside 198.18/15."""
    host, port = side.dante_for(path) if path else side.dante_endpoint
    return {"type": "socks5", "proxy": f"socks5://{host}:{port}", "dns_servers": [side.remote_ip]}


class EgressdContainer:
    """Path d: a bare netns enforced by an ``egressd serve`` of our own, via the API."""

    def __init__(self, side: UpstreamSide) -> None:
        self.side = side
        self.ns = Netns.unique("cd")
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            stack.enter_context(self.ns)
            tune_client_netns(self.ns)
            self.server = stack.enter_context(BenchEgressd(containers=1))
            cid = new_container_id()
            with self.server.client() as c:
                self.server.register(c, container_id=cid, netns=self.ns.name)
                c.containers.update_network_config(
                    id=cid, data=network_config(self.side, path="egressd")
                )
                started = c.containers.start_network(id=cid)
            if started["status"] != "running":
                raise RuntimeError(f"egressd did not start the container: {started}")
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def path(self) -> BenchPath:
        return BenchPath("egressd", self.ns, None, relay_pid=self.server.pid)
