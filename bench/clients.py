"""Run one bounded measurement on one path and parse what the tool printed.

* :func:`stream` / :func:`conns` -- ``bench.loadgen`` (all four paths);
* :func:`iperf3` -- iperf3's JSON, receiver side (transparent paths only);
* :func:`wrk` -- wrk with a Lua ``done()`` that prints a JSON summary
  (transparent paths and the API).

Each runs as a process in the path's namespace with a hard timeout of the
run's duration plus a margin; a run that fails raises :class:`RunFailed`
with the tool's output.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from typing import Any

from bench.procs import CLEAN_ENV, REPO
from bench.topology import IPERF3_PORT, NGINX_PORT, STREAM_PORT, BenchPath

MARGIN = 30.0


class RunFailed(RuntimeError):
    pass


def _run(path: BenchPath | None, argv: list[str], *, timeout: float) -> str:
    full = path.ns.argv(argv) if path is not None and path.ns is not None else argv
    try:
        result = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=CLEAN_ENV,
            cwd=REPO,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise RunFailed(f"{argv[0]} timed out after {timeout}s") from exc
    if result.returncode != 0:
        raise RunFailed(f"{' '.join(argv)} exited {result.returncode}: {result.stderr[-2000:]}")
    return result.stdout


def _loadgen(path: BenchPath, args: list[str], duration: float) -> dict[str, Any]:
    argv = [sys.executable, "-m", "bench.loadgen", *args]
    if path.socks is not None:
        argv += ["--socks", f"{path.socks[0]}:{path.socks[1]}"]
    out = _run(path, argv, timeout=duration + MARGIN)
    return dict(json.loads(out.strip().splitlines()[-1]))


def stream(path: BenchPath, remote_ip: str, *, upload: bool, duration: float) -> dict[str, Any]:
    mode = "up" if upload else "down"
    args = ["stream", "--target", f"{remote_ip}:{STREAM_PORT}", "--mode", mode]
    return _loadgen(path, [*args, "--duration", str(duration)], duration)


def conns(path: BenchPath, remote_ip: str, *, duration: float, concurrency: int) -> dict[str, Any]:
    args = ["conns", "--target", f"{remote_ip}:{NGINX_PORT}", "--duration", str(duration)]
    return _loadgen(path, [*args, "--concurrency", str(concurrency)], duration)


def iperf3(path: BenchPath, remote_ip: str, *, upload: bool, duration: float) -> dict[str, Any]:
    argv = ["iperf3", "-c", remote_ip, "-p", str(IPERF3_PORT), "-t", str(duration), "-J"]
    argv += ["--connect-timeout", "10000"]
    if not upload:
        argv.append("-R")
    report = json.loads(_run(path, argv, timeout=duration + MARGIN))
    if "error" in report:
        raise RunFailed(f"iperf3: {report['error']}")
    received = report["end"]["sum_received"]
    return {
        "bytes": int(received["bytes"]),
        "seconds": float(received["seconds"]),
        "gbps": float(received["bits_per_second"]) / 1e9,
        "retransmits": report["end"].get("sum_sent", {}).get("retransmits"),
    }


_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"requests": %d, "duration_us": %d, "bytes": %d, '
    .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
    .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "max": %d, "mean": %.1f}}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.max, latency.mean))
end
"""


def wrk(
    path: BenchPath | None,
    url: str,
    *,
    duration: float,
    connections: int,
    threads: int = 1,
    lua_prelude: str = "",
    headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    """wrk for ``duration`` s; ``lua_prelude`` may define ``request``/``init``."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="egt-wrk-", delete=True) as f:
        f.write(lua_prelude + _WRK_DONE)
        f.flush()
        argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration:g}s"]
        argv += ["--timeout", "5s", "-s", f.name]
        for key, value in (headers or {}).items():
            argv += ["-H", f"{key}: {value}"]
        out = _run(path, [*argv, url], timeout=duration + MARGIN)
    line = next(ln for ln in reversed(out.splitlines()) if ln.startswith("{"))
    summary: dict[str, Any] = json.loads(line)
    seconds = summary["duration_us"] / 1e6
    ok = summary["requests"] - summary["errors"]["status"]
    summary["seconds"] = seconds
    summary["requests_per_s"] = ok / seconds if seconds > 0 else 0.0
    summary["latency_ms"] = {k: v / 1000 for k, v in summary.pop("latency_us").items()}
    return summary
