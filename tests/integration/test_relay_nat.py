"""The relay against the real kernel: nftables DNAT, SO_ORIGINAL_DST (v4 and v6), IP_FREEBIND.

The test creates a private network namespace with only ``lo`` and runs this
very module inside it (``ip netns exec ... python -m``); ``inside()`` does the
work there and prints a JSON report that the test asserts on. Nothing leaves
that namespace: the proxy and the destination are on 127.0.0.1 in it, and
the documentation addresses below exist only on its ``lo``.

    listener   198.19.254.2:1080 / [2001:db8:e9::2]:1080  (bound before the address exists)
    client     198.19.254.3      / 2001:db8:e9::3         (its TCP is DNATed to the listener)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from egressd.model import NetworkType
from egressd.relay import Relay, original_destination
from tests.integration.peers import Netns
from tests.unit.test_relay_peers import (
    EchoServer,
    Socks5Server,
    close_writer,
    read_until_closed,
    spec,
)

LISTENER_V4, CLIENT_V4 = "198.19.254.2", "198.19.254.3"
LISTENER_V6, CLIENT_V6 = "2001:db8:e9::2", "2001:db8:e9::3"
PORT = 1080
V6_TARGET = ("2001:db8:e9::99", 4242)  # named only; the relay never reaches it
REPO = Path(__file__).resolve().parents[2]


def test_relay_with_real_nat() -> None:
    with Netns.unique("rl") as ns:
        result = ns.run(
            [sys.executable, "-m", "tests.integration.test_relay_nat", "--inside"],
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    # IPv4: the original destination survives DNAT and the data path works, half-close too.
    assert report["v4_reply"] == "through the kernel<eof>"
    assert report["v4_proxy_requests"] == [report["echo"]]
    # IPv6: sockaddr_in6 parsed; the proxy (loopback-only) then refuses, so the client is closed.
    assert report["v6_seen"] == [list(V6_TARGET)]
    assert report["v6_reply"] == ""
    # Loop guard: a connection to the listener itself is refused before any proxy is dialled.
    assert report["loop_reply"] == ""
    assert report["loop_proxy_accepted"] == 0
    assert report["listeners"] == [[LISTENER_V4, PORT], [LISTENER_V6, PORT]]


# -- inside the namespace ----------------------------------------------------------------


def _sh(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True)


def _nat_rules(echo_port: int) -> str:
    return f"""
table inet egt_relay_test {{
    chain out {{
        type nat hook output priority -100; policy accept;
        ip saddr {CLIENT_V4} tcp dport {{ {echo_port}, {PORT} }} dnat ip to {LISTENER_V4}:{PORT}
        ip6 saddr {CLIENT_V6} tcp dport {V6_TARGET[1]} dnat ip6 to [{LISTENER_V6}]:{PORT}
    }}
}}
"""


async def _talk(
    family: socket.AddressFamily, source: str, target: tuple[str, int], data: bytes
) -> bytes:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, target)
    except ConnectionResetError:
        # Refused with RST before asyncio looked at the connect's result (SO_ERROR).
        sock.close()
        return b""
    except BaseException:
        sock.close()
        raise
    reader, writer = await asyncio.open_connection(sock=sock)
    try:
        writer.write(data)
        writer.write_eof()
        return await read_until_closed(reader)
    finally:
        await close_writer(writer)


async def _inside() -> dict[str, Any]:
    seen: list[tuple[str, int]] = []

    def recording(sock: socket.socket) -> tuple[str, int]:
        found = original_destination(sock)
        seen.append(found)
        return found

    report: dict[str, Any] = {}
    async with EchoServer() as echo, Socks5Server() as proxy:
        relay = Relay(connect_timeout=2, handshake_timeout=2, original_dst=recording)
        try:
            upstream = spec(NetworkType.SOCKS5, proxy.port)
            # FREEBIND: neither address exists yet.
            for index, ip in enumerate((LISTENER_V4, LISTENER_V6)):
                cid = f"{index:024x}"
                await relay.ensure_listener(
                    container_id=cid, listen_ip=ip, port=PORT, upstream=upstream
                )
            for address in (f"{LISTENER_V4}/32", f"{CLIENT_V4}/32"):
                _sh("ip", "addr", "add", address, "dev", "lo")
            for address in (f"{LISTENER_V6}/128", f"{CLIENT_V6}/128"):
                _sh("ip", "-6", "addr", "add", address, "dev", "lo", "nodad")
            # A route for the (fictional) v6 target, so connect() reaches the DNAT hook.
            _sh("ip", "-6", "route", "add", "2001:db8:e9::/64", "dev", "lo")
            _sh("nft", "-f", "-", stdin=_nat_rules(echo.port))

            report["echo"] = list(echo.address)
            reply = await _talk(socket.AF_INET, CLIENT_V4, echo.address, b"through the kernel")
            report["v4_reply"] = reply.decode()
            report["v4_proxy_requests"] = [list(r) for r in proxy.requests]

            seen.clear()
            reply = await _talk(socket.AF_INET6, CLIENT_V6, V6_TARGET, b"v6")
            report["v6_seen"] = [list(s) for s in seen]
            report["v6_reply"] = reply.decode()

            accepted_before = proxy.accepted
            reply = await _talk(socket.AF_INET, CLIENT_V4, (LISTENER_V4, PORT), b"loop")
            report["loop_reply"] = reply.decode()
            report["loop_proxy_accepted"] = proxy.accepted - accepted_before
            report["listeners"] = sorted(list(a) for a in relay.listener_addresses().values())
        finally:
            await relay.close()
    return report


if __name__ == "__main__" and "--inside" in sys.argv:
    if os.environ.get("PYTHONPATH") is None:
        sys.path.insert(0, str(REPO))
    print(json.dumps(asyncio.run(asyncio.wait_for(_inside(), 30))))
