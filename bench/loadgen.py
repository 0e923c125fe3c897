"""Bounded load clients and their sink, run as processes inside a namespace.

One client for all four paths: it speaks SOCKS5 itself when given ``--socks``
(the "client straight to dante" path), and otherwise connects to the target
as any program in the container would (the direct path, and the two
transparent relays that redirect it). Standard library only::

    python -m bench.loadgen serve  --bind IP:PORT --lifetime S
    python -m bench.loadgen stream --target IP:PORT --mode up|down --duration S [--socks IP:PORT]
    python -m bench.loadgen conns  --target IP:PORT --duration S --concurrency C
                                   --max-conns N [--socks IP:PORT]

Each client prints one JSON object. Everything is bounded: by ``--duration``
and a count, every socket by a timeout, the server by ``--lifetime``.

Stream protocol (``serve``): the client sends ``mode`` (1 byte, ``U`` or ``D``)
and the duration in ms (4 bytes, big-endian). ``U``: the client sends for the
duration and half-closes; the server counts to EOF and answers the count and
its first-byte-to-EOF time in ns (two u64). ``D``: the server sends for the
duration and closes; the client counts. Throughput is always measured at the
receiver: bytes received / time from its first byte to EOF.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import struct
import sys
import threading
import time
from typing import Any

BLOCK = 1 << 20  # 1 MiB per send/recv call: the client's cost stays in the kernel
HEADER = struct.Struct("!cI")
REPLY = struct.Struct("!QQ")
SOCKET_TIMEOUT = 30.0
ALLOWED = ipaddress.ip_network("198.18.0.0/15")  # the benchmark's own hosts, nothing else
HTTP_REQUEST = "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"


def _endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if ipaddress.ip_address(host) not in ALLOWED:
        raise SystemExit(f"{host} is outside {ALLOWED}: the benchmark only talks to its own hosts")
    return host, int(port)


# --------------------------------------------------------------------------- SOCKS5


def _socks_greeting() -> bytes:
    return b"\x05\x01\x00"  # version 5, one method: no authentication


def _socks_connect(target: tuple[str, int]) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton(target[0]) + struct.pack("!H", target[1])


def _check_socks_reply(method: bytes, reply: bytes) -> None:
    if method != b"\x05\x00":
        raise ConnectionError(f"SOCKS5 method refused: {method!r}")
    if len(reply) < 2 or reply[1] != 0:
        raise ConnectionError(f"SOCKS5 CONNECT refused: {reply!r}")


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("closed early")
        data += chunk
    return data


def open_stream(target: tuple[str, int], socks: tuple[str, int] | None) -> socket.socket:
    sock = socket.create_connection(socks or target, timeout=SOCKET_TIMEOUT)
    if socks is not None:
        sock.sendall(_socks_greeting())
        method = _recv_exact(sock, 2)
        sock.sendall(_socks_connect(target))
        _check_socks_reply(method, _recv_exact(sock, 10))  # IPv4 bound address: 10 bytes
    return sock


# --------------------------------------------------------------------------- stream


def stream(
    target: tuple[str, int], mode: str, duration: float, socks: tuple[str, int] | None
) -> dict[str, Any]:
    buffer = bytearray(BLOCK)
    with open_stream(target, socks) as sock:
        sock.sendall(HEADER.pack(mode.encode(), int(duration * 1000)))
        if mode == "U":
            view = memoryview(bytes(BLOCK))
            end = time.monotonic() + duration
            sent = 0
            while time.monotonic() < end:
                sent += sock.send(view)
            sock.shutdown(socket.SHUT_WR)
            count, window_ns = REPLY.unpack(_recv_exact(sock, REPLY.size))
            seconds = window_ns / 1e9
            result = {"bytes": count, "sent": sent, "seconds": seconds}
        else:
            count, first, last = 0, 0.0, 0.0
            while n := sock.recv_into(buffer):
                last = time.monotonic()
                if not count:
                    first = last
                count += n
            seconds = last - first
            result = {"bytes": count, "seconds": seconds}
    result["gbps"] = result["bytes"] * 8 / seconds / 1e9 if seconds > 0 else 0.0
    return result


def _serve_one(conn: socket.socket, lifetime_end: float) -> None:
    with conn:
        conn.settimeout(SOCKET_TIMEOUT)
        mode, duration_ms = HEADER.unpack(_recv_exact(conn, HEADER.size))
        hard_end = min(time.monotonic() + duration_ms / 1000 + 60, lifetime_end)
        if mode == b"U":
            buffer = bytearray(BLOCK)
            count, first, last = 0, 0, 0
            while (n := conn.recv_into(buffer)) and time.monotonic() < hard_end:
                last = time.monotonic_ns()
                if not count:
                    first = last
                count += n
            conn.sendall(REPLY.pack(count, last - first))
        elif mode == b"D":
            view = memoryview(bytes(BLOCK))
            end = min(time.monotonic() + duration_ms / 1000, hard_end)
            while time.monotonic() < end:
                conn.send(view)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(BLOCK) and time.monotonic() < hard_end:
                pass


def serve(bind: tuple[str, int], lifetime: float) -> None:
    end = time.monotonic() + lifetime
    listener = socket.create_server(bind, backlog=128, reuse_port=False)
    listener.settimeout(1.0)
    while time.monotonic() < end:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        worker = threading.Thread(target=_serve_quietly, args=(conn, end), daemon=True)
        worker.start()


def _serve_quietly(conn: socket.socket, end: float) -> None:
    try:
        _serve_one(conn, end)
    except OSError as exc:
        print(f"stream connection ended: {exc}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- connections


async def _one_connection(
    loop: asyncio.AbstractEventLoop,
    target: tuple[str, int],
    socks: tuple[str, int] | None,
    request: bytes,
) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, socks or target)
        if socks is not None:
            await loop.sock_sendall(sock, _socks_greeting())
            method = await loop.sock_recv(sock, 2)
            await loop.sock_sendall(sock, _socks_connect(target))
            _check_socks_reply(method, await loop.sock_recv(sock, 10))
        await loop.sock_sendall(sock, request)
        head = b""
        while chunk := await loop.sock_recv(sock, 4096):
            head = head or chunk
        if not head.startswith(b"HTTP/1.1 200"):
            raise ConnectionError(f"unexpected answer {head[:40]!r}")
    finally:
        sock.close()


async def _conns(
    target: tuple[str, int],
    duration: float,
    concurrency: int,
    max_conns: int,
    socks: tuple[str, int] | None,
    timeout: float,
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    request = HTTP_REQUEST.format(host=target[0]).encode()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    started = 0
    begin = time.perf_counter()
    deadline = begin + duration

    async def worker() -> None:
        nonlocal started
        while started < max_conns and time.perf_counter() < deadline:
            started += 1
            t0 = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    await _one_connection(loop, target, socks, request)
            except (OSError, TimeoutError, ConnectionError) as exc:
                key = type(exc).__name__
                errors[key] = errors.get(key, 0) + 1
            else:
                latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - begin
    latencies.sort()
    return {
        "connections": len(latencies),
        "errors": errors,
        "seconds": elapsed,
        "conns_per_s": len(latencies) / elapsed if elapsed > 0 else 0.0,
        "latency_ms": {
            "p50": percentile(latencies, 50) * 1000,
            "p90": percentile(latencies, 90) * 1000,
            "p99": percentile(latencies, 99) * 1000,
            "max": (latencies[-1] if latencies else 0.0) * 1000,
        },
    }


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an ascending list (0.0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(rank) - 1]


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve")
    p_serve.add_argument("--bind", required=True)
    p_serve.add_argument("--lifetime", type=float, default=3600)
    p_stream = sub.add_parser("stream")
    p_stream.add_argument("--target", required=True)
    p_stream.add_argument("--mode", choices=["up", "down"], required=True)
    p_stream.add_argument("--duration", type=float, default=5.0)
    p_stream.add_argument("--socks")
    p_conns = sub.add_parser("conns")
    p_conns.add_argument("--target", required=True)
    p_conns.add_argument("--duration", type=float, default=5.0)
    p_conns.add_argument("--concurrency", type=int, default=16)
    p_conns.add_argument("--max-conns", type=int, default=200_000)
    p_conns.add_argument("--timeout", type=float, default=5.0)
    p_conns.add_argument("--socks")
    args = parser.parse_args(argv)

    if args.command == "serve":
        serve(_endpoint(args.bind), min(args.lifetime, 24 * 3600))
        return
    if not 0 < args.duration <= 120:
        raise SystemExit("--duration must be in (0, 120] seconds")
    socks = _endpoint(args.socks) if args.socks else None
    target = _endpoint(args.target)
    if args.command == "stream":
        result = stream(target, "U" if args.mode == "up" else "D", args.duration, socks)
    else:
        result = asyncio.run(
            _conns(target, args.duration, args.concurrency, args.max_conns, socks, args.timeout)
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
