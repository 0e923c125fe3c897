"""A DNS server in the remote host (dnsmasq) and a minimal DNS client for tests.

dnsmasq answers only ``TEST_NAME`` (from ``--address``), never forwards
(``--no-resolv``), and logs every query with its source address, so a test
can tell whether a query came from the proxy or straight from a container.
"""

from __future__ import annotations

import random
import socket
import struct
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Self

from tests.integration.peers import LoggingPeer, ManagedProcess, Netns, scratch_dir

TEST_NAME = "www.egressd.test"
TEST_ANSWER = "198.18.0.99"


class Dnsmasq(LoggingPeer):
    def __init__(self, ns: Netns, ip: str) -> None:
        self.ns, self.ip = ns, ip
        self._stack = ExitStack()

    def __enter__(self) -> Self:
        with ExitStack() as stack:
            self.dir = stack.enter_context(scratch_dir("dnsmasq"))
            self.log_path = self.dir / "dnsmasq.log"
            argv = [
                "dnsmasq",
                "--keep-in-foreground",
                "--no-resolv",
                "--no-hosts",
                "--no-poll",
                "--bind-interfaces",
                f"--listen-address={self.ip}",
                "--except-interface=lo",
                "--port=53",
                f"--address=/{TEST_NAME}/{TEST_ANSWER}",
                "--log-queries=extra",
                f"--log-facility={self.log_path}",
                f"--pid-file={self.dir / 'dnsmasq.pid'}",
                "--user=root",
                "--group=root",
            ]
            self.process = stack.enter_context(
                ManagedProcess(self.ns, argv, self.dir / "dnsmasq.out")
            )
            self.process.wait_listening(self.ip, 53)
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def query_sources(self) -> list[str]:
        """Source addresses of the queries dnsmasq logged for TEST_NAME."""
        sources = []
        for line in self.log_text().splitlines():
            if f" {TEST_NAME} from " in line and "query[" in line:
                sources.append(line.rsplit(" from ", 1)[1].strip())
        return sources


def build_query(name: str, qid: int) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    qname = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00"
    return header + qname + struct.pack("!HH", 1, 1)


QUERY_SCRIPT = r"""
import socket, struct, sys
mode, server, data = sys.argv[1], sys.argv[2], bytes.fromhex(sys.argv[3])
try:
    if mode == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(8)
        s.sendto(data, (server, 53)); reply = s.recv(4096)
    else:
        s = socket.create_connection((server, 53), timeout=8)
        s.sendall(struct.pack("!H", len(data)) + data)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + struct.unpack("!H", buf[:2])[0]:
            chunk = s.recv(4096)
            if not chunk: break
            buf += chunk
        reply = buf[2:]
    print(reply.hex())
except OSError as e:
    print("error", type(e).__name__, e)
"""


def resolve_in(
    ns: Netns, *, server: str, tcp: bool = False, name: str = TEST_NAME
) -> dict[str, object]:
    """Ask ``server`` (any address: egressd catches port 53) from inside ``ns``.

    Returns {"rcode": int, "answers": [ipv4...]} or {"error": str}.
    """
    qid = random.randrange(1, 0xFFFF)
    query = build_query(name, qid)
    out = ns.run(
        [sys.executable, "-c", QUERY_SCRIPT, "tcp" if tcp else "udp", server, query.hex()],
        check=False,
        timeout=20,
    ).stdout.strip()
    if out.startswith("error") or not out:
        return {"error": out}
    reply = bytes.fromhex(out)
    rid, flags, _qd, an = struct.unpack("!HHHH", reply[:8])
    assert rid == qid, "reply id does not match"
    answers = []
    pos = 12 + len(query) - 12  # skip the echoed question (same bytes as ours)
    for _ in range(an):
        if reply[pos] & 0xC0 == 0xC0:
            pos += 2
        else:
            while reply[pos]:
                pos += reply[pos] + 1
            pos += 1
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", reply[pos : pos + 10])
        pos += 10
        if rtype == 1 and rdlen == 4:
            answers.append(socket.inet_ntoa(reply[pos : pos + 4]))
        pos += rdlen
    return {"rcode": flags & 0xF, "answers": answers}


class Capture:
    """tcpdump on one interface of a netns (None = host), counting packets that match."""

    def __init__(self, ns: Netns | None, ifname: str, bpf: str, out: Path) -> None:
        self.ns, self.ifname, self.bpf, self.out = ns, ifname, bpf, out
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        argv = ["tcpdump", "-n", "-l", "-i", self.ifname, "-U", self.bpf]
        if self.ns is not None:
            argv = ["ip", "netns", "exec", self.ns.name, *argv]
        self._log = self.out.open("wb")
        self._err = self.out.with_suffix(".err").open("wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=self._err)
        err = self.out.with_suffix(".err")

        deadline = time.monotonic() + 10
        while b"listening on" not in err.read_bytes():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"tcpdump did not start: {err.read_text()}")
            time.sleep(0.05)
        return self

    def lines(self) -> list[str]:
        return [line for line in self.out.read_text().splitlines() if line.strip()]

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        self._err.close()
