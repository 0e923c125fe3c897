"""Wake-ups between the API and the agent of one process.

The API calls ``notify_agent()`` after writing desired state; the agent
waits in ``wait_for_work()``. The agent calls ``notify_observed()`` after
writing observed state; API request threads wait in ``wait_until()``,
re-checking their condition against the store on every notification and at
least every ``poll`` seconds (so a second process writing the same store,
e.g. ``egressd agent``, is seen too, only later). Thread-safe.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Wakeups:
    def __init__(self, *, poll: float = 0.25) -> None:
        self._poll = poll
        self._work = threading.Event()
        self._observed = threading.Condition()

    def notify_agent(self) -> None:
        self._work.set()

    def work_pending(self) -> bool:
        """Whether a wake-up arrived that ``wait_for_work`` has not consumed yet."""
        return self._work.is_set()

    def wait_for_work(self, timeout: float) -> bool:
        woke = self._work.wait(timeout)
        self._work.clear()
        return woke

    def notify_observed(self) -> None:
        with self._observed:
            self._observed.notify_all()

    def wait_until(self, done: Callable[[], bool], *, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            if done():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._observed:
                self._observed.wait(min(left, self._poll))
