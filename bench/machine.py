"""What the results say about the machine and the code they were measured on."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

from bench.procs import REPO


def _first_line(argv: list[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "missing"
    result = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10)
    text = (result.stdout + result.stderr).strip()
    return text.splitlines()[0] if text else "?"


def _dpkg_version(package: str) -> str:
    return _first_line(["dpkg-query", "-W", "-f", "${Version}", package])


def src_digest() -> str:
    """sha256 over src/ as it is on disk (commit + uncommitted changes), 12 hex."""
    digest = hashlib.sha256()
    for path in sorted((REPO / "src").rglob("*.py")):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    commit = _first_line(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"])
    dirty = _first_line(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"])
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu,
        "kernel": platform.release(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "os": _first_line(["sh", "-c", ". /etc/os-release && echo $PRETTY_NAME"]),
        "python": platform.python_version(),
        "egressd_commit": commit + (" (src/ modified)" if dirty not in ("", "?") else ""),
        "src_digest": src_digest(),
        "versions": {
            "dante-server": _dpkg_version("dante-server"),
            "redsocks": _dpkg_version("redsocks"),
            "nginx-light": _dpkg_version("nginx-light"),
            "iperf3": _dpkg_version("iperf3"),
            "wrk": _dpkg_version("wrk"),
        },
        "loadavg_at_start": os.getloadavg(),
    }
