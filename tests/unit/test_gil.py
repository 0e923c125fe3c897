"""Background loops pause for the event loop after a burst of CPU, never on the loop itself."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from egressd import gil


def spin(seconds: float) -> None:
    """Burn this thread's CPU (not wall) time."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def in_new_thread(work: Callable[[], object]) -> object:
    """Run ``work()`` in a fresh thread (fresh thread-local count) and return its result."""
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(work()))
    thread.start()
    thread.join(10)
    return result[0]


def pauses_over(steps: int, step: Callable[[], None]) -> int:
    """Call ``breathe()`` after each of ``steps`` calls of ``step``; how many times it paused."""
    paused = 0
    gil.breathe()  # starts the count
    for _ in range(steps):
        step()
        paused += gil.breathe()
    return paused


class FakeCpu:
    """A CPU clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def run(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def pauses(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The pauses breathe() asked for, instead of sleeping them (only gil's own sleep)."""
    asked: list[float] = []
    monkeypatch.setattr(gil, "_sleep", asked.append)
    return asked


def test_a_computing_thread_pauses_once_per_burst(
    pauses: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = FakeCpu()
    monkeypatch.setattr(gil, "_cpu_time", cpu)
    # Steps of 0.4 bursts: a pause after the 3rd and the 6th (1.2 bursts each time).
    assert in_new_thread(lambda: pauses_over(7, lambda: cpu.run(0.4 * gil.BURST_S))) == 2
    assert pauses == [gil.PAUSE_S, gil.PAUSE_S]


def test_a_thread_that_waits_instead_of_computing_never_pauses(pauses: list[float]) -> None:
    """Wall time spent off the CPU (the kernel, a subprocess, a lock) is not a burst."""
    assert in_new_thread(lambda: pauses_over(5, lambda: time.sleep(gil.BURST_S))) == 0
    assert pauses == []


def test_an_event_loop_thread_never_pauses(
    pauses: list[float], monkeypatch: pytest.MonkeyPatch
) -> None:
    cpu = FakeCpu()
    monkeypatch.setattr(gil, "_cpu_time", cpu)

    async def on_the_loop() -> int:
        return pauses_over(5, lambda: cpu.run(gil.BURST_S))

    assert in_new_thread(lambda: asyncio.run(on_the_loop())) == 0
    assert pauses == []


def test_the_pause_lets_a_waiting_thread_run() -> None:
    """What the pause is for: a thread waiting for the GIL runs during it.

    Two CPU-bound Python threads: the waiter records each time it ran; the
    worker, breathing, must see the waiter's count move across one pause.
    """
    stop = threading.Event()
    ran = [0]

    def waiter() -> None:
        while not stop.is_set():
            ran[0] += 1

    thread = threading.Thread(target=waiter)
    thread.start()
    try:

        def work() -> bool:
            gil.breathe()
            spin(gil.BURST_S)
            before = ran[0]
            # breathe() sleeps PAUSE_S with the GIL released: the waiter runs.
            assert gil.breathe()
            return ran[0] > before

        assert in_new_thread(work)
    finally:
        stop.set()
        thread.join(10)
