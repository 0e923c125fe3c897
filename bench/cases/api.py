"""API: ``GET /api/v1/containers/{id}/network`` under load, at N containers.

wrk (C, one thread, ``connections`` keep-alive connections) from the host
netns to the API on 127.0.0.1, for ``duration`` s per run; a Lua ``request()``
walks through every container id in turn and the admin token goes in the
``Authorization`` header. A non-2xx answer counts as an error, not as a
request served. The agent keeps doing what it does at that size meanwhile
(upstream probes every 10 s, the full resync every 30 s): the numbers are
those of a live daemon, not of an idle API.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench import clients, say
from bench import profile as profiler
from bench.egressd import BenchEgressd
from bench.procs import cpu_seconds
from bench.stats import median


def _lua(ids: list[str]) -> str:
    return (
        f"local ids = {json.dumps(ids).replace('[', '{').replace(']', '}')}\n"
        "local i = 0\n"
        "request = function()\n"
        "  i = i % #ids + 1\n"
        '  return wrk.format("GET", "/api/v1/containers/" .. ids[i] .. "/network")\n'
        "end\n"
    )


def run_api(
    server: BenchEgressd,
    ids: list[str],
    *,
    duration: float,
    connections: int,
    repeat: int,
    profile_to: Path | None = None,
) -> dict[str, Any]:
    with server.client() as c:  # warm-up and a sanity check of the answer
        got = c.containers.get_network_config(id=ids[0])
        assert got["container_id"] == ids[0], got

    def one() -> dict[str, Any]:
        return clients.wrk(
            None,
            server.url + "/",
            duration=duration,
            connections=connections,
            lua_prelude=_lua(ids),
            headers={"Authorization": f"Bearer {server.token}"},
        )

    runs = []
    for r in range(repeat):
        cpu0 = cpu_seconds(server.pid)
        result = one()
        result["egressd_cpu_s"] = cpu_seconds(server.pid) - cpu0
        runs.append(result)
        say(
            f"  api #{r + 1}: {result['requests_per_s']:.0f} req/s, "
            f"p50 {result['latency_ms']['p50']:.1f} ms, p99 {result['latency_ms']['p99']:.1f} ms, "
            f"errors {result['errors']}"
        )
    profile = None
    if profile_to is not None and profiler.available():
        say("  api: one more run under py-spy (not measured)")
        output = profile_to.with_name(profile_to.name + "-api.txt")
        profile = profiler.profiled_run(one, pid=server.pid, output=output, seconds=duration)
    return {
        "profile": profile,
        "containers": len(ids),
        "connections": connections,
        "duration_s": duration,
        "runs": runs,
        "requests_per_s": median([x["requests_per_s"] for x in runs]),
        "p50_ms": median([x["latency_ms"]["p50"] for x in runs]),
        "p99_ms": median([x["latency_ms"]["p99"] for x in runs]),
        "errors": sum(sum(x["errors"].values()) for x in runs),
    }
