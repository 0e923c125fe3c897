"""The agent's heartbeat: "the agent of node N is alive", every few seconds.

Concurrency model: one daemon thread per agent process, apart from the
reconciler so that a long reconcile pass does not make the node look dead.
Each beat is one short store transaction (an upsert of the ``nodes`` row);
a failed beat is logged and retried at the next interval. ``stop`` ends the
thread; the row stays and simply ages, so after ``node_timeout`` the API
answers requests for this node at once instead of waiting for it.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime

from egressd.store import Store

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, store: Store, *, node: str, interval: float, version: str) -> None:
        self.store = store
        self.node = node
        self.interval = interval
        self.version = version
        self.started_at: datetime | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def beat(self) -> None:
        """Record one heartbeat now (raises on store errors)."""
        self.started_at = self.store.record_heartbeat(
            self.node, version=self.version, started_at=self.started_at
        )

    def start(self) -> None:
        """Beat once now (errors propagate: a store we cannot write is fatal), then every
        ``interval`` seconds in the background."""
        self.beat()
        log.info("node %s: heartbeat every %gs", self.node, self.interval)
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="egressd-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        while not self._stopping.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:
                if not self._failing:
                    # The type only: database errors can quote connection details.
                    log.warning("node %s: heartbeat failed (%s)", self.node, type(exc).__name__)
                self._failing = True
            else:
                if self._failing:
                    log.info("node %s: heartbeat recovered", self.node)
                self._failing = False
