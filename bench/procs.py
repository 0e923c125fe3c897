"""Processes the benchmark starts, and what /proc says about any process.

Every program is started as our child in a new session (so its process group
id is its PID) and stopped by that PID: SIGTERM to the group, then SIGKILL
after a grace period. Nothing is ever looked up or killed by name.

CPU time and memory come from /proc: ``utime + stime`` of ``/proc/<pid>/stat``
(all threads of the process), ``VmRSS`` of ``/proc/<pid>/status`` and ``Pss``
of ``/proc/<pid>/smaps_rollup``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from contextlib import suppress
from pathlib import Path
from typing import Self

from tests.integration.peers import Netns

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
REPO = Path(__file__).resolve().parent.parent
# Never let a proxy from the environment near our traffic.
CLEAN_ENV = {
    k: v
    for k, v in os.environ.items()
    if not k.lower().endswith("_proxy") and k.lower() not in {"no_proxy", "curl_ca_bundle"}
}


def ensure_sbin_on_path() -> None:
    """Root's tools live in sbin, which a non-login shell's PATH may lack."""
    parts = os.environ.get("PATH", "").split(os.pathsep)
    for sbin in ("/usr/local/sbin", "/usr/sbin", "/sbin"):
        if sbin not in parts:
            parts.append(sbin)
    os.environ["PATH"] = CLEAN_ENV["PATH"] = os.pathsep.join(parts)


def _stat_fields(pid: int) -> list[str]:
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pid: int, *, with_reaped_children: bool = False) -> float:
    """User + system CPU seconds of ``pid`` (all its threads) so far."""
    fields = _stat_fields(pid)
    ticks = int(fields[11]) + int(fields[12])  # utime, stime
    if with_reaped_children:
        ticks += int(fields[13]) + int(fields[14])  # cutime, cstime
    return ticks / CLOCK_TICKS


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, any process or interrupt).

    ``/proc/stat``'s first line: user nice system idle iowait irq softirq steal guest
    guest_nice; guest time is already counted in user, idle and iowait are not busy.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError, ValueError, IndexError):
                parents.setdefault(int(_stat_fields(int(entry.name))[1]), []).append(
                    int(entry.name)
                )
    found: list[int] = []
    frontier = [pid]
    while frontier:
        for child in parents.get(frontier.pop(), []):
            found.append(child)
            frontier.append(child)
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU of ``pid``, the children it reaped and its live descendants (a forking server)."""
    total = cpu_seconds(pid, with_reaped_children=True)
    for child in descendants(pid):
        with suppress(OSError, ValueError, IndexError):
            total += cpu_seconds(child)
    return total


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def rss_bytes(pid: int) -> int:
    return _status_kib(pid, "VmRSS") * 1024


def pss_bytes(pid: int) -> int:
    """Proportional set size: shared pages divided among the processes sharing them."""
    with suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def thread_count(pid: int) -> int:
    return _status_kib(pid, "Threads")


class BenchProcess:
    """A program run as our child (in ``ns`` or the host netns), stopped by PID and group."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        ns: Netns | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self.ns = ns
        full = ns.argv(self.argv) if ns is not None else self.argv
        with log_path.open("ab") as log:
            # `ip netns exec` execs the program after setns(): the PID is the program's.
            self.proc = subprocess.Popen(
                full,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env if env is not None else CLEAN_ENV,
                cwd=cwd,
                start_new_session=True,
            )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, *, grace: float = 5.0) -> None:
        """SIGTERM to our process group, SIGKILL after ``grace``; reaps the child."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            # The group outlives its leader while forked children remain in it.
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                self.proc.poll()
                if self.proc.returncode is not None and not _group_alive(self.pid):
                    return
                time.sleep(0.02)
        self.proc.poll()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group of zombies still "exists"; only live members count.
    for pid in (int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()):
        with suppress(OSError, ValueError, IndexError):
            fields = _stat_fields(pid)
            if int(fields[3]) == pgid and fields[0] != "Z":
                return True
    return False


def wait_listening(
    ns: Netns | None, ip: str, port: int, *, proc: BenchProcess | None, timeout: float = 10.0
) -> None:
    """Until something in ``ns`` listens on ip:port (no traffic is sent)."""
    wanted = {f"{ip}:{port}", f"0.0.0.0:{port}", f"*:{port}"}
    deadline = time.monotonic() + timeout
    argv = ["ss", "-Hltn"] if ns is None else ["ss", "-N", ns.name, "-Hltn"]
    while time.monotonic() < deadline:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.argv[0]} exited {proc.proc.returncode}:\n{proc.output()}")
        out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=10).stdout
        if wanted & set(out.split()):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {ip}:{port}")
