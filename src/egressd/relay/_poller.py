"""Edge-triggered readiness for the relay's sockets, inside the asyncio loop.

asyncio's ``add_reader`` / ``add_writer`` are level-triggered: a socket that
stays readable wakes the loop on every iteration, so a pump has to register
before each wait and unregister after it (an ``epoll_ctl`` pair per wait,
per connection). :class:`EdgePoller` keeps an ``epoll`` instance of its own
and registers every socket once, for the connection's life, edge-triggered
(``EPOLLET``): the kernel reports each *change* to readable or writable
once, and the socket's owner remembers what it learnt (ready until a call
says otherwise). Closing the socket removes it from the set. The owner
changes what a socket is watched for (:meth:`EdgePoller.modify`) only when
its interest really changes: reads while bytes wait for a full sink, writes
after a send ran short.

An epoll fd is itself readable while any of its sockets has news, so the
asyncio loop watches that one fd (registered once) and calls
:meth:`EdgePoller._dispatch`, which fetches every pending event without
blocking and hands each to its socket's handler.

Gotcha: an event fetched in a batch can name an fd that a handler earlier in
the same batch closed; had a new socket taken that number meanwhile, the
stale event would reach the new socket's handler. :meth:`close` therefore
defers the ``close(2)`` of a socket to the end of the batch, so no fd number
is reused within one.

Concurrency model: everything runs on the event loop thread; handlers run
one after the other from :meth:`_dispatch` and must not block. A handler
that raises is logged and its ``on_failure`` is called, so one faulty
connection cannot stall the others (each event is delivered exactly once).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
from typing import Protocol

from egressd.relay._channel import arm_reset

logger = logging.getLogger("egressd.relay")

# What a socket is watched for: its peer's FIN (RDHUP: an EOF waits behind the data)
# always, edge-triggered; reads and writes only while its owner wants them (a socket
# is assumed writable until a send runs short). Errors and hang-ups are always reported.
WATCH_BASE = select.EPOLLRDHUP | select.EPOLLET
WATCH_READS = select.EPOLLIN
WATCH_WRITES = select.EPOLLOUT
READABLE = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
WRITABLE = select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP
PEER_DONE = select.EPOLLRDHUP | select.EPOLLERR | select.EPOLLHUP
PEER_FIN = select.EPOLLRDHUP
FAILED = select.EPOLLERR | select.EPOLLHUP
MAX_EVENTS = 256  # per batch; if more are pending, the epoll fd stays readable


class EdgeHandler(Protocol):
    """The owner of registered sockets, told about their readiness changes."""

    def on_events(self, fd: int, events: int) -> None: ...

    def on_failure(self) -> None:
        """``on_events`` raised: release everything, signal failure to the peers."""
        ...


class EdgePoller:
    """One epoll set for the relay's connections, driven by the running loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._epoll = select.epoll()
        self._handlers: dict[int, EdgeHandler] = {}
        self._dispatching = False
        self._closing: list[socket.SocketType] = []
        loop.add_reader(self._epoll.fileno(), self._dispatch)

    def __len__(self) -> int:
        return len(self._handlers)

    def register(self, sock: socket.SocketType, handler: EdgeHandler, events: int) -> None:
        """Watch ``sock`` for ``events`` until :meth:`close`; what is ready is reported at once."""
        fd = sock.fileno()
        self._epoll.register(fd, events)
        self._handlers[fd] = handler

    def modify(self, sock: socket.SocketType, events: int) -> None:
        """Change what ``sock`` is watched for; what is ready already is reported at once."""
        self._epoll.modify(sock.fileno(), events)

    def close(self, sock: socket.SocketType, *, reset: bool = False) -> None:
        """Forget ``sock`` and close it (at the end of the current batch, if any).

        ``reset``: with RST instead of FIN, so the peer learns something went wrong.
        """
        fd = sock.fileno()
        if fd == -1:
            return
        if reset:
            arm_reset(sock)
        self._handlers.pop(fd, None)
        if self._dispatching:
            self._closing.append(sock)
        else:
            sock.close()  # the kernel drops it from the epoll set

    def shutdown(self) -> None:
        """Stop watching altogether. Sockets still registered stay open: their owners close them."""
        if self._epoll.closed:
            return
        self._loop.remove_reader(self._epoll.fileno())
        self._epoll.close()
        self._handlers.clear()

    def _dispatch(self) -> None:
        try:
            events = self._epoll.poll(0, MAX_EVENTS)
        except InterruptedError:
            return
        self._dispatching = True
        try:
            for fd, mask in events:
                handler = self._handlers.get(fd)
                if handler is None:
                    continue  # closed earlier in this batch
                try:
                    handler.on_events(fd, mask)
                except Exception:
                    logger.exception("relay: connection handler failed; aborting it")
                    try:
                        handler.on_failure()
                    except Exception:
                        logger.exception("relay: aborting a failed connection failed too")
        finally:
            self._dispatching = False
            closing, self._closing = self._closing, []
            for sock in closing:
                sock.close()
