"""End to end, runtimes ``pid`` and ``path``: a plain process in a namespace of its own.

The "container" is ``unshare -n sleep 600``, our child, known to egressd only
by its PID (``pid``) or by ``/proc/PID/ns/net`` (``path``, as CNI passes it).
Its namespace has nothing but ``lo``: a request that reaches the remote host
went through egressd, and the peer address the remote host saw is dante's.
A process in the host's own namespace is refused, and the host is untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator

import pytest

from egressd.client import ApiError
from tests.integration.egressd_proc import EgressdServer
from tests.integration.peers import Dante, RemoteHttpServer, UpstreamWorld, run


class UnsharedSleeper:
    """``unshare -n sleep 600`` with ``lo`` up; killed by PID on exit."""

    def __enter__(self) -> UnsharedSleeper:
        self.proc = subprocess.Popen(["unshare", "-n", "sleep", "600"], stdin=subprocess.DEVNULL)
        try:
            ours = os.stat("/proc/self/ns/net").st_ino
            deadline = time.monotonic() + 10
            while os.stat(self.netns).st_ino == ours:  # until unshare(2) has run
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("unshare -n did not give the child its own netns")
                time.sleep(0.01)
            self.nsenter(["ip", "link", "set", "lo", "up"], check=True)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def netns(self) -> str:
        return f"/proc/{self.proc.pid}/ns/net"

    def nsenter(self, argv: list[str], *, check: bool = False) -> subprocess.CompletedProcess[str]:
        return run(["nsenter", f"--net={self.netns}", *argv], check=check)

    def links(self) -> list[str]:
        out = self.nsenter(["ip", "-j", "link", "show"], check=True).stdout
        return sorted(link["ifname"] for link in json.loads(out))

    def curl(self, url: str) -> subprocess.CompletedProcess[str]:
        return self.nsenter(["curl", "-sS", "--max-time", "5", "--noproxy", "*", url])


def host_defaults() -> tuple[str, str]:
    """The host's default routes. (Not all links: other tests may add their own meanwhile.)"""
    v4 = run(["ip", "route", "show", "default"]).stdout
    return v4, run(["ip", "-6", "route", "show", "default"]).stdout


@pytest.fixture
def server() -> Iterator[EgressdServer]:
    with EgressdServer() as srv:
        yield srv


@pytest.fixture
def sleeper() -> Iterator[UnsharedSleeper]:
    with UnsharedSleeper() as proc:
        yield proc


@pytest.mark.parametrize("runtime", ["pid", "path"])
def test_process_netns_egresses_through_dante(
    runtime: str,
    server: EgressdServer,
    sleeper: UnsharedSleeper,
    dante: Dante,
    remote_http: RemoteHttpServer,
    upstream_world: UpstreamWorld,
) -> None:
    url = f"http://{upstream_world.remote_ip}/"
    ref = str(sleeper.pid) if runtime == "pid" else sleeper.netns
    assert sleeper.links() == ["lo"]
    assert sleeper.curl(url).returncode != 0
    with server.client() as c:
        cid = str(c.containers.create(ref=ref, runtime=runtime)["id"])
        c.containers.update_network_config(
            id=cid,
            data={"type": "socks5", "proxy": dante.url, "dns_servers": [upstream_world.remote_ip]},
        )
        started = c.containers.start_network(id=cid)
        assert started["status"] == "running", started
        assert sleeper.links() == ["egress0", "lo"]
        r = sleeper.curl(url)
        assert r.returncode == 0, r.stderr
        assert r.stdout == remote_http.body.decode()
        assert remote_http.peers() == [upstream_world.proxy_egress_ip]
        dante.wait_log(upstream_world.remote_ip)

        c.containers.remove_network_config(id=cid)
        assert sleeper.links() == ["lo"]


def test_host_netns_process_is_refused_and_host_untouched(server: EgressdServer) -> None:
    before = host_defaults()
    cids: list[str] = []
    host_proc = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        with server.client() as c:
            for runtime, ref in (("pid", str(host_proc.pid)), ("path", "/proc/self/ns/net")):
                cid = str(c.containers.create(ref=ref, runtime=runtime)["id"])
                cids.append(cid)
                c.containers.update_network_config(id=cid, data={"type": "block"})
                with pytest.raises(ApiError) as err:
                    c.containers.start_network(id=cid)
                assert err.value.status_code == 500
                assert err.value.reason and "host's network namespace" in err.value.reason
    finally:
        host_proc.kill()
        host_proc.wait(timeout=10)
    assert host_defaults() == before
    host_links = run(["ip", "-br", "link"]).stdout
    assert "egress0" not in host_links
    assert not any(f"br-{cid[:12]}" in host_links for cid in cids)
