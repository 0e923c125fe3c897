"""Scale: N containers started through the API, memory, re-adopt after a restart.

One ``egressd serve`` grows through the stages (e.g. 100, 500, 1000): the
harness creates a bare netns per container (``ip -batch``), then for each
one, one after the other, registers it (``POST /containers``), configures it
(``PATCH .../network``: socks5 to dante) and starts it (``POST .../start``,
which answers once the agent has applied and probed). At each stage:

* start time p50/p99 (the ``start`` call alone, of the containers added in
  that stage and of all so far) and the stage's wall time;
* RSS and PSS of the egressd process (API + agent + relay: one process),
  total and per container, against the same process with no container;
* at the largest N only: ``POST stop`` then ``POST start`` for
  ``STOP_START_COUNT`` containers, one after the other (each answers once
  the agent has acted), p50/p99 of each; then the CPU the idle daemon uses (``IDLE_S`` s, no
  request, no traffic: two full resyncs and six probe rounds, after the
  first resync that follows the growth), its own and that of the processes
  it ran, in percent of one core -- what holding N containers costs while
  nothing happens;
* re-adopt: SIGTERM, wait for exit, start again on the same data dir, then
  time until the kernel has all N relay listeners again, until the API
  reports every container ``running``, and until every container carries an
  observation newer than the restart (see :meth:`ScaleFleet.readopt`).

Beside it: min(N, cap) idle redsocks processes (the process-per-container
design), their RSS and PSS summed and extrapolated linearly to N.

Bounded: a stage stops adding containers when the case's deadline passes
(the result then says how many it reached), every wait has a timeout.
"""

from __future__ import annotations

import secrets
import signal
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import httpx
from tests.integration.peers import run

from bench import profile as profiler
from bench import say
from bench.egressd import BenchEgressd, network_config
from bench.peers import RedsocksFleet
from bench.procs import cpu_seconds
from bench.stats import percentile
from bench.topology import UpstreamSide
from egressd.client import ApiError, Client


class NetnsPool:
    """Bare named namespaces ``egt-s<tag>-<i>``, created in batches, deleted on exit."""

    def __init__(self) -> None:
        self.tag = secrets.token_hex(3)
        self.names: list[str] = []

    def grow(self, count: int) -> list[str]:
        new = [f"egt-s{self.tag}-{i:05d}" for i in range(len(self.names), count)]
        self.names.extend(new)  # before: a failed batch may have created some
        if new:
            run(["ip", "-batch", "-"], stdin="".join(f"netns add {n}\n" for n in new), timeout=300)
        return new

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.names:
            script = "".join(f"netns del {n}\n" for n in self.names)
            run(["ip", "-force", "-batch", "-"], stdin=script, check=False, timeout=600)


class ScaleFleet:
    """The growing set of containers of one egressd; see the module docstring."""

    def __init__(self, side: UpstreamSide, pool: NetnsPool, server: BenchEgressd) -> None:
        self.side, self.pool, self.server = side, pool, server
        self.ids: list[str] = []
        self.start_ms: list[float] = []
        self.failures: list[str] = []
        self.config = network_config(side)

    def container_id(self, index: int) -> str:
        # egressd names the bridge after the first 12 hex digits: keep those unique.
        return f"{self.pool.tag}{index:06x}{secrets.token_hex(6)}"

    def grow(self, count: int, *, deadline: float) -> dict[str, Any]:
        """Add containers until ``count`` run (or the deadline passes)."""
        first = len(self.pool.names)
        t0 = time.monotonic()
        names = self.pool.grow(first + count - len(self.ids))
        netns_s = time.monotonic() - t0
        register_ms: list[float] = []
        stage_start_ms: list[float] = []
        with self.server.client(timeout=60) as c:
            for offset, name in enumerate(names):
                if time.monotonic() > deadline:
                    say(f"  scale: deadline reached at {len(self.ids)} containers")
                    break
                cid = self.container_id(first + offset)
                t1 = time.monotonic()
                try:
                    self.server.register(c, container_id=cid, netns=name)
                    c.containers.update_network_config(id=cid, data=self.config)
                    t2 = time.monotonic()
                    answer = c.containers.start_network(id=cid)
                    t3 = time.monotonic()
                except (ApiError, httpx.HTTPError) as exc:
                    self.failures.append(f"{cid}: {type(exc).__name__}: {exc}")
                    continue
                if answer.get("status") != "running":
                    self.failures.append(f"{cid}: start answered {answer.get('status')}")
                    continue
                self.ids.append(cid)
                register_ms.append((t2 - t1) * 1000)
                stage_start_ms.append((t3 - t2) * 1000)
                if len(self.ids) % 100 == 0:
                    say(f"  scale: {len(self.ids)} running (last start {(t3 - t2) * 1000:.0f} ms)")
        self.start_ms += stage_start_ms
        return {
            "added": len(stage_start_ms),
            "netns_create_s": netns_s,
            "stage_s": time.monotonic() - t0,
            "register_configure_ms": _pcts(register_ms),
            "start_ms_stage": _pcts(stage_start_ms),
            "start_ms_all": _pcts(self.start_ms),
        }

    def stop_start(self, count: int) -> dict[str, Any]:
        """``POST stop`` then ``POST start`` again for ``count`` containers, one at a time.

        Both answer once the agent has acted (stop: enforcement removed and
        the container's routes restored); the fleet is whole again afterwards.
        """
        stop_ms: list[float] = []
        restart_ms: list[float] = []
        with self.server.client(timeout=60) as c:
            for cid in self.ids[:count]:
                try:
                    t0 = time.monotonic()
                    stopped = c.containers.stop_network(id=cid)
                    t1 = time.monotonic()
                    started = c.containers.start_network(id=cid)
                    t2 = time.monotonic()
                except (ApiError, httpx.HTTPError) as exc:
                    self.failures.append(f"{cid}: stop/start: {type(exc).__name__}: {exc}")
                    continue
                if stopped.get("status") != "stopped" or started.get("status") != "running":
                    self.failures.append(
                        f"{cid}: stop answered {stopped.get('status')}, "
                        f"start {started.get('status')}"
                    )
                    continue
                stop_ms.append((t1 - t0) * 1000)
                restart_ms.append((t2 - t1) * 1000)
        return {"stop_ms": _pcts(stop_ms), "restart_ms": _pcts(restart_ms)}

    def memory(self, baseline: dict[str, Any]) -> dict[str, Any]:
        time.sleep(1.0)  # let the last allocations settle
        stats = self.server.stats()
        n = max(len(self.ids), 1)
        return {
            **stats,
            "rss_per_container_bytes": stats["rss_bytes"] / n,
            "rss_growth_per_container_bytes": (stats["rss_bytes"] - baseline["rss_bytes"]) / n,
            "pss_per_container_bytes": stats["pss_bytes"] / n,
            "relay_listeners": self.server.listener_count(),
        }

    def readopt(self, *, timeout: float) -> dict[str, Any]:
        """SIGTERM, start again, until every container is served again (bounded).

        Three moments, from the new process's start: every relay listener is
        back in the kernel (``all_listeners_s``: traffic flows again; the
        walls are checked before a listener opens); the API then says
        ``running`` for every container (``api_running_s``); and every
        container carries an observation newer than the restart
        (``all_observed_s``: egressd adopts without writing status, so this
        waits for its first probe round).
        """
        n = len(self.ids)
        exit_s = self.server.stop(signal.SIGTERM, timeout=60)
        t0 = time.monotonic()
        restarted_at = datetime.now(UTC)
        api_s = self.server.start()
        moments: dict[str, float | None] = dict.fromkeys(
            ("all_listeners_s", "api_running_s", "all_observed_s")
        )
        not_running, stale = set(self.ids), set(self.ids)
        deadline = t0 + timeout
        with self.server.client(timeout=30) as c:
            while time.monotonic() < deadline and moments["all_observed_s"] is None:
                if moments["all_listeners_s"] is None:
                    if self.server.listener_count() >= n:
                        moments["all_listeners_s"] = time.monotonic() - t0
                else:
                    # Only now ask the API about each: the sweep shares the agent's process.
                    views = {cid: _network(c, cid) for cid in not_running | stale}
                    not_running = {cid for cid in not_running if not _running(views[cid])}
                    stale = {cid for cid in stale if not _observed_since(views[cid], restarted_at)}
                    if not not_running and moments["api_running_s"] is None:
                        moments["api_running_s"] = time.monotonic() - t0
                    if not stale and not not_running:
                        moments["all_observed_s"] = time.monotonic() - t0
                time.sleep(0.2)
        return {
            "containers": n,
            "sigterm_to_exit_s": exit_s,
            "api_up_s": api_s,
            **moments,
            "not_running_at_end": len(not_running),
            "not_observed_at_end": len(stale),
            "timeout_s": timeout,
        }


def _network(c: Client, cid: str) -> dict[str, Any]:
    try:
        return c.containers.get_network_config(id=cid)
    except (ApiError, httpx.HTTPError):
        return {}


def _running(view: dict[str, Any]) -> bool:
    return view.get("status") == "running" and bool(
        (view.get("remote_status") or {}).get("is_running")
    )


def _observed_since(view: dict[str, Any], since: datetime) -> bool:
    last = (view.get("remote_status") or {}).get("last_check")
    if not last:
        return False
    seen = datetime.fromisoformat(last.replace("Z", "+00:00"))
    return seen >= since.replace(microsecond=since.microsecond // 1000 * 1000)


def _pcts(values: list[float]) -> dict[str, float | int]:
    return {
        "count": len(values),
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": max(values) if values else 0.0,
        "total_s": sum(values) / 1000,
    }


STOP_START_COUNT = 20  # containers stopped and started again at the largest N
IDLE_S = 60.0  # two resync periods (30 s), six probe rounds (10 s)
# Not measured: the first full resync after the stage grew (it lists every wall
# once; afterwards only a changed ruleset is listed again), i.e. the steady state.
IDLE_WARMUP_S = 35.0


def idle_cpu(
    server: BenchEgressd, seconds: float = IDLE_S, warmup: float = IDLE_WARMUP_S
) -> dict[str, float]:
    """CPU of the daemon over ``seconds`` with nothing asked of it.

    Its own and that of the processes it ran meanwhile (``nft``):
    those are part of what the daemon costs.
    """
    time.sleep(warmup)
    own0, all0 = cpu_seconds(server.pid), cpu_seconds(server.pid, with_reaped_children=True)
    t0 = time.monotonic()
    time.sleep(seconds)
    wall = time.monotonic() - t0
    own = cpu_seconds(server.pid) - own0
    total = cpu_seconds(server.pid, with_reaped_children=True) - all0
    return {
        "seconds": wall,
        "cpu_s": total,
        "own_cpu_s": own,
        "children_cpu_s": max(0.0, total - own),  # both from one clock-tick count
        "percent_of_one_core": 100 * total / wall,
    }


def redsocks_memory(side: UpstreamSide, n: int, cap: int) -> dict[str, Any]:
    count = min(n, cap)
    with RedsocksFleet(count, upstream=side.dante_endpoint) as fleet:
        mem = fleet.memory()
    scale = n / count
    return {
        "processes": count,
        "containers": n,
        "extrapolated": count != n,
        "rss_bytes_measured": mem["rss_bytes"],
        "pss_bytes_measured": mem["pss_bytes"],
        "rss_bytes": mem["rss_bytes"] * scale,
        "pss_bytes": mem["pss_bytes"] * scale,
        "rss_per_process_bytes": mem["rss_bytes"] / count,
        "pss_per_process_bytes": mem["pss_bytes"] / count,
    }


def run_scale(
    side: UpstreamSide,
    fleet: ScaleFleet,
    *,
    stages: list[int],
    deadline: float,
    readopt_timeout: float,
    redsocks_cap: int,
    measure: bool = True,
    at_largest: Callable[[], None] | None = None,
    idle_s: float = IDLE_S,
) -> dict[str, Any]:
    """Grow ``fleet`` through ``stages``; with ``measure`` False only grow (for the API case).

    ``at_largest`` runs once the last stage is grown and weighed, before its
    restart: the API case, so that it meets the daemon in its steady state.
    """
    baseline = fleet.server.stats()
    out: dict[str, Any] = {"baseline": baseline, "stages": [], "capped": False}
    ordered = sorted(set(stages))
    for n in ordered:
        say(f"scale: growing to {n} containers")
        grown = fleet.grow(n, deadline=deadline)
        reached = len(fleet.ids)
        stage: dict[str, Any] = {"target": n, "containers": reached, **grown}
        if reached < n:
            out["capped"] = True
        last = n == ordered[-1] or reached < n
        if measure:
            stage["egressd_memory"] = fleet.memory(baseline)
            say(
                f"  {reached} running: start p50 {grown['start_ms_stage']['p50']:.0f} ms "
                f"p99 {grown['start_ms_stage']['p99']:.0f} ms, egressd RSS "
                f"{stage['egressd_memory']['rss_bytes'] / 2**20:.0f} MiB"
            )
        if measure and last:
            stage["stop_start"] = fleet.stop_start(STOP_START_COUNT)
            say(
                f"  stop p50 {stage['stop_start']['stop_ms']['p50']:.0f} ms, start again p50 "
                f"{stage['stop_start']['restart_ms']['p50']:.0f} ms"
            )
            # A short (smoke) run skips the warm-up: it shows the code path, not the number.
            warmup = IDLE_WARMUP_S if idle_s >= IDLE_S else 0.0
            stage["idle_cpu"] = idle_cpu(fleet.server, idle_s, warmup)
            say(f"  idle: {stage['idle_cpu']['percent_of_one_core']:.1f}% of one core")
        if last and at_largest is not None:
            at_largest()
        if measure:
            stage["readopt"] = fleet.readopt(timeout=readopt_timeout)
            say(f"  re-adopt: {stage['readopt']}")
            stage["redsocks_memory"] = redsocks_memory(side, reached, redsocks_cap)
        out["stages"].append(stage)
        if reached < n:
            break
    out["failures"] = fleet.failures[:20]
    out["failure_count"] = len(fleet.failures)
    return out


def profiles(fleet: ScaleFleet, *, prefix: Path, extra: int, deadline: float) -> dict[str, Any]:
    """After the measurements: ``extra`` more starts, then one restart, under py-spy."""
    if not profiler.available():
        return {"error": "py-spy not installed (pip install -e '.[bench]')"}
    out: dict[str, Any] = {}
    n = len(fleet.ids)
    say(f"  profile: {extra} more starts at {n} containers (not measured)")
    output = prefix.with_name(f"{prefix.name}-scale-start.txt")
    with profiler.Profiler(fleet.server.pid, output, seconds=15):
        grown = fleet.grow(n + extra, deadline=deadline)
    out["start"] = {"run": grown["start_ms_stage"], "profile": profiler.summarize(output)}
    say(f"  profile: restart at {len(fleet.ids)} containers (not measured)")
    output = prefix.with_name(f"{prefix.name}-scale-readopt.txt")
    fleet.server.stop(signal.SIGTERM, timeout=60)
    fleet.server.start()
    with profiler.Profiler(fleet.server.pid, output, seconds=15):
        time.sleep(15)
    out["readopt"] = {"profile": profiler.summarize(output)}
    return out
