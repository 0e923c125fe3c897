"""The plot: throughput and new connections per second by path (matplotlib, PNG)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PATHS = ["direct", "dante", "redsocks", "egressd"]
LABELS = {
    "direct": "direct (routed, no proxy)",
    "dante": "client straight to dante",
    "redsocks": "redsocks -> dante",
    "egressd": "egressd -> dante",
}


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tp, conns = results.get("throughput"), results.get("conns")
    if not tp and not conns:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    names = [p for p in PATHS]
    x = list(range(len(names)))
    if tp:
        ax = axes[0]
        med = tp["median_gbps"]
        series = [("loadgen", "up"), ("loadgen", "down"), ("iperf3", "up"), ("iperf3", "down")]
        series = [s for s in series if s[0] in med]
        width = 0.8 / len(series)
        for i, (tool, d) in enumerate(series):
            vals = [med[tool].get(p, {}).get(d) or 0 for p in names]
            bars = ax.bar([v + i * width for v in x], vals, width, label=f"{d} ({tool})")
            ax.bar_label(bars, labels=[f"{v:.1f}" if v else "" for v in vals], fontsize=6)
        ax.set_xticks([v + 0.4 - width / 2 for v in x], [LABELS[p] for p in names], fontsize=8)
        ax.set_ylabel("Gbit/s (median)")
        ax.set_title("Throughput, one TCP stream")
        ax.legend(fontsize=8)
    if conns:
        ax = axes[1]
        tools = [t for t in ("loadgen", "wrk") if t in conns["summary"]]
        width = 0.8 / len(tools)
        highest = 100.0
        for i, tool in enumerate(tools):
            vals = [conns["summary"][tool].get(p, {}).get("conns_per_s") or 0 for p in names]
            bars = ax.bar([v + i * width for v in x], vals, width, label=tool)
            ax.bar_label(bars, labels=[f"{v:.0f}" if v else "" for v in vals], fontsize=7)
            highest = max(highest, *vals)
        ax.set_yscale("log")
        ax.set_ylim(bottom=100, top=highest * 2.5)
        ax.set_xticks([v + 0.4 - width / 2 for v in x], [LABELS[p] for p in names], fontsize=8)
        ax.set_ylabel("connections / s (median, log scale)")
        ax.set_title(f"New connections ({conns['concurrency']} in flight, Connection: close)")
        ax.legend(fontsize=8)
    m = results["machine"]
    fig.suptitle(
        f"egressd vs peers, {m['nproc']} cores {m['cpu_model']}, {results['started_at']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
