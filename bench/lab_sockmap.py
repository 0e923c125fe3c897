"""Why the relay does not forward in the kernel with sockmap: a lab, not a case of ``make bench``.

A relay that terminates the container's TCP could leave the payload to the
kernel: put both sockets of a tunnel in a ``SOCKHASH`` whose ``sk_skb``
stream-verdict program redirects each arriving segment to the other socket's
egress (``bpf_sk_redirect_hash``), so no byte and no wake-up reaches user
space. This lab measures that against a splice relay (what egressd does), on
loopback only:

* ``backpressure``: the proxy side never reads; the client pushes for at most
  ``--push-seconds`` or ``--push-cap`` bytes. A splice relay stops at the
  socket buffers; sockmap queues everything the client sends in the kernel
  (the redirect puts the segment on the other socket's backlog, unbounded,
  and the client's receive window reopens at once).
* ``throughput``: one stream of ``--bytes`` (bounded by ``--seconds``) from
  client to a reader that discards, with the machine's busy CPU seconds per
  GB (``/proc/stat``).

Run as root (BPF): ``.venv/bin/python -m bench.lab_sockmap``; results go to
``bench/results/lab_sockmap.json``. docs/BENCHMARKS.md says what it showed
and what the same pairing did inside egressd's relay in the full harness.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from bench.machine import machine
from bench.procs import REPO, machine_busy_seconds

_SYS_BPF = 321  # x86_64
_MAP_CREATE, _MAP_UPDATE_ELEM, _PROG_LOAD, _PROG_ATTACH = 0, 2, 5, 8
_MAP_TYPE_SOCKHASH = 18
_PROG_TYPE_SK_SKB = 14
_SK_SKB_STREAM_VERDICT = 5
_FUNC_SK_REDIRECT_HASH = 72
# struct __sk_buff: remote_ip4, local_ip4, remote_port, local_port
_CTX_FIELDS = (92, 96, 132, 136)
_libc = ctypes.CDLL(None, use_errno=True)


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, 128)
    fd = int(_libc.syscall(_SYS_BPF, cmd, buf, 128))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return fd


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _own_key(sock: socket.socket) -> bytes:
    """The 16-byte key the verdict program builds from a segment of ``sock``."""
    local_ip, local_port = sock.getsockname()[:2]
    remote_ip, remote_port = sock.getpeername()[:2]
    return (
        socket.inet_aton(remote_ip)
        + socket.inet_aton(local_ip)
        + b"\0\0"
        + struct.pack(">H", remote_port)  # the kernel's be16 << 16, stored LE
        + struct.pack("<I", local_port)
    )


class KernelPairs:
    """A SOCKHASH keyed by a socket's own 4-tuple, holding its peer."""

    def __init__(self) -> None:
        self.map_fd = _bpf(_MAP_CREATE, struct.pack("IIIII", _MAP_TYPE_SOCKHASH, 16, 4, 64, 0))
        prog = [_insn(0xBF, 6, 1)]  # r6 = ctx
        for slot, field in enumerate(_CTX_FIELDS):  # key on the stack, at r10 - 16
            prog += [_insn(0x61, 2, 6, field), _insn(0x63, 10, 2, -16 + 4 * slot)]
        prog += [
            _insn(0xBF, 1, 6),
            _insn(0x18, 2, 1, 0, self.map_fd),  # r2 = map (pseudo map fd), 2 slots
            _insn(0),
            _insn(0xBF, 3, 10),
            _insn(0x07, 3, 0, 0, -16),
            _insn(0xB7, 4),  # flags 0: the peer's egress
            _insn(0x85, imm=_FUNC_SK_REDIRECT_HASH),
            _insn(0x95),
        ]
        code = b"".join(prog)
        insns = ctypes.create_string_buffer(code, len(code))
        licence = ctypes.create_string_buffer(b"GPL")
        attr = struct.pack(
            "IIQQIIQII16s",
            _PROG_TYPE_SK_SKB,
            len(code) // 8,
            ctypes.addressof(insns),
            ctypes.addressof(licence),
            0,
            0,
            0,
            0,
            0,
            b"egressd_lab",
        )
        self.prog_fd = _bpf(_PROG_LOAD, attr)
        _bpf(
            _PROG_ATTACH, struct.pack("IIII", self.map_fd, self.prog_fd, _SK_SKB_STREAM_VERDICT, 0)
        )

    def pair(self, a: socket.socket, b: socket.socket) -> None:
        for key_of, sock in ((a, b), (b, a)):
            key = ctypes.create_string_buffer(_own_key(key_of), 16)
            value = ctypes.create_string_buffer(struct.pack("I", sock.fileno()), 4)
            attr = struct.pack(
                "IIQQQ", self.map_fd, 0, ctypes.addressof(key), ctypes.addressof(value), 0
            )
            _bpf(_MAP_UPDATE_ELEM, attr)

    def close(self) -> None:
        os.close(self.prog_fd)
        os.close(self.map_fd)


def _splice_one_way(src: socket.socket, dst: socket.socket) -> None:
    """What egressd's relay does per direction, minus the event loop."""
    read_end, write_end = os.pipe()
    try:
        while True:
            got = os.splice(src.fileno(), write_end, 1 << 18)
            if not got:
                return
            while got:
                got -= os.splice(read_end, dst.fileno(), got)
    except OSError:
        return
    finally:
        os.close(read_end)
        os.close(write_end)


@contextmanager
def _tunnel(mode: str) -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, the proxy side's accepted socket), relayed by ``mode``, all on loopback."""
    with ExitStack() as stack:
        listeners = []
        for _ in range(2):
            listener = stack.enter_context(socket.create_server(("127.0.0.1", 0)))
            listeners.append(listener)
        client = stack.enter_context(socket.create_connection(listeners[0].getsockname()))
        relay_c = stack.enter_context(listeners[0].accept()[0])
        relay_p = stack.enter_context(socket.create_connection(listeners[1].getsockname()))
        far = stack.enter_context(listeners[1].accept()[0])
        if mode == "sockmap":
            pairs = KernelPairs()
            stack.callback(pairs.close)
            pairs.pair(relay_c, relay_p)
        else:
            worker = threading.Thread(target=_splice_one_way, args=(relay_c, relay_p), daemon=True)
            worker.start()
            stack.callback(worker.join, 5)
            for sock in (relay_c, relay_p):  # unblocks the worker, whichever splice it is in
                stack.callback(sock.shutdown, socket.SHUT_RDWR)
        yield client, far


def _mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable in /proc/meminfo")


def backpressure(mode: str, seconds: float, cap: int) -> dict[str, Any]:
    with _tunnel(mode) as (client, _far):
        client.setblocking(False)
        chunk = b"\0" * (1 << 20)
        before = _mem_available()
        sent, start = 0, time.monotonic()
        while time.monotonic() - start < seconds and sent < cap:
            try:
                sent += client.send(chunk)
            except BlockingIOError:
                time.sleep(0.01)
        time.sleep(0.2)  # let the last redirects land
        used = before - _mem_available()
    return {
        "mode": mode,
        "accepted_mib": round(sent / 2**20, 1),
        "mem_used_mib": round(used / 2**20),
    }


def throughput(mode: str, total: int, seconds: float) -> dict[str, Any]:
    with _tunnel(mode) as (client, far):
        received = [0]

        def drain() -> None:
            far.settimeout(seconds + 5)
            while received[0] < total:
                got = far.recv(1 << 20)
                if not got:
                    return
                received[0] += len(got)

        reader = threading.Thread(target=drain, daemon=True)
        chunk = b"\0" * (1 << 20)
        busy0, start = machine_busy_seconds(), time.monotonic()
        reader.start()
        sent = 0
        client.settimeout(seconds)
        while sent < total and time.monotonic() - start < seconds:
            client.sendall(chunk)
            sent += len(chunk)
        reader.join(seconds + 5)
        elapsed = time.monotonic() - start
        busy = machine_busy_seconds() - busy0
    moved = received[0]
    return {
        "mode": mode,
        "gbit_s": round(moved * 8 / elapsed / 1e9, 2),
        "machine_cpu_s_per_gb": round(busy / (moved / 1e9), 3) if moved else None,
        "complete": moved == sent,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--push-seconds", type=float, default=3.0)
    p.add_argument("--push-cap", type=int, default=1 << 30, help="bytes the client pushes at most")
    p.add_argument("--bytes", type=int, default=4 << 30, help="bytes per throughput run")
    p.add_argument("--seconds", type=float, default=10.0, help="bound of a throughput run")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    runs: list[Callable[[], dict[str, Any]]] = []
    for mode in ("splice", "sockmap"):
        runs.append(lambda mode=mode: backpressure(mode, args.push_seconds, args.push_cap))
    for _ in range(args.repeat):
        for mode in ("splice", "sockmap"):
            runs.append(lambda mode=mode: throughput(mode, args.bytes, args.seconds))
    results = []
    for run in runs:
        result = run()
        print(json.dumps(result), flush=True)
        results.append(result)
    out = REPO / "bench" / "results" / "lab_sockmap.json"
    out.write_text(
        json.dumps({"machine": machine(), "args": vars(args), "runs": results}, indent=1)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
