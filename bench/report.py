"""Results: JSON, a markdown summary with the targets, and a plot.

``bench/results/<timestamp>.json`` (+ ``latest.json``) holds everything the
run measured, every single run included. The markdown summary goes to
``bench/results/<timestamp>.md`` and, between the ``bench:begin`` /
``bench:end`` markers, into ``docs/BENCHMARKS.md``. The plot (throughput and
connections/s by path) is ``bench/results/<timestamp>.png`` (+ ``latest.png``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from bench.machine import machine
from bench.plot import plot
from bench.procs import REPO
from bench.stats import ratio

__all__ = ["RESULTS", "machine", "markdown", "targets", "write"]

RESULTS = REPO / "bench" / "results"
DOC = REPO / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
PATHS = ["direct", "dante", "redsocks", "egressd"]
PATH_LABELS = {
    "direct": "a. direct (routed, no proxy)",
    "dante": "b. client straight to dante",
    "redsocks": "c. redsocks -> dante",
    "egressd": "d. egressd -> dante",
}
MB = 1e6


# --------------------------------------------------------------------------- targets


def _target(name: str, measured: float | None, *, op: str, limit: float, note: str = "") -> dict:
    met = None
    if measured is not None:
        met = measured >= limit if op == ">=" else measured <= limit
    return {
        "target": name,
        "measured": measured,
        "op": op,
        "limit": limit,
        "met": met,
        "note": note,
    }


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    tp = results.get("throughput")
    if tp:
        med = tp["median_gbps"]["loadgen"]
        for d in ("up", "down"):
            e, r, b = (med.get(p, {}).get(d) for p in ("egressd", "redsocks", "dante"))
            out.append(
                _target(f"throughput {d}: egressd / redsocks", ratio(e, r), op=">=", limit=1.2)
            )
            out.append(
                _target(
                    f"throughput {d}: egressd / straight to dante", ratio(e, b), op=">=", limit=0.9
                )
            )
    conns = results.get("conns")
    if conns:
        tool = "wrk" if "wrk" in conns["summary"] else "loadgen"
        s = conns["summary"][tool]
        e, r = (s.get(p, {}).get("conns_per_s") for p in ("egressd", "redsocks"))
        out.append(
            _target(f"conns/s: egressd / redsocks ({tool})", ratio(e, r), op=">=", limit=1.0)
        )
    cpu = results.get("cpu")
    if cpu:
        lg = cpu.get("loadgen", {})
        e = lg.get("egressd", {}).get("both", {}).get("relay_cpu_s_per_gb")
        r = lg.get("redsocks", {}).get("both", {}).get("relay_cpu_s_per_gb")
        out.append(_target("relay CPU per GB: egressd / redsocks", ratio(e, r), op="<=", limit=0.6))
    scale = results.get("scale")
    if scale and scale["stages"]:
        last = scale["stages"][-1]
        n = last["containers"]
        note = "" if n >= 1000 else f"measured at N={n}; the target is for 1000"
        mem = last.get("egressd_memory")
        if mem:
            out.append(
                _target(
                    "agent+relay RSS at N (MB)",
                    mem["rss_bytes"] / MB,
                    op="<=",
                    limit=200,
                    note=note,
                )
            )
        out.append(
            _target("start p50 (ms)", last["start_ms_all"]["p50"], op="<=", limit=100, note=note)
        )
        if "readopt" in last:
            out.append(
                _target(
                    "re-adopt all after restart (s)",
                    last["readopt"]["api_running_s"],
                    op="<=",
                    limit=30,
                    note=note,
                )
            )
    api = results.get("api")
    if api:
        n = api["containers"]
        note = "" if n >= 1000 else f"measured at N={n}; the target is for 1000"
        out.append(_target("API GET req/s", api["requests_per_s"], op=">=", limit=1500, note=note))
        worst = _worst_p99(api)
        spread = (
            ""
            if worst is None
            else f"median of {len(api['runs'])} windows; worst window {_f(worst)} ms"
        )
        p99_note = "; ".join(x for x in (note, spread) if x)
        out.append(_target("API GET p99 (ms)", api["p99_ms"], op="<=", limit=25, note=p99_note))
    return out


# --------------------------------------------------------------------------- markdown


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _worst_p99(api: dict[str, Any]) -> float | None:
    """The slowest window's p99 (a tail the median leaves out); None for a single window."""
    runs = api.get("runs") or []
    return max(run["latency_ms"]["p99"] for run in runs) if len(runs) > 1 else None


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def markdown(results: dict[str, Any], *, json_name: str, png_name: str | None) -> str:
    m = results["machine"]
    lines = [
        f"Run `{results['command']}` on {results['started_at']} "
        f"(egressd {m['egressd_commit']}, src digest {m.get('src_digest', '?')}); "
        f"raw data `bench/results/{json_name}`.",
        "",
        f"Machine: {m['nproc']} cores, {m['cpu_model']}, kernel {m['kernel']}, "
        f"{m['memory_gib']} GiB, {m['os']}, Python {m['python']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}, at the end "
        f"{', '.join(f'{x:.2f}' for x in m.get('loadavg_at_end', ()))}; the run took "
        f"{results.get('wall_s', 0) / 60:.1f} min. Peers: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".",
        "",
    ]
    lines += _targets_md(results["targets"])
    if png_name:
        lines += [
            f"![throughput and connections per second by path](../bench/results/{png_name})",
            "",
        ]
    tp = results.get("throughput")
    if tp:
        med = tp["median_gbps"]
        lines += [
            f"**Throughput**, one TCP stream, Gbit/s, median of {tp['repeat']} x "
            f"{tp['duration_s']:g} s (up = container -> remote):",
            "",
        ]
        rows = []
        machine = tp.get("machine_cpu_s_per_gb", {}).get("loadgen", {})  # older runs: none
        busy = tp.get("machine_busy_share", {}).get("loadgen", {})  # older runs: none
        for p in PATHS:
            lg = med["loadgen"].get(p)
            ip = med.get("iperf3", {}).get(p, {})
            mc = machine.get(p, {})
            share = {d: 100 * v for d, v in busy.get(p, {}).items()}
            if lg:
                rows.append(
                    [
                        PATH_LABELS[p],
                        _f(lg["up"]),
                        _f(lg["down"]),
                        _f(ip.get("up")),
                        _f(ip.get("down")),
                        _f(mc.get("up"), 3),
                        _f(mc.get("down"), 3),
                        _f(share.get("up"), 0),
                        _f(share.get("down"), 0),
                    ]
                )
        header = ["path", "up (loadgen)", "down (loadgen)", "up (iperf3)", "down (iperf3)"]
        header += ["machine CPU s/GB up", "down", "machine busy % up", "down"]
        lines += _table(header, rows)
        lines += [
            "Machine CPU: busy seconds of the whole machine (`/proc/stat`: every process "
            "and interrupt, clients and servers included) per GB moved in the loadgen runs; "
            "machine busy: the same seconds over wall time x cores (client start included).",
            "",
        ]
    cpu = results.get("cpu")
    if cpu:
        lines += [
            "**Relay CPU** (user+system of the relay process) per GB moved, loadgen runs:",
            "",
        ]
        rows = []
        for p in ("redsocks", "egressd"):
            e = cpu.get("loadgen", {}).get(p)
            if e:
                rows.append(
                    [
                        PATH_LABELS[p],
                        _f(e.get("up", {}).get("relay_cpu_s_per_gb"), 3),
                        _f(e.get("down", {}).get("relay_cpu_s_per_gb"), 3),
                        _f(e["both"]["relay_cpu_s_per_gb"], 3),
                        _f(e["both"]["dante_cpu_s_per_gb"], 3),
                    ]
                )
        lines += _table(["relay", "CPU s/GB up", "down", "both", "dante's CPU s/GB (both)"], rows)
    conns = results.get("conns")
    if conns:
        lines += [
            f"**New connections**, {conns['concurrency']} in flight, median of {conns['repeat']} x "
            f"{conns['duration_s']:g} s; latency = connect (+ SOCKS5) + GET + response + close:",
            "",
        ]
        rows = []
        for p in PATHS:
            lg = conns["summary"]["loadgen"].get(p)
            wk = conns["summary"].get("wrk", {}).get(p, {})
            if lg:
                cpu_k = wk.get("relay_cpu_ms_per_1k_conns", lg.get("relay_cpu_ms_per_1k_conns"))
                machine_us = wk.get("machine_cpu_us_per_conn", lg.get("machine_cpu_us_per_conn"))
                rows.append(
                    [
                        PATH_LABELS[p],
                        _f(lg["conns_per_s"], 0),
                        _f(lg["p50_ms"]),
                        _f(lg["p99_ms"]),
                        _f(wk.get("conns_per_s"), 0),
                        _f(wk.get("p50_ms")),
                        _f(wk.get("p99_ms")),
                        _f(cpu_k, 0),
                        _f(machine_us, 0),
                        str(lg["errors"] + wk.get("errors", 0)),
                    ]
                )
        header = [
            "path",
            "conn/s (loadgen)",
            "p50 ms",
            "p99 ms",
            "conn/s (wrk)",
            "p50 ms",
            "p99 ms",
            "relay CPU ms / 1k conns",
            "machine CPU us / conn",
            "errors",
        ]
        lines += _table(header, rows)
        lines += [
            "Relay and machine CPU per connection: from the wrk runs where there are, "
            "else from loadgen's.",
            "",
        ]
    scale = results.get("scale")
    if scale and scale["stages"]:
        lines += _scale_md(scale)
    api = results.get("api")
    if api:
        worst = _worst_p99(api)
        tail = "" if worst is None else f" (worst window {_f(worst)} ms)"
        lines += [
            f"**API** `GET /api/v1/containers/{{id}}/network` at {api['containers']} containers, "
            f"wrk 1 thread, {api['connections']} keep-alive connections, {api['duration_s']:g} s, "
            f"median of {len(api['runs'])}: **{_f(api['requests_per_s'], 0)} req/s**, p50 "
            f"{_f(api['p50_ms'])} ms, p99 {_f(api['p99_ms'])} ms{tail}, {api['errors']} errors.",
            "",
        ]
    lines += _profiles_md(results)
    if results.get("failures"):
        lines += ["Failures during the run:", ""] + [f"* {f}" for f in results["failures"]] + [""]
    return "\n".join(lines)


def _profiles_md(results: dict[str, Any]) -> list[str]:
    found = dict((results.get("profiles") or {}).items())
    for name, entry in ((results.get("scale") or {}).get("profiles") or {}).items():
        found[f"scale {name}"] = entry
    if (results.get("api") or {}).get("profile"):
        found["api"] = results["api"]["profile"]
    lines = []
    for name, entry in found.items():
        prof = entry.get("profile") if isinstance(entry, dict) else None
        if not prof or "self_pct" not in prof:
            continue
        top = ", ".join(f"`{fn}` {pct}%" for fn, pct in prof["self_pct"][:8])
        lines.append(
            f"* py-spy, egressd, {name} ({prof['samples']} samples, "
            f"`bench/results/profiles/{prof['file']}`): self time {top}"
        )
    return ["**Profiles** (extra runs, not measured):", "", *lines, ""] if lines else []


def _targets_md(items: list[dict[str, Any]]) -> list[str]:
    rows = []
    for t in items:
        verdict = "-" if t["met"] is None else ("**met**" if t["met"] else "**missed**")
        rows.append(
            [t["target"], _f(t["measured"]), f"{t['op']} {t['limit']:g}", verdict, t["note"]]
        )
    return _table(["target", "measured", "wanted", "", "note"], rows) if rows else []


def _scale_md(scale: dict[str, Any]) -> list[str]:
    lines = [
        "**Scale**: containers registered + configured + started one after the other; "
        "RSS of the one egressd process (API + agent + relay) against min(N, cap) idle "
        "redsocks processes, extrapolated linearly to N where capped:",
        "",
    ]
    rows = []
    base = scale["baseline"]["rss_bytes"] / MB
    for st in scale["stages"]:
        mem, ro, rs = (
            st.get("egressd_memory", {}),
            st.get("readopt", {}),
            st.get("redsocks_memory", {}),
        )
        rows.append(
            [
                str(st["containers"]),
                f"{_f(st['start_ms_all']['p50'], 0)} / {_f(st['start_ms_all']['p99'], 0)}",
                f"{_f(st['start_ms_stage']['p50'], 0)} / {_f(st['start_ms_stage']['p99'], 0)}",
                _f(st["stage_s"], 1),
                f"{_f(mem.get('rss_bytes', 0) / MB, 1)} (base {_f(base, 1)})",
                _f(mem.get("rss_growth_per_container_bytes", 0) / 1e3, 1),
                _f(ro.get("all_listeners_s"), 1),
                _f(ro.get("api_running_s"), 1)
                + (f" ({ro['not_running_at_end']} not)" if ro.get("not_running_at_end") else ""),
                _f(ro.get("all_observed_s"), 1),
                f"{_f(rs.get('rss_bytes', 0) / MB, 1)} / {_f(rs.get('pss_bytes', 0) / MB, 1)}"
                + (f" (x{rs['containers'] / rs['processes']:g})" if rs.get("extrapolated") else ""),
            ]
        )
    header = [
        "N",
        "start p50/p99 ms (all)",
        "(this stage)",
        "stage s",
        "egressd RSS MB",
        "growth kB/container",
        "re-adopt: all listeners s",
        "API: all running s",
        "all observed anew s",
        "N redsocks RSS / PSS MB",
    ]
    lines += _table(header, rows)
    for st in scale["stages"]:
        if "stop_start" in st:
            stop, again = st["stop_start"]["stop_ms"], st["stop_start"]["restart_ms"]
            lines += [
                f"Stop and start again at {st['containers']} containers ({stop['count']} "
                f"containers, one after the other): `POST stop` p50 {_f(stop['p50'], 0)} ms, "
                f"p99 {_f(stop['p99'], 0)} ms; `POST start` p50 {_f(again['p50'], 0)} ms, "
                f"p99 {_f(again['p99'], 0)} ms.",
                "",
            ]
    idle = [(st["containers"], st["idle_cpu"]) for st in scale["stages"] if "idle_cpu" in st]
    for n, cpu in idle:
        lines += [
            f"Idle at {n} containers (no request, no traffic, {_f(cpu['seconds'], 0)} s after "
            "a first resync: full resyncs every 30 s, upstream probes every 10 s): egressd used "
            f"{_f(cpu['cpu_s'], 2)} s of CPU (its own {_f(cpu.get('own_cpu_s'), 2)} s, the "
            f"processes it ran {_f(cpu.get('children_cpu_s'), 2)} s), "
            f"**{_f(cpu['percent_of_one_core'], 1)}% of one core**.",
            "",
        ]
    if scale.get("capped"):
        lines += ["The scale case hit its deadline before the last stage completed.", ""]
    if scale.get("failure_count"):
        lines += [
            f"{scale['failure_count']} container(s) failed to start: {scale['failures'][:3]}",
            "",
        ]
    return lines


# --------------------------------------------------------------------------- write


def write(results: dict[str, Any], *, update_doc: bool = True) -> dict[str, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = results["started_at"].replace(":", "").replace("-", "")
    results["targets"] = targets(results)
    json_path = RESULTS / f"{stamp}.json"
    png_path = RESULTS / f"{stamp}.png"
    has_plot = plot(results, png_path)
    if has_plot:
        shutil.copyfile(png_path, RESULTS / "latest.png")
    md = markdown(results, json_name=json_path.name, png_name=png_path.name if has_plot else None)
    results["markdown"] = md
    text = json.dumps(results, indent=1, default=str)
    json_path.write_text(text)
    (RESULTS / "latest.json").write_text(text)
    md_path = RESULTS / f"{stamp}.md"
    md_path.write_text(md + "\n")
    paths = {"json": json_path, "markdown": md_path}
    if has_plot:
        paths["plot"] = png_path
    if update_doc and DOC.exists():
        doc = DOC.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
        if pattern.search(doc):
            DOC.write_text(pattern.sub(lambda _: f"{BEGIN}\n{md}\n{END}", doc))
            paths["doc"] = DOC
    return paths


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.report RESULTS.json``: render a run again (JSON, markdown, plot, doc)."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python -m bench.report bench/results/<timestamp>.json")
    results = json.loads(Path(args[0]).read_text())
    paths = write(results, update_doc=True)
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
