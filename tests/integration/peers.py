"""Real peers for integration tests: namespaces, veth links, a remote host, upstream proxies.

Plain context managers, no pytest here (``conftest.py`` wraps them in fixtures).
Each one creates uniquely named things (netns ``egt-<role>-<6 hex>``, links
``egt?-<6 hex>``, users ``egt<6 hex>``, temp dirs ``egt-*``) and removes exactly
those on exit, exception or not; processes are started as our children and
stopped by PID, together with the children they forked.

``UpstreamWorld`` builds::

    host netns              proxy host (egt-px-XXXXXX)          remote host (egt-rh-XXXXXX)
    egth-XXXXXX ───────────  egtp-XXXXXX                         (no route back to the host)
    198.18.A.B+1/30          198.18.A.B+2/30  "proxy_ip"
                             egtx-XXXXXX ─────────────────────── egtr-XXXXXX
                             198.18.N.1/24  "proxy_egress_ip"    198.18.N.2/24  "remote_ip"

with the /30 picked at random in 198.18.64.0/18 and N at random in 128..255, both
checked against the host's routes. The host only gets the connected /30 plus an
``unreachable`` route for 198.18.N.0/24, so that a direct attempt from the host
fails at once instead of following the default route to the uplink. Neither
namespace has a default route and ``ip_forward`` is 0 in both: the remote host
can be reached only by a proxy running in the proxy host. The proxies are
configured to CONNECT only into 198.18.0.0/15 as a second wall.

Set ``EGT_KEEP=1`` to keep the temp dirs (configs, logs) for debugging.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Self
from urllib.parse import urlsplit

TEST_NET = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range
HOST_LINK_POOL = ipaddress.ip_network("198.18.64.0/18")
REMOTE_THIRD_OCTETS = range(128, 256)  # 198.18.128.0/24 .. 198.18.255.0/24
REMOTE_BODY = b"egressd remote host says hello\n"
# A target our proxies must refuse (outside 198.18.0.0/15). Only ever named in a request
# *to one of our proxies*; no namespace of ours has a route to it, so nothing is sent to it.
REFUSED_TARGET = "203.0.113.1"  # RFC 5737 TEST-NET-3

# Never let a proxy from the environment see our test traffic.
_CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if not k.lower().endswith("_proxy") and k.lower() not in {"no_proxy", "curl_ca_bundle"}
}


class CommandError(RuntimeError):
    def __init__(self, argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> None:
        super().__init__(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}"
        )
        self.result = result


def run(
    argv: Sequence[str], *, check: bool = True, stdin: str | None = None, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=_CLEAN_ENV,
    )
    if check and result.returncode != 0:
        raise CommandError(argv, result)
    return result


def new_suffix() -> str:
    return secrets.token_hex(3)


def _in_test_net(*addresses: str) -> None:
    for address in addresses:
        if ipaddress.ip_interface(address).ip not in TEST_NET:
            raise ValueError(f"{address} is outside {TEST_NET}: tests stay inside it")


def wait_for_text(read: Callable[[], str], needle: str, *, timeout: float = 5.0) -> str:
    """Poll ``read()`` until it contains ``needle``; returns the text. Peers log asynchronously."""
    deadline = time.monotonic() + timeout
    while needle not in (text := read()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{needle!r} not seen within {timeout}s in:\n{text[-3000:]}")
        time.sleep(0.05)
    return text


class LoggingPeer:
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, needle: str, *, timeout: float = 5.0) -> str:
        """The log once it contains ``needle`` (AssertionError after ``timeout``)."""
        return wait_for_text(self.log_text, needle, timeout=timeout)


@contextmanager
def scratch_dir(role: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=f"egt-{role}-"))
    try:
        yield path
    finally:
        if not os.environ.get("EGT_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- namespaces, links


class Netns:
    """A named network namespace with ``lo`` up and forwarding off, deleted on exit."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._created = False

    @classmethod
    def unique(cls, role: str, suffix: str | None = None) -> Netns:
        return cls(f"egt-{role}-{suffix or new_suffix()}")

    def __enter__(self) -> Self:
        run(["ip", "netns", "add", self.name])
        self._created = True
        try:
            run(["ip", "-n", self.name, "link", "set", "lo", "up"])
            self.run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=0"])
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._created:
            run(["ip", "netns", "delete", self.name])
            self._created = False

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return run(self.argv(argv), **kwargs)

    def popen(self, argv: Sequence[str], *, output: IO[bytes]) -> subprocess.Popen[bytes]:
        # `ip netns exec` execs the program after setns(): the PID is the program's.
        return subprocess.Popen(
            self.argv(argv),
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=_CLEAN_ENV,
            start_new_session=True,
        )

    def __repr__(self) -> str:
        return f"Netns({self.name!r})"


def _ip(ns: Netns | None) -> list[str]:
    return ["ip"] if ns is None else ["ip", "-n", ns.name]


@dataclass(frozen=True)
class Veth:
    name_a: str
    name_b: str
    ns_a: Netns | None  # None: the host netns
    ns_b: Netns | None
    addr_a: str  # CIDR, e.g. 198.18.64.1/30
    addr_b: str

    @property
    def ip_a(self) -> str:
        return str(ipaddress.ip_interface(self.addr_a).ip)

    @property
    def ip_b(self) -> str:
        return str(ipaddress.ip_interface(self.addr_b).ip)


@contextmanager
def veth_between(
    ns_a: Netns | None,
    ns_b: Netns | None,
    addr_a: str,
    addr_b: str,
    *,
    names: tuple[str, str] | None = None,
) -> Iterator[Veth]:
    """A veth pair with one end in each namespace (``None`` = host), addressed and up."""
    _in_test_net(addr_a, addr_b)
    suffix = new_suffix()
    name_a, name_b = names or (f"egta-{suffix}", f"egtb-{suffix}")
    argv = ["ip", "link", "add", name_a]
    if ns_a is not None:
        argv += ["netns", ns_a.name]
    argv += ["type", "veth", "peer", "name", name_b]
    if ns_b is not None:
        argv += ["netns", ns_b.name]
    run(argv)
    try:
        for ns, name, addr in ((ns_a, name_a, addr_a), (ns_b, name_b, addr_b)):
            run([*_ip(ns), "addr", "add", addr, "dev", name])
            run([*_ip(ns), "link", "set", name, "up"])
        yield Veth(name_a, name_b, ns_a, ns_b, addr_a, addr_b)
    finally:
        # Deleting one end deletes the pair; it is already gone if its netns was deleted.
        result = run([*_ip(ns_a), "link", "del", name_a], check=False)
        if result.returncode != 0 and _link_exists(ns_a, name_a):
            raise CommandError(["ip", "link", "del", name_a], result)


def _link_exists(ns: Netns | None, name: str) -> bool:
    if ns is not None and ns.name not in netns_names():
        return False
    return run([*_ip(ns), "link", "show", name], check=False).returncode == 0


def netns_names() -> set[str]:
    return {line.split()[0] for line in run(["ip", "netns", "list"]).stdout.splitlines() if line}


# --------------------------------------------------------------------------- topology


def _host_networks() -> list[ipaddress.IPv4Network]:
    routes = json.loads(run(["ip", "-j", "-4", "route", "show", "table", "all"]).stdout or "[]")
    networks = []
    for route in routes:
        dst = route.get("dst", "default")
        if dst != "default":
            networks.append(ipaddress.ip_network(dst, strict=False))
    return networks


def _free_subnets(candidates: Iterator[ipaddress.IPv4Network]) -> Iterator[ipaddress.IPv4Network]:
    taken = _host_networks()
    for net in candidates:
        if not any(net.overlaps(other) for other in taken):
            yield net


@contextmanager
def _host_unreachable(
    candidates: Iterator[ipaddress.IPv4Network],
) -> Iterator[ipaddress.IPv4Network]:
    """Claim a free subnet with an ``unreachable`` host route (EEXIST: taken meanwhile)."""
    for net in _free_subnets(candidates):
        if run(["ip", "route", "add", "unreachable", str(net)], check=False).returncode == 0:
            break
    else:
        raise RuntimeError("no free remote subnet in 198.18.0.0/15")
    try:
        yield net
    finally:
        run(["ip", "route", "del", "unreachable", str(net)])


def _random_host_links() -> Iterator[ipaddress.IPv4Network]:
    subnets = list(HOST_LINK_POOL.subnets(new_prefix=30))
    yield from random.sample(subnets, 64)


def _random_remote_nets() -> Iterator[ipaddress.IPv4Network]:
    for octet in random.sample(REMOTE_THIRD_OCTETS, len(REMOTE_THIRD_OCTETS)):
        yield ipaddress.ip_network(f"198.18.{octet}.0/24")


class UpstreamWorld:
    """Host ── proxy host netns ── remote host netns; see the module docstring."""

    def __init__(self) -> None:
        self.suffix = new_suffix()
        self.proxy_ns = Netns.unique("px", self.suffix)
        self.remote_ns = Netns.unique("rh", self.suffix)
        self.host_if = f"egth-{self.suffix}"
        self.proxy_if = f"egtp-{self.suffix}"
        self.proxy_egress_if = f"egtx-{self.suffix}"
        self.remote_if = f"egtr-{self.suffix}"
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            stack.enter_context(self.proxy_ns)
            stack.enter_context(self.remote_ns)
            self.remote_net = stack.enter_context(_host_unreachable(_random_remote_nets()))
            self.host_link_net = next(_free_subnets(_random_host_links()))
            host_ip, proxy_ip = list(self.host_link_net.hosts())
            proxy_egress_ip, remote_ip = list(self.remote_net.hosts())[:2]
            self.host_ip, self.proxy_ip = str(host_ip), str(proxy_ip)
            self.proxy_egress_ip, self.remote_ip = str(proxy_egress_ip), str(remote_ip)
            stack.enter_context(
                veth_between(
                    None,
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
                    f"{proxy_egress_ip}/24",
                    f"{remote_ip}/24",
                    names=(self.proxy_egress_if, self.remote_if),
                )
            )
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __repr__(self) -> str:
        return (
            f"UpstreamWorld(host {self.host_ip} -- {self.proxy_ip} {self.proxy_ns.name} "
            f"{self.proxy_egress_ip} -- {self.remote_ip} {self.remote_ns.name})"
        )


# --------------------------------------------------------------------------- processes


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, start time) for every live process; the start time guards PID reuse."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":  # a zombie has exited; its reaper may be slow
            table[int(entry.name)] = (int(fields[1]), fields[19])
    return table


def _descendants(pid: int) -> dict[int, str]:
    table = _proc_table()
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, (ppid, start) in table.items():
            if ppid == parent and child not in found:
                found[child] = start
                frontier.append(child)
    return found


def _survivors(processes: dict[int, str]) -> dict[int, str]:
    table = _proc_table()
    return {pid: start for pid, start in processes.items() if table.get(pid, (0, ""))[1] == start}


def _signal_survivors(processes: dict[int, str], sig: signal.Signals) -> dict[int, str]:
    alive = _survivors(processes)
    for pid in alive:
        with suppress(ProcessLookupError):
            os.kill(pid, sig)
    return alive


class ManagedProcess:
    """A program started in a netns as our child; stopped with its forked children, by PID."""

    def __init__(self, ns: Netns, argv: Sequence[str], log_path: Path) -> None:
        self.ns = ns
        self.argv = list(argv)
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = ns.popen(self.argv, output=self._log)
        self.pid = self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_listening(self, ip: str, port: int, *, timeout: float = 10.0) -> None:
        """Wait until something in the netns listens on ip:port (no traffic is sent)."""
        deadline = time.monotonic() + timeout
        wanted = {f"{ip}:{port}", f"0.0.0.0:{port}", f"*:{port}"}
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(
                    f"{self.argv[0]} exited {self.proc.returncode}:\n{self.output()[-3000:]}"
                )
            listening = run(["ss", "-N", self.ns.name, "-Hltn"]).stdout.split()
            if wanted & set(listening):
                return
            time.sleep(0.05)
        raise TimeoutError(f"{self.argv[0]} not listening on {ip}:{port}:\n{self.output()[-3000:]}")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s; the same for the children it forked."""
        children = _descendants(self.pid)  # before the parent goes and they are re-parented
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        # Orphans may idle for seconds before noticing (danted's children do): tell them.
        for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            children = _signal_survivors(children, sig)
            deadline = time.monotonic() + grace
            while children and time.monotonic() < deadline:
                time.sleep(0.02)
                children = _survivors(children)
        self._log.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- remote host

_HTTP_SERVER_SCRIPT = r'''
"""Test remote host: answers 200 with a fixed body, logs every request's peer as JSON."""
import http.server, json, sys, threading

ip, port, log_path, body_path = sys.argv[1:]
BODY = open(body_path, "rb").read()
MAX_BYTES = 64 * 1024 * 1024
lock = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _record(self):
        entry = {"peer": self.client_address[0], "peer_port": self.client_address[1],
                 "method": self.command, "path": self.path, "host": self.headers.get("Host")}
        with lock, open(log_path, "a") as log:
            log.write(json.dumps(entry) + "\n")

    def _answer(self, with_body):
        self._record()
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = BODY
        if self.path.startswith("/bytes/"):  # /bytes/N: N bytes, for throughput tests
            body = b"x" * min(int(self.path.split("/")[2]), MAX_BYTES)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_GET(self):
        self._answer(True)

    def do_POST(self):
        self._answer(True)

    def do_HEAD(self):
        self._answer(False)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


Server((ip, int(port)), Handler).serve_forever()
'''


class RemoteHttpServer:
    """HTTP server in a netns: 200 + ``body`` for any GET/POST; ``/bytes/N`` gives N bytes."""

    def __init__(self, ns: Netns, ip: str, *, port: int = 80, body: bytes = REMOTE_BODY) -> None:
        _in_test_net(ip)
        self.ns, self.ip, self.port, self.body = ns, ip, port, body
        self.url = f"http://{ip}/" if port == 80 else f"http://{ip}:{port}/"
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            self.dir = stack.enter_context(scratch_dir("http"))
            self.log_path = self.dir / "requests.jsonl"
            self.log_path.touch()
            script = self.dir / "remote_http.py"
            script.write_text(_HTTP_SERVER_SCRIPT)
            (self.dir / "body").write_bytes(self.body)
            argv = [sys.executable, str(script), self.ip, str(self.port), str(self.log_path)]
            argv.append(str(self.dir / "body"))
            self.process = stack.enter_context(
                ManagedProcess(self.ns, argv, self.dir / "server.out")
            )
            self.process.wait_listening(self.ip, self.port)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def requests(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line]

    def peers(self) -> list[str]:
        """The peer address of every request so far, in order."""
        return [entry["peer"] for entry in self.requests()]


# --------------------------------------------------------------------------- system user


class SystemUser:
    """A throw-away login-less user with a SHA-512 (1000 rounds) password, for proxy auth."""

    def __init__(self) -> None:
        self.name = f"egt{new_suffix()}"
        self.password = secrets.token_urlsafe(12)

    def __enter__(self) -> Self:
        run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", self.name])
        try:
            # yescrypt (Debian's default) makes every dante login take ~100 ms of CPU.
            run(["chpasswd", "-c", "SHA512", "-s", "1000"], stdin=f"{self.name}:{self.password}\n")
        except BaseException:
            run(["userdel", self.name], check=False)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        run(["userdel", self.name])

    def __repr__(self) -> str:
        return f"SystemUser({self.name!r})"


# --------------------------------------------------------------------------- proxies


class Dante(LoggingPeer):
    """danted in the proxy host: SOCKS5 on ``proxy_ip:port``, egress from ``proxy_egress_ip``.

    With a ``user`` the method is RFC 1929 username/password against the system
    user; without, method ``none``. CONNECT is allowed only into 198.18.0.0/15.
    """

    def __init__(self, world: UpstreamWorld, *, user: SystemUser | None, port: int = 1080) -> None:
        self.world, self.user, self.port = world, user, port
        self.host = world.proxy_ip
        self.external_ip = world.proxy_egress_ip
        self.username = user.name if user else None
        self.password = user.password if user else None
        userinfo = f"{self.username}:{self.password}@" if user else ""
        self.url = f"socks5://{userinfo}{self.host}:{port}"
        self.endpoint = f"socks5://{self.host}:{port}"
        self._stack = ExitStack()

    def config(self, log_path: Path) -> str:
        method = "username" if self.user else "none"
        return f"""\
logoutput: {log_path}
internal: {self.host} port = {self.port}
external: {self.external_ip}
clientmethod: none
socksmethod: {method}
user.privileged: root
user.unprivileged: nobody
client pass {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    log: error
}}
socks pass {{
    from: 0.0.0.0/0 to: {TEST_NET}
    command: connect
    log: connect disconnect error
}}
socks block {{
    from: 0.0.0.0/0 to: 0.0.0.0/0
    log: connect error
}}
"""

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            self.dir = stack.enter_context(scratch_dir("dante"))
            self.log_path = self.dir / "danted.log"
            conf = self.dir / "danted.conf"
            conf.write_text(self.config(self.log_path))
            argv = ["danted", "-f", str(conf), "-p", str(self.dir / "danted.pid"), "-N", "1"]
            self.process = stack.enter_context(
                ManagedProcess(self.world.proxy_ns, argv, self.dir / "danted.out")
            )
            self.process.wait_listening(self.host, self.port)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


class Tinyproxy(LoggingPeer):
    """tinyproxy in the proxy host: HTTP proxy (CONNECT to 80/443) with Basic auth.

    Listens on ``proxy_ip:port`` and dials from ``proxy_egress_ip``; a default-deny
    filter lets it reach only hosts in 198.18.0.0/15.
    """

    def __init__(
        self,
        world: UpstreamWorld,
        *,
        username: str | None = None,
        password: str | None = None,
        port: int = 8888,
        auth: bool = True,
    ) -> None:
        self.world, self.port, self.auth = world, port, auth
        self.host = world.proxy_ip
        self.username = username if username is not None else f"egt{new_suffix()}"
        self.password = password if password is not None else secrets.token_urlsafe(12)
        self.endpoint = f"http://{self.host}:{port}"
        self.url = (
            f"http://{self.username}:{self.password}@{self.host}:{port}" if auth else self.endpoint
        )
        self._stack = ExitStack()

    def config(self, log_path: Path, filter_path: Path) -> str:
        return f"""\
Port {self.port}
Listen {self.host}
Bind {self.world.proxy_egress_ip}
Timeout 60
MaxClients 64
LogFile "{log_path}"
LogLevel Connect
Allow 127.0.0.1
Allow {TEST_NET}
{f"BasicAuth {self.username} {self.password}" if self.auth else ""}
ConnectPort 80
ConnectPort 443
ConnectPort 53
DisableViaHeader Yes
Filter "{filter_path}"
FilterType ere
FilterURLs Off
FilterDefaultDeny Yes
"""

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            self.dir = stack.enter_context(scratch_dir("tinyproxy"))
            self.log_path = self.dir / "tinyproxy.log"
            filter_path = self.dir / "filter"
            filter_path.write_text("^198\\.1[89]\\.[0-9]+\\.[0-9]+$\n")
            conf = self.dir / "tinyproxy.conf"
            conf.write_text(self.config(self.log_path, filter_path))
            self.process = stack.enter_context(
                ManagedProcess(
                    self.world.proxy_ns,
                    ["tinyproxy", "-d", "-c", str(conf)],
                    self.dir / "tinyproxy.out",
                )
            )
            self.process.wait_listening(self.host, self.port)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


@dataclass(frozen=True)
class Pki:
    """A throw-away CA and one server certificate for ``server_ip``."""

    ca_path: Path
    cert_path: Path
    key_path: Path


def _openssl(words: str, *paths: str | Path) -> None:
    run(["openssl", *words.split(), *map(str, paths)])


def make_pki(directory: Path, *, server_ip: str) -> Pki:
    ca_key, ca_cert = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ext.write_text(
        f"subjectAltName=IP:{server_ip}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid,issuer\n"
    )
    new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    ca_ext = (
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
    )
    ca = f"req -x509 {new_key} -days 2 -subj /CN=egressd-test-CA {ca_ext}"
    _openssl(f"{ca} -keyout", ca_key, "-out", ca_cert)
    _openssl(f"req -new {new_key} -subj /CN={server_ip} -keyout", key, "-out", csr)
    sign = "x509 -req -days 2 -CAcreateserial -CA"
    _openssl(sign, ca_cert, "-CAkey", ca_key, "-in", csr, "-extfile", ext, "-out", cert)
    return Pki(ca_path=ca_cert, cert_path=cert, key_path=key)


class Stunnel(LoggingPeer):
    """stunnel in the proxy host: TLS on ``proxy_ip:port``, plain TCP to ``backend_port``."""

    def __init__(self, world: UpstreamWorld, *, backend_port: int, port: int = 8443) -> None:
        self.world, self.port, self.backend_port = world, port, backend_port
        self.host = world.proxy_ip
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            self.dir = stack.enter_context(scratch_dir("stunnel"))
            self.pki = make_pki(self.dir, server_ip=self.host)
            self.ca_path = self.pki.ca_path
            self.log_path = self.dir / "stunnel.log"
            conf = self.dir / "stunnel.conf"
            conf.write_text(
                f"foreground = yes\nsyslog = no\noutput = {self.log_path}\ndebug = info\n"
                f"[https-proxy]\naccept = {self.host}:{self.port}\n"
                f"connect = {self.host}:{self.backend_port}\n"
                f"cert = {self.pki.cert_path}\nkey = {self.pki.key_path}\n"
            )
            self.process = stack.enter_context(
                ManagedProcess(self.world.proxy_ns, ["stunnel4", str(conf)], self.dir / "out")
            )
            self.process.wait_listening(self.host, self.port)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


class HttpsProxy:
    """An ``https`` upstream: stunnel (TLS, test CA) in front of tinyproxy (CONNECT + Basic)."""

    def __init__(
        self, world: UpstreamWorld, *, port: int = 8443, backend_port: int = 8888, auth: bool = True
    ) -> None:
        self.tinyproxy = Tinyproxy(world, port=backend_port, auth=auth)
        self.stunnel = Stunnel(world, backend_port=backend_port, port=port)
        self.host, self.port = world.proxy_ip, port
        self.username, self.password = self.tinyproxy.username, self.tinyproxy.password
        self.endpoint = f"https://{self.host}:{port}"
        self.url = (
            f"https://{self.username}:{self.password}@{self.host}:{port}" if auth else self.endpoint
        )
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            stack.enter_context(self.tinyproxy)
            stack.enter_context(self.stunnel)
            self.ca_path = self.stunnel.ca_path
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()


# --------------------------------------------------------------------------- clients


def curl(
    url: str,
    *,
    ns: Netns | None = None,
    proxy: str | None = None,
    proxy_cacert: Path | None = None,
    tunnel: bool = False,
    timeout: float = 5.0,
) -> subprocess.CompletedProcess[str]:
    """curl from the host (or ``ns``); never through a proxy from the environment."""
    if proxy is not None:
        _in_test_net(str(urlsplit(proxy).hostname))
    target = str(urlsplit(url).hostname)
    if not (proxy is not None and target == REFUSED_TARGET):
        _in_test_net(target)
    argv = ["curl", "-sS", "--max-time", str(timeout)]
    argv += ["--proxy", proxy] if proxy else ["--noproxy", "*"]
    if proxy_cacert is not None:
        argv += ["--proxy-cacert", str(proxy_cacert)]
    if tunnel:
        argv.append("--proxytunnel")
    argv.append(url)
    return (ns.run if ns else run)(argv, check=False, timeout=timeout + 5)
