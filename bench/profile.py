"""Optional profiles of the egressd process (``--profile``), taken on extra runs.

py-spy samples the running ``egressd serve`` (``record --format raw``,
collapsed stacks, idle threads left out) while one more load run goes on.
Those runs are never the measured ones: sampling pauses the process. The raw
stacks are kept in ``bench/results/profiles/<stamp>-<name>.txt`` (open them
with speedscope or flamegraph.pl) and summarized in the results: the functions
with the most samples on top of the stack ("self") and on the stack at all
("total"), over the samples where the thread was working (a thread parked
in a lock or in epoll is counted apart, as waiting).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

PYSPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
# Leaf frames of threads that wait rather than work (py-spy counts some of them as active).
WAITS = frozenset(
    {
        "Condition.wait",
        "Event.wait",
        "Thread.join",
        "Thread._wait_for_tstate_lock",
        "EpollSelector.select",
        "_PollLikeSelector.select",
        "Queue.get",
        "_worker",
    }
)
_FRAME = re.compile(r"^(?P<func>.+?) \((?P<file>[^()]*?)(?::\d+)?\)$")


def available() -> bool:
    return Path(PYSPY).exists()


class Profiler:
    """``with Profiler(pid, out, seconds):`` samples ``pid`` while the block runs."""

    def __init__(self, pid: int, output: Path, seconds: float) -> None:
        self.pid, self.output, self.seconds = pid, output, seconds
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Profiler:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        argv = [PYSPY, "record", "-p", str(self.pid), "-f", "raw", "-r", "250"]
        argv += ["-d", str(int(self.seconds) + 1), "-o", str(self.output), "--nolineno"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout=self.seconds + 30)
        except subprocess.TimeoutExpired:
            self.proc.terminate()
            self.proc.wait(timeout=10)


def _label(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return f"{match['func']} ({match['file']})"


def summarize(raw: Path, top: int = 15) -> dict[str, Any]:
    """Top functions by self and total samples from py-spy's collapsed stacks."""
    if not raw.exists():
        return {"error": "no profile written"}
    own: Counter[str] = Counter()
    total: Counter[str] = Counter()
    samples = waiting = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_label(f) for f in stack.split(";")]
        if frames[-1].split(" (")[0] in WAITS:
            waiting += count  # a thread parked on a lock or in epoll: not work
            continue
        samples += count
        own[frames[-1]] += count
        for name in set(frames):
            total[name] += count

    def share(counter: Counter[str]) -> list[list[Any]]:
        return [[name, round(100 * n / samples, 1)] for name, n in counter.most_common(top)]

    return {
        "samples": samples,
        "waiting_samples": waiting,
        "file": raw.name,
        "self_pct": share(own) if samples else [],
        "total_pct": share(total) if samples else [],
    }


def profiled_run(run: Any, *, pid: int, output: Path, seconds: float) -> dict[str, Any]:
    """``run()`` once while py-spy samples ``pid``; its numbers are for context only."""
    with Profiler(pid, output, seconds):
        result = run()
    return {"run": result, "profile": summarize(output)}
