"""Wake-ups between the API and the agents.

The API calls ``notify_agent(node)`` after writing desired state; an agent
waits in ``wait_for_work()``. An agent calls ``notify_observed()`` after
writing observed state; API request threads wait in ``wait_until()``,
re-checking their condition against the store on every notification and at
least every ``poll`` seconds. Wake-ups only shorten waits: the store is the
truth, and a lost wake-up costs latency (the agent's periodic resync, the
waiters' poll), never correctness.

Two implementations, one interface (``wakeups_for`` picks by database):

* ``Wakeups`` — in-process events, for ``egressd serve`` on SQLite, where
  the API and the agent share a process.
* ``PgWakeups`` — PostgreSQL ``LISTEN``/``NOTIFY`` between processes and
  hosts. ``notify_agent(node)`` sends ``NOTIFY egressd_agent, '<node>'``
  (``'*'``: every agent); an agent wakes for its own node or ``'*'``.
  ``notify_observed()`` sends ``NOTIFY egressd_observed``; API waiters wake
  on it. One listener thread per process holds a dedicated connection,
  reconnects with backoff when it breaks, and wakes everyone after a
  reconnect (what was sent meanwhile is lost).

Thread-safe: any thread may notify or wait.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

log = logging.getLogger(__name__)

AGENT_CHANNEL = "egressd_agent"
OBSERVED_CHANNEL = "egressd_observed"
EVERY_NODE = "*"


class Wakeups:
    """In-process wake-ups (one process runs both the API and the agent)."""

    def __init__(self, *, poll: float = 0.25) -> None:
        self._poll = poll
        self._work = threading.Event()
        self._observed = threading.Condition()
        self._observed_seq = 0

    # -- lifecycle (nothing to do in process) ------------------------------------------

    def start(self) -> None:
        """Begin receiving wake-ups from other processes (none here)."""

    def close(self) -> None:
        """Stop receiving wake-ups from other processes. Idempotent."""

    # -- agent side ------------------------------------------------------------------

    def notify_agent(self, node: str | None = None) -> None:
        """Wake the agent of ``node`` (``None``: every agent)."""
        self._wake_agent()

    def wait_for_work(self, timeout: float) -> bool:
        woke = self._work.wait(timeout)
        self._work.clear()
        return woke

    def work_pending(self) -> bool:
        """Whether a wake-up arrived that ``wait_for_work`` has not consumed yet."""
        return self._work.is_set()

    def _wake_agent(self) -> None:
        self._work.set()

    # -- API side --------------------------------------------------------------------

    def notify_observed(self) -> None:
        self._wake_observers()

    def wait_until(self, done: Callable[[], bool], *, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while True:
            with self._observed:
                seen = self._observed_seq
            if done():
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._observed:
                # A notification between done() and here is not lost: the sequence moved.
                if self._observed_seq == seen:
                    self._observed.wait(min(left, self._poll))

    def _wake_observers(self) -> None:
        with self._observed:
            self._observed_seq += 1
            self._observed.notify_all()


class PgWakeups(Wakeups):
    """LISTEN/NOTIFY on PostgreSQL; see the module docstring.

    ``agent_node``: this process runs the agent of that node and listens on
    ``egressd_agent``. ``observe``: this process serves the API and listens on
    ``egressd_observed``. Notifying needs neither.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        agent_node: str | None,
        observe: bool,
        poll: float = 1.0,
        reconnect_delay: float = 0.5,
    ) -> None:
        super().__init__(poll=poll)
        self._engine = engine
        self.agent_node = agent_node
        self.observe = observe
        self._reconnect_delay = reconnect_delay
        self._stopping = threading.Event()
        self._listening = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def channels(self) -> tuple[str, ...]:
        wanted = ((AGENT_CHANNEL, self.agent_node is not None), (OBSERVED_CHANNEL, self.observe))
        return tuple(channel for channel, on in wanted if on)

    # -- lifecycle -------------------------------------------------------------------

    def start(self, *, wait: float = 10.0) -> None:
        """Start the listener thread; wait (bounded) until it listens. Idempotent."""
        if self._thread is not None or not self.channels:
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._listen, name="egressd-listen", daemon=True)
        self._thread.start()
        if not self._listening.wait(wait):
            log.warning("not yet listening for wake-ups; relying on periodic checks meanwhile")

    def close(self) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    @property
    def listening(self) -> bool:
        return self._listening.is_set()

    # -- sending ---------------------------------------------------------------------

    def notify_agent(self, node: str | None = None) -> None:
        target = node or EVERY_NODE
        if self.agent_node is not None and target in (EVERY_NODE, self.agent_node):
            self._wake_agent()  # our own agent: at once, and even with the database away
        self._send(AGENT_CHANNEL, target)

    def notify_observed(self) -> None:
        if self.observe:
            self._wake_observers()
        self._send(OBSERVED_CHANNEL, "")

    def _send(self, channel: str, payload: str) -> None:
        try:
            with self._engine.connect() as connection:
                connection.execute(
                    text("SELECT pg_notify(:channel, :payload)"),
                    {"channel": channel, "payload": payload},
                )
                connection.commit()
        except SQLAlchemyError as exc:
            # Best effort: the receivers' periodic checks pick the change up later.
            log.warning("NOTIFY %s failed: %s", channel, _describe(exc))

    # -- receiving -------------------------------------------------------------------

    def dispatch(self, channel: str, payload: str) -> None:
        """Act on one notification received from the database."""
        if channel == AGENT_CHANNEL and self.agent_node is not None:
            if payload in (EVERY_NODE, self.agent_node):
                self._wake_agent()
        elif channel == OBSERVED_CHANNEL and self.observe:
            self._wake_observers()

    def _listen(self) -> None:
        delay = self._reconnect_delay
        while not self._stopping.is_set():
            connection: Any = None
            try:
                connection = self._connect()
                self._listening.set()
                delay = self._reconnect_delay
                # Anything sent while we were not listening is lost: look again now.
                self.dispatch(AGENT_CHANNEL, EVERY_NODE)
                self.dispatch(OBSERVED_CHANNEL, "")
                while not self._stopping.is_set():
                    for notify in connection.notifies(timeout=0.5):
                        self.dispatch(notify.channel, notify.payload)
            except Exception as exc:
                if self._stopping.is_set():
                    break
                log.warning("wake-up listener: %s; reconnecting in %.1fs", _describe(exc), delay)
            finally:
                self._listening.clear()
                if connection is not None:
                    _close_quietly(connection)
            if self._stopping.wait(delay):
                break
            delay = min(delay * 2, 10.0)

    def _connect(self) -> Any:
        """A dedicated autocommit connection (taken out of the pool) listening on our channels."""
        pooled = self._engine.raw_connection()
        connection = pooled.driver_connection  # before detach(), which forgets it
        try:
            if connection is None:
                raise RuntimeError("no driver connection")
            pooled.detach()
            connection.rollback()
            connection.autocommit = True
            for channel in self.channels:
                # Channel names are our constants, not user input.
                connection.execute(f"LISTEN {channel}")
            return connection
        except BaseException:
            pooled.close()
            raise


def _close_quietly(connection: Any) -> None:
    with contextlib.suppress(Exception):  # already broken: nothing to tell
        connection.close()


def _describe(exc: BaseException) -> str:
    """A one-line error without SQL parameters or connection strings."""
    orig = getattr(exc, "orig", None)
    detail = str(orig if orig is not None else exc).strip().splitlines()
    return f"{type(exc).__name__}: {detail[0] if detail else ''}"


def wakeups_for(engine: Engine, *, agent_node: str | None, observe: bool) -> Wakeups:
    """LISTEN/NOTIFY on PostgreSQL, in-process events otherwise (SQLite: one process)."""
    if engine.dialect.name == "postgresql":
        return PgWakeups(engine, agent_node=agent_node, observe=observe)
    return Wakeups()
