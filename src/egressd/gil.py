"""Long loops in background threads let the event loop have the GIL now and then.

``egressd serve`` runs its event loop (the API and the relay) in one
interpreter with the agent's threads. CPython gives the GIL to a waiting
thread only after the switch interval, and the loop gives it up at every
system call (each send, receive and SQLite step): beside a thread that
computes, the loop waits for the GIL after nearly every system call and gets
a small share of the interpreter. At 1000 containers, each time the agent
listed its containers (50-100 ms of Python) the API's loop stood still for
about as long (docs/BENCHMARKS.md). A lower switch interval does not help:
both threads then pay for the switches.

:func:`breathe` is called once per item (or per batch) by such loops. Once the calling
thread has spent :data:`BURST_S` of CPU since its last pause, it sleeps
:data:`PAUSE_S`, during which the loop runs alone. The count is CPU time
(``time.thread_time``), so a loop that mostly waits for the kernel (GIL
released) never pauses. On a thread that runs an event loop it does nothing:
there a pause would stop the very thing it is meant to let run.

Concurrency model: per thread (the counter is thread-local); no locks.
"""

from __future__ import annotations

import asyncio
import threading
import time

BURST_S = 0.002  # CPU a background thread spends between two pauses
PAUSE_S = 0.001  # the loop's turn

_last_pause = threading.local()
# Looked up at each call, so that tests can drive them without patching the time module.
_cpu_time = time.thread_time
_sleep = time.sleep


def breathe() -> bool:
    """Pause :data:`PAUSE_S` if this thread computed :data:`BURST_S` since its last pause.

    Returns whether it paused.
    """
    now = _cpu_time()
    since: float | None = getattr(_last_pause, "cpu", None)
    if since is None:
        _last_pause.cpu = now
        return False
    if now - since < BURST_S:
        return False
    _last_pause.cpu = now
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        _sleep(PAUSE_S)
        return True
    return False  # this thread is a loop's: never stop it
