"""``python -m bench``: egressd against redsocks, dante and the routed path, side by side.

    .venv/bin/python -m bench                       # everything (make bench), ~12 min
    .venv/bin/python -m bench --quick               # smoke run: small N, 1 repeat, short runs
    .venv/bin/python -m bench --cases throughput,cpu --repeat 5 --duration 10
    .venv/bin/python -m bench --cases scale,api --scale 100,1000

Needs root (namespaces, nftables) and the Debian peers (``make setup``). One
benchmark at a time (a lock file says so). Everything the run creates --
namespaces, links, nft tables, processes, files -- is removed on exit,
also on failure and Ctrl-C / SIGTERM. See docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shutil
import signal
import sys
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import clients, report, say
from bench.cases import api as api_case
from bench.cases import datapath
from bench.cases import scale as scale_case
from bench.egressd import BenchEgressd, EgressdContainer
from bench.procs import ensure_sbin_on_path
from bench.topology import BenchPath, DirectContainer, RedsocksContainer, UpstreamSide

CASES = ("throughput", "conns", "cpu", "scale", "api")
REQUIRED = ("ip", "nft", "ss", "danted", "redsocks", "nginx")
LOCK = "/run/lock/egressd-bench.lock"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PROFILE_STARTS = 10  # extra starts under py-spy after the scale measurements


def _list(text: str, kind: type = str) -> list[Any]:
    return [kind(x) for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--scale", default="100,500,1000", help="container counts, grown in order")
    p.add_argument("--repeat", type=int, default=3, help="runs per path and direction")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per throughput run")
    p.add_argument("--conns-duration", type=float, help="seconds per conns run (--duration)")
    p.add_argument("--concurrency", type=int, default=16, help="connections in flight (conns)")
    p.add_argument("--api-duration", type=float, default=10.0)
    p.add_argument("--api-connections", type=int, default=16)
    p.add_argument(
        "--api-repeat", type=int, default=3, help="API windows; median (and worst) reported"
    )
    p.add_argument("--scale-deadline", type=float, default=900.0, help="bound of the scale case, s")
    p.add_argument("--readopt-timeout", type=float, default=300.0)
    p.add_argument("--redsocks-cap", type=int, default=100, help="idle redsocks started at most")
    p.add_argument(
        "--idle-duration", type=float, default=60.0, help="idle-CPU window at the largest N, s"
    )
    p.add_argument("--no-cross-check", action="store_true", help="skip iperf3 and wrk")
    p.add_argument("--no-doc", action="store_true", help="leave docs/BENCHMARKS.md alone")
    p.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the extra, unmeasured runs under py-spy",
    )
    p.add_argument(
        "--quick", action="store_true", help="smoke run: N=10,20, 1 repeat, 2 s runs, no profiles"
    )
    args = p.parse_args(argv)
    args.cases = _list(args.cases)
    unknown = set(args.cases) - set(CASES)
    if unknown:
        p.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    args.scale = _list(args.scale, int)
    if args.quick:
        args.scale, args.repeat, args.duration = [10, 20], 1, 2.0
        args.api_duration, args.redsocks_cap, args.no_doc = 3.0, 20, True
        args.readopt_timeout, args.profile, args.idle_duration = 60.0, False, 3.0
    args.conns_duration = args.conns_duration or args.duration
    if not (1 <= args.repeat <= 20 and 0.5 <= args.duration <= 60):
        p.error("--repeat in 1..20 and --duration in 0.5..60 s")
    if not 1 <= args.idle_duration <= 600:
        p.error("--idle-duration in 1..600 s")
    if not all(1 <= n <= 4096 for n in args.scale):
        p.error("--scale values in 1..4096")
    return args


def _on_signal(signum: int, _frame: object) -> None:
    """The first Ctrl-C / SIGTERM / SIGHUP unwinds the run; later ones must not cut the cleanup."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _while_cleaning)
    raise KeyboardInterrupt(f"signal {signum}")


def _while_cleaning(_signum: int, _frame: object) -> None:
    say("cleaning up, please wait")


def _preflight(args: argparse.Namespace) -> list[str]:
    if os.geteuid() != 0:
        raise SystemExit("bench: needs root (network namespaces, nftables)")
    missing = [tool for tool in REQUIRED if shutil.which(tool) is None]
    if missing:
        raise SystemExit(f"bench: missing {', '.join(missing)} (run `make setup`)")
    notes = []
    for tool in ("iperf3", "wrk"):
        if shutil.which(tool) is None:
            notes.append(f"{tool} missing: its cross-check is skipped")
    return notes


def run_datapath(args: argparse.Namespace, side: UpstreamSide, results: dict[str, Any]) -> None:
    with ExitStack() as stack:
        say("data path: direct, redsocks and egressd containers")
        direct = stack.enter_context(DirectContainer(side)).path()
        rs = stack.enter_context(RedsocksContainer(side)).path()
        ed = stack.enter_context(EgressdContainer(side)).path()
        dante = BenchPath("dante", None, side.dante_for("dante"), transparent=False)
        paths = [direct, dante, rs, ed]
        dante_pid = side.dante.process.pid
        for path in paths:  # each path must work before it is measured
            got = clients.conns(path, side.remote_ip, duration=0.3, concurrency=1)
            if not got["connections"] or got["errors"]:
                raise RuntimeError(f"path {path.name} does not work: {got}")
        iperf = not args.no_cross_check and shutil.which("iperf3") is not None
        wrk = not args.no_cross_check and shutil.which("wrk") is not None
        if "throughput" in args.cases or "cpu" in args.cases:
            say("throughput")
            tp_paths = paths if "throughput" in args.cases else [rs, ed]
            tp = datapath.throughput(
                tp_paths,
                side.remote_ip,
                dante_pid=dante_pid,
                repeat=args.repeat,
                duration=args.duration,
                with_iperf3=iperf and "throughput" in args.cases,
            )
            if "throughput" in args.cases:
                results["throughput"] = tp
            results["cpu"] = datapath.cpu_per_gb(tp)
            results["failures"] += tp["failures"]
        if "conns" in args.cases:
            say("connections per second")
            cs = datapath.connections(
                paths,
                side.remote_ip,
                dante_pid=dante_pid,
                repeat=args.repeat,
                duration=args.conns_duration,
                concurrency=args.concurrency,
                with_wrk=wrk,
            )
            results["conns"] = cs
            results["failures"] += cs["failures"]
        if args.profile:
            results["profiles"] = datapath.profiles(
                ed,
                side.remote_ip,
                duration=args.duration,
                concurrency=args.concurrency,
                prefix=_profile_prefix(results),
            )
        say("data path: cleaning up")


def run_fleet(args: argparse.Namespace, side: UpstreamSide, results: dict[str, Any]) -> None:
    stages = sorted(set(args.scale))
    with ExitStack() as stack:
        pool = stack.enter_context(scale_case.NetnsPool())
        server = stack.enter_context(BenchEgressd(containers=max(stages) + PROFILE_STARTS))
        fleet = scale_case.ScaleFleet(side, pool, server)

        def api() -> None:
            if "api" in args.cases and fleet.ids and server.alive():
                say(f"api: GET network at {len(fleet.ids)} containers")
                results["api"] = api_case.run_api(
                    server,
                    fleet.ids,
                    duration=args.api_duration,
                    connections=args.api_connections,
                    repeat=args.api_repeat,
                    profile_to=_profile_prefix(results) if args.profile else None,
                )

        scale = scale_case.run_scale(
            side,
            fleet,
            stages=stages,
            deadline=time.monotonic() + args.scale_deadline,
            readopt_timeout=args.readopt_timeout,
            redsocks_cap=args.redsocks_cap,
            measure="scale" in args.cases,
            at_largest=api,
            idle_s=args.idle_duration,
        )
        if "scale" in args.cases:
            results["scale"] = scale
            if args.profile and fleet.ids and server.alive():
                scale["profiles"] = scale_case.profiles(
                    fleet,
                    prefix=_profile_prefix(results),
                    extra=PROFILE_STARTS,
                    deadline=time.monotonic() + 120,
                )
        say(f"scale: cleaning up {len(pool.names)} namespaces")
        cleanup_started = time.monotonic()
    say(f"scale: cleaned up in {time.monotonic() - cleanup_started:.1f} s")


def _profile_prefix(results: dict[str, Any]) -> Path:
    stamp = results["started_at"].replace(":", "").replace("-", "")
    return report.RESULTS / "profiles" / stamp


def main(argv: list[str] | None = None) -> int:
    ensure_sbin_on_path()
    args = parse_args(argv)
    notes = _preflight(args)
    lock = open(LOCK, "w")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise SystemExit("bench: another benchmark is running (lock held)") from None
    for sig in STOP_SIGNALS:
        signal.signal(sig, _on_signal)
    results: dict[str, Any] = {
        "command": " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])]),
        "started_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": report.machine(),
        "config": {k: v for k, v in vars(args).items()},
        "failures": [],
        "notes": notes,
    }
    t0 = time.monotonic()
    try:
        return _run(args, results, t0)
    finally:
        os.unlink(LOCK)  # ours while we hold it; a waiting run fails fast (LOCK_NB)
        lock.close()


def _run(args: argparse.Namespace, results: dict[str, Any], t0: float) -> int:
    interrupted = False
    try:
        datapath_cases = {"throughput", "conns", "cpu"} & set(args.cases)
        with UpstreamSide(servers=bool(datapath_cases)) as side:
            say(f"upstream: dante on {side.dante_endpoint}, remote host {side.remote_ip}")
            if datapath_cases:
                run_datapath(args, side, results)
            if {"scale", "api"} & set(args.cases):
                run_fleet(args, side, results)
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: everything created was removed")
    except Exception as exc:
        results["failures"].append(f"aborted: {type(exc).__name__}: {exc}")
        say(f"aborted: {type(exc).__name__}: {exc}")
    results["wall_s"] = time.monotonic() - t0
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    measured = any(k in results for k in CASES)
    if measured and not interrupted:
        full = set(args.cases) == set(CASES)  # the doc shows whole runs only
        paths = report.write(results, update_doc=full and not args.no_doc)
        print(results["markdown"])
        say("wrote " + ", ".join(str(p) for p in paths.values()))
    return 130 if interrupted else (1 if results["failures"] and not measured else 0)


if __name__ == "__main__":
    sys.exit(main())
