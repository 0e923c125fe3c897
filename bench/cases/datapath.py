"""Data-path cases: throughput (and relay CPU per GB), connections per second.

Paths and repeats are interleaved (repeat 1: a, b, c, d; repeat 2: a, b, c,
d; ...) so that a slow minute of the machine hits every path alike. Around
every run the CPU time of the relay process (redsocks, or the whole egressd
process), of dante's process tree and of the whole machine (``/proc/stat``:
every process and interrupt, the clients and servers included) is read, so
the CPU cases come from the very same runs. The machine figure is the one
that compares paths: the kernel charges a local receiver's work to whichever
process happens to trigger it, so a relay's own CPU is not its whole cost.

* throughput: ``bench.loadgen stream`` on all four paths, one TCP stream,
  up (container -> remote) and down, ``duration`` s each; iperf3 on the
  three transparent paths as a cross-check of the client.
* conns: ``bench.loadgen conns`` on all four paths (``concurrency``
  connections in flight, each: connect [+ SOCKS5], GET with
  ``Connection: close``, read to EOF, close; latency is that whole
  sequence); wrk (``-c concurrency``, ``Connection: close``) on the three
  transparent paths as a lower-overhead client.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import clients, say
from bench import profile as profiler
from bench.clients import RunFailed
from bench.procs import cpu_seconds, machine_busy_seconds, tree_cpu_seconds
from bench.stats import median
from bench.topology import NGINX_PORT, BenchPath

Runner = Callable[[], dict[str, Any]]


def _measured(run: Runner, path: BenchPath, dante_pid: int) -> dict[str, Any]:
    relay0 = cpu_seconds(path.relay_pid) if path.relay_pid else None
    dante0 = tree_cpu_seconds(dante_pid)
    machine0, wall0 = machine_busy_seconds(), time.monotonic()
    result = run()
    result["machine_cpu_s"] = machine_busy_seconds() - machine0
    result["wall_s"] = time.monotonic() - wall0
    if relay0 is not None and path.relay_pid:
        result["relay_cpu_s"] = cpu_seconds(path.relay_pid) - relay0
    result["dante_cpu_s"] = tree_cpu_seconds(dante_pid) - dante0
    return result


def _attempt(label: str, run: Runner, failures: list[str]) -> dict[str, Any] | None:
    try:
        return run()
    except RunFailed as exc:
        say(f"  {label}: FAILED {exc}")
        failures.append(f"{label}: {exc}")
        return None


def throughput(
    paths: list[BenchPath],
    remote_ip: str,
    *,
    dante_pid: int,
    repeat: int,
    duration: float,
    with_iperf3: bool,
) -> dict[str, Any]:
    tools = ["loadgen"] + (["iperf3"] if with_iperf3 else [])
    runs: dict[str, dict[str, dict[str, list[dict[str, Any]]]]] = {
        tool: {p.name: {"up": [], "down": []} for p in paths} for tool in tools
    }
    failures: list[str] = []
    for r in range(repeat):
        for path in paths:
            for upload in (True, False):
                direction = "up" if upload else "down"
                for tool in tools:
                    if tool == "iperf3" and not path.transparent:
                        continue
                    fn = clients.stream if tool == "loadgen" else clients.iperf3

                    def one(fn: Any = fn, path: BenchPath = path, upload: bool = upload) -> Any:
                        return _measured(
                            lambda: fn(path, remote_ip, upload=upload, duration=duration),
                            path,
                            dante_pid,
                        )

                    label = f"throughput {tool} {path.name} {direction} #{r + 1}"
                    result = _attempt(label, one, failures)
                    if result is not None:
                        runs[tool][path.name][direction].append(result)
                        say(f"  {label}: {result['gbps']:.2f} Gbit/s")
    return {
        "duration_s": duration,
        "repeat": repeat,
        "runs": runs,
        "machine_cpu_s_per_gb": {
            tool: {
                name: {
                    d: sum(x["machine_cpu_s"] for x in rs) / (sum(x["bytes"] for x in rs) / 1e9)
                    for d, rs in by_dir.items()
                    if rs and sum(x["bytes"] for x in rs)
                }
                for name, by_dir in by_path.items()
            }
            for tool, by_path in runs.items()
        },
        # Share of the machine's cores busy while the runs went on (client start included).
        "machine_busy_share": {
            tool: {
                name: {
                    d: sum(x["machine_cpu_s"] for x in rs)
                    / (sum(x["wall_s"] for x in rs) * (os.cpu_count() or 1))
                    for d, rs in by_dir.items()
                    if rs
                }
                for name, by_dir in by_path.items()
            }
            for tool, by_path in runs.items()
        },
        "median_gbps": {
            tool: {
                name: {d: median([x["gbps"] for x in rs]) for d, rs in by_dir.items()}
                for name, by_dir in by_path.items()
            }
            for tool, by_path in runs.items()
        },
        "failures": failures,
    }


def cpu_per_gb(throughput_result: dict[str, Any]) -> dict[str, Any]:
    """Relay CPU seconds per GB (1e9 bytes) moved, from the throughput runs."""
    out: dict[str, Any] = {}
    for tool, by_path in throughput_result["runs"].items():
        for name, by_dir in by_path.items():
            entry: dict[str, Any] = {}
            for direction, rs in by_dir.items():
                relay = [x for x in rs if "relay_cpu_s" in x]
                gb = sum(x["bytes"] for x in rs) / 1e9
                if relay and gb:
                    entry[direction] = {
                        "relay_cpu_s_per_gb": sum(x["relay_cpu_s"] for x in relay) / gb,
                        "dante_cpu_s_per_gb": sum(x["dante_cpu_s"] for x in rs) / gb,
                        "gb": gb,
                    }
            if entry:
                both = [x for rs in by_dir.values() for x in rs]
                gb = sum(x["bytes"] for x in both) / 1e9
                entry["both"] = {
                    "relay_cpu_s_per_gb": sum(x["relay_cpu_s"] for x in both) / gb,
                    "dante_cpu_s_per_gb": sum(x["dante_cpu_s"] for x in both) / gb,
                    "gb": gb,
                }
                out.setdefault(tool, {})[name] = entry
    return out


def connections(
    paths: list[BenchPath],
    remote_ip: str,
    *,
    dante_pid: int,
    repeat: int,
    duration: float,
    concurrency: int,
    with_wrk: bool,
) -> dict[str, Any]:
    tools = ["loadgen"] + (["wrk"] if with_wrk else [])
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        tool: {p.name: [] for p in paths} for tool in tools
    }
    failures: list[str] = []
    url = f"http://{remote_ip}:{NGINX_PORT}/"
    for r in range(repeat):
        for path in paths:
            for tool in tools:
                if tool == "wrk" and not path.transparent:
                    continue

                def one(tool: str = tool, path: BenchPath = path) -> dict[str, Any]:
                    if tool == "loadgen":
                        run: Runner = lambda: clients.conns(  # noqa: E731
                            path, remote_ip, duration=duration, concurrency=concurrency
                        )
                    else:
                        run = lambda: _wrk_conns(path, url, duration, concurrency)  # noqa: E731
                    return _measured(run, path, dante_pid)

                label = f"conns {tool} {path.name} #{r + 1}"
                result = _attempt(label, one, failures)
                if result is not None:
                    runs[tool][path.name].append(result)
                    lat = result["latency_ms"]
                    say(
                        f"  {label}: {result['conns_per_s']:.0f} conn/s, "
                        f"p50 {lat['p50']:.2f} ms, p99 {lat['p99']:.2f} ms, "
                        f"errors {result['errors']}"
                    )
    summary: dict[str, Any] = {}
    for tool, by_path in runs.items():
        for name, rs in by_path.items():
            if not rs:
                continue
            total = sum(x["connections"] for x in rs)
            entry = {
                "conns_per_s": median([x["conns_per_s"] for x in rs]),
                "p50_ms": median([x["latency_ms"]["p50"] for x in rs]),
                "p99_ms": median([x["latency_ms"]["p99"] for x in rs]),
                "errors": sum(_error_count(x["errors"]) for x in rs),
            }
            relay = [x["relay_cpu_s"] for x in rs if "relay_cpu_s" in x]
            if relay and total:
                entry["relay_cpu_ms_per_1k_conns"] = sum(relay) / total * 1e6
            if total:
                entry["machine_cpu_us_per_conn"] = sum(x["machine_cpu_s"] for x in rs) / total * 1e6
            summary.setdefault(tool, {})[name] = entry
    return {
        "duration_s": duration,
        "repeat": repeat,
        "concurrency": concurrency,
        "runs": runs,
        "summary": summary,
        "failures": failures,
    }


def _error_count(errors: dict[str, int]) -> int:
    return sum(errors.values())


def _wrk_conns(path: BenchPath, url: str, duration: float, concurrency: int) -> dict[str, Any]:
    result = clients.wrk(
        path, url, duration=duration, connections=concurrency, headers={"Connection": "close"}
    )
    result["connections"] = result["requests"] - result["errors"]["status"]
    result["conns_per_s"] = result["requests_per_s"]
    return result


def profiles(
    path: BenchPath, remote_ip: str, *, duration: float, concurrency: int, prefix: Path
) -> dict[str, Any]:
    """One throughput run each way and one wrk conns run on ``path``, under py-spy."""
    if not profiler.available() or path.relay_pid is None:
        return {"error": "py-spy not installed (pip install -e '.[bench]')"}
    url = f"http://{remote_ip}:{NGINX_PORT}/"
    runs: dict[str, Runner] = {
        "throughput-up": lambda: clients.stream(path, remote_ip, upload=True, duration=duration),
        "throughput-down": lambda: clients.stream(path, remote_ip, upload=False, duration=duration),
        "conns": lambda: _wrk_conns(path, url, duration, concurrency),
    }
    out = {}
    for name, run in runs.items():
        say(f"  profile {path.name} {name} (not measured)")
        output = prefix.with_name(f"{prefix.name}-{path.name}-{name}.txt")
        try:
            out[name] = profiler.profiled_run(
                run, pid=path.relay_pid, output=output, seconds=duration
            )
        except RunFailed as exc:
            out[name] = {"error": str(exc)}
    return out
