"""The programs the benchmark measures against or with: servers, dante, redsocks.

* :class:`QuietDante` -- the integration tests' dante (SOCKS5, CONNECT only into
  198.18.0.0/15), logging errors only so per-session log writes do not weigh on
  the connection-rate numbers of the three proxied paths alike.
* :class:`Nginx` -- the remote host's HTTP server (nginx-light, one worker,
  ``return 200``), the far end of the connection-rate runs.
* :class:`Iperf3Server`, :class:`StreamServer` -- the far ends of the throughput
  runs (iperf3, and ``bench.loadgen serve`` for the SOCKS-capable client).
* :class:`Redsocks` -- one redsocks in the host netns, the peer of egressd's relay.
* :class:`RedsocksFleet` -- N idle redsocks in a netns of their own (loopback
  only), to weigh the process-per-container design.

All run as our children, with configs and logs in a scratch dir of their own.
"""

from __future__ import annotations

import ipaddress
import sys
import time
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Self

from tests.integration.peers import (
    TEST_NET,
    Dante,
    Netns,
    SystemUser,
    UpstreamWorld,
    scratch_dir,
)

from bench.procs import REPO, BenchProcess, pss_bytes, rss_bytes, wait_listening

REDSOCKS_PORT = 12345


class QuietDante(Dante):
    """dante as in the tests, but sessions are not logged (errors still are).

    ``more_ports``: further listeners on the same address, same rules.
    """

    def __init__(
        self,
        world: UpstreamWorld,
        *,
        user: SystemUser | None,
        port: int,
        more_ports: Iterable[int] = (),
    ) -> None:
        super().__init__(world, user=user, port=port)
        self.more_ports = sorted(set(more_ports) - {port})

    def __enter__(self) -> Self:
        super().__enter__()
        try:
            for port in self.more_ports:
                self.process.wait_listening(self.host, port)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def config(self, log_path: Path) -> str:
        text = super().config(log_path)
        main = f"internal: {self.host} port = {self.port}\n"
        extra = "".join(f"internal: {self.host} port = {p}\n" for p in self.more_ports)
        return (
            text.replace(main, main + extra)
            .replace("log: connect disconnect error", "log: error")
            .replace("log: connect error", "log: error")
        )


class _Server:
    role = "server"

    def __init__(self, ns: Netns, ip: str, port: int) -> None:
        self.ns, self.ip, self.port = ns, ip, port
        self._stack = ExitStack()

    def argv(self, workdir: Path) -> list[str]:
        raise NotImplementedError

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            self.dir = stack.enter_context(scratch_dir(f"bench-{self.role}"))
            argv = self.argv(self.dir)
            self.process = stack.enter_context(
                BenchProcess(argv, self.dir / "out.log", ns=self.ns, cwd=REPO)
            )
            wait_listening(self.ns, self.ip, self.port, proc=self.process)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


class Nginx(_Server):
    role = "nginx"

    def argv(self, workdir: Path) -> list[str]:
        temp = workdir / "tmp"
        temp.mkdir()
        conf = workdir / "nginx.conf"
        conf.write_text(f"""\
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    keepalive_requests 100000;
    server {{
        listen {self.ip}:{self.port} backlog=4096;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
""")
        return ["nginx", "-e", str(workdir / "error.log"), "-c", str(conf), "-g", "daemon off;"]


class Iperf3Server(_Server):
    role = "iperf3"

    def argv(self, workdir: Path) -> list[str]:
        return ["iperf3", "-s", "-B", self.ip, "-p", str(self.port)]


class StreamServer(_Server):
    role = "stream"

    def argv(self, workdir: Path) -> list[str]:
        # Bounded: the server exits by itself after --lifetime seconds.
        bind = f"{self.ip}:{self.port}"
        return [
            sys.executable,
            "-m",
            "bench.loadgen",
            "serve",
            "--bind",
            bind,
            "--lifetime",
            "7200",
        ]


def redsocks_config(*, listen: tuple[str, int], upstream: tuple[str, int], log: str) -> str:
    """A transparent redirector (SO_ORIGINAL_DST) to a SOCKS5 upstream, without auth.

    Defaults otherwise, as commonly deployed -- which includes ``splice``: redsocks
    turns it on by itself where the kernel has it (``is_splice_good()``), so it
    moves payload socket -> pipe -> socket just like egressd's relay;
    ``listenq`` raised to the relay's own backlog (1024) so neither side is
    limited by its accept queue.
    """
    if ipaddress.ip_address(upstream[0]) not in TEST_NET:
        raise ValueError(f"redsocks upstream {upstream[0]} outside {TEST_NET}")
    return f"""\
base {{
    log_debug = off;
    log_info = off;
    log = "{log}";
    daemon = off;
    redirector = iptables;
}}
redsocks {{
    local_ip = {listen[0]};
    local_port = {listen[1]};
    ip = {upstream[0]};
    port = {upstream[1]};
    type = socks5;
    listenq = 1024;
}}
"""


class Redsocks:
    """One redsocks in the host netns, listening on ``listen`` and dialling ``upstream``."""

    def __init__(self, *, listen: tuple[str, int], upstream: tuple[str, int]) -> None:
        self.listen, self.upstream = listen, upstream
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            self.dir = stack.enter_context(scratch_dir("bench-redsocks"))
            conf = self.dir / "redsocks.conf"
            log = self.dir / "redsocks.log"
            conf.write_text(
                redsocks_config(listen=self.listen, upstream=self.upstream, log=f"file:{log}")
            )
            self.process = stack.enter_context(
                BenchProcess(["redsocks", "-c", str(conf)], self.dir / "out.log")
            )
            wait_listening(None, *self.listen, proc=self.process)
            self.pid = self.process.pid
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


class RedsocksFleet:
    """``count`` idle redsocks processes, one per would-be container, in a private netns.

    They listen on 127.0.0.1 of a namespace that has nothing but ``lo``; they
    never carry a connection. Only their memory is of interest.
    """

    BASE_PORT = 20000

    def __init__(self, count: int, *, upstream: tuple[str, int]) -> None:
        self.count, self.upstream = count, upstream
        self._stack = ExitStack()
        self.processes: list[BenchProcess] = []

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            self.dir = stack.enter_context(scratch_dir("bench-rsfleet"))
            self.ns = stack.enter_context(Netns.unique("rsf"))
            for i in range(self.count):
                conf = self.dir / f"redsocks-{i}.conf"
                listen = ("127.0.0.1", self.BASE_PORT + i)
                conf.write_text(
                    redsocks_config(listen=listen, upstream=self.upstream, log="file:/dev/null")
                )
                proc = stack.enter_context(
                    BenchProcess(
                        ["redsocks", "-c", str(conf)], self.dir / f"out-{i}.log", ns=self.ns
                    )
                )
                self.processes.append(proc)
            last = ("127.0.0.1", self.BASE_PORT + self.count - 1)
            wait_listening(self.ns, *last, proc=self.processes[-1], timeout=30)
            time.sleep(0.5)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def memory(self) -> dict[str, int]:
        alive = [p for p in self.processes if p.alive()]
        return {
            "processes": len(alive),
            "rss_bytes": sum(rss_bytes(p.pid) for p in alive),
            "pss_bytes": sum(pss_bytes(p.pid) for p in alive),
        }
