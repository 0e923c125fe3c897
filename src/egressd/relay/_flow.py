"""One direction of a relayed connection: bytes from a source socket to a sink socket.

A :class:`Leg` is one socket and what its edge-triggered events told: readable
/ writable until a call says otherwise. Linux reports a new edge for every
arrival of data (and every time send space frees up after a send ran short),
not only after ``EAGAIN``; so a ``recv`` that returns less than asked for,
or a ``send`` that takes less than offered, clears the flag at once and the
``EAGAIN`` call is saved. The exception is a peer whose FIN (``EPOLLRDHUP``)
was reported already: its EOF waits behind the data and will not be
announced again, so that leg is read on until it answers 0.

A :class:`Flow` starts buffered: ``recv_into`` a buffer shared by the relay,
``send`` on at once, keep only what the sink did not take. The first read
that fills the buffer marks the flow as bulk, and from then on it is spliced
(socket -> pipe -> socket, ``splice(2)``), the payload never entering user
space; a pipe is borrowed from the :class:`PipePool` only while bytes are in
flight (into an empty pipe only, so ``EAGAIN`` can only mean "source
drained"). Short exchanges never touch a pipe.

What a leg is watched for follows what its flows need (the connection
applies it with :meth:`Leg.sync` after each step, an ``epoll_ctl`` only when
it changed): writes only after a send ran short (until then the socket is
simply assumed writable, which spares an event per socket); reads not while
the flow from it waits for its sink with bytes in flight, since every
arrival would wake the relay for nothing (the way level-triggered relays use
watermarks). The peer's FIN, errors and hang-ups are always watched.

When the source's FIN has been reported already, what is still to send is
the stream's tail: it goes out with ``MSG_MORE`` (``SPLICE_F_MORE``) so the
``shutdown`` (or ``close``) that follows at once puts the FIN on the same
segment. The peer sees data and EOF together: one packet and one wake-up
less, and a client that would close first (keeping a TIME_WAIT, and a port,
on its side) sees our FIN first instead.

Half-close: at the source's EOF, with everything delivered, the sink is
``shutdown(SHUT_WR)`` while the other direction carries on; when that one
has ended already, the ``close`` that follows sends the FIN instead.

Fairness: a busy flow moves at most ``TURN_BUDGET`` bytes per turn, then
its connection yields to the loop.

Concurrency model: driven by its connection, on the event loop thread only.
Errors other than ``EAGAIN`` propagate as ``OSError``; the connection aborts.
"""

from __future__ import annotations

import os
import socket

from egressd.relay._pipes import PIPE_SIZE, Pipe, PipePool
from egressd.relay._poller import WATCH_BASE, WATCH_READS, WATCH_WRITES, EdgePoller

SPLICE_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
SPLICE_MORE = SPLICE_FLAGS | os.SPLICE_F_MORE
BUFFER_SIZE = 64 * 1024  # a read that fills it makes a flow bulk (spliced)
TURN_BUDGET = 4 << 20  # bytes per flow and turn before yielding to the loop


class FlowResources:
    """What the flows of one relay share; one per event loop."""

    def __init__(self) -> None:
        self.pipes = PipePool()
        # One buffer for every buffered read: the loop runs one callback at a time, and
        # whatever a sink does not take at once is copied out before the next read.
        self.buffer = memoryview(bytearray(BUFFER_SIZE))


class Leg:
    """One socket of a connection, what the edges told about it, what it is watched for."""

    __slots__ = (
        "fd",
        "fin",
        "peer_done",
        "readable",
        "sock",
        "stale",
        "want_reads",
        "want_writes",
        "writable",
    )

    def __init__(self, sock: socket.SocketType, *, readable: bool, want_reads: bool) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.readable = readable
        self.writable = True  # until a send runs short; then its edge is watched
        self.peer_done = False  # FIN (or an error) reported: read until 0, not until short
        self.fin = False  # FIN without error: what is still queued is the stream's tail
        self.want_reads = want_reads
        self.want_writes = False
        self.stale = False  # what is wanted differs from what the epoll set has

    def interest(self) -> int:
        return (
            WATCH_BASE
            | (WATCH_READS if self.want_reads else 0)
            | (WATCH_WRITES if self.want_writes else 0)
        )

    def sync(self, poller: EdgePoller) -> None:
        """Bring the epoll set in line with what is wanted (call when ``stale``)."""
        poller.modify(self.sock, self.interest())
        self.stale = False

    def watch_reads(self, on: bool) -> None:
        if self.want_reads is not on:
            self.want_reads = on
            self.stale = True

    def drained(self) -> None:
        """A read came back short: nothing more until the next edge (unless EOF waits)."""
        if not self.peer_done:
            self.readable = False

    def full(self) -> None:
        """A send ran short (or would block): wait for the edge that says there is room."""
        self.writable = False
        if not self.want_writes:
            self.want_writes = True
            self.stale = True


class Flow:
    """One direction: ``src`` -> (``pending`` bytes, or a pipe once bulk) -> ``dst``."""

    __slots__ = ("bulk", "dst", "eof", "io", "pending", "pipe", "queued", "src", "total")

    def __init__(self, io: FlowResources, src: Leg, dst: Leg, *, pending: bytes = b"") -> None:
        self.io = io
        self.src = src
        self.dst = dst
        self.pending = pending  # read (or early payload), not yet taken by ``dst``
        self.bulk = False  # spliced from now on
        self.pipe: Pipe | None = None
        self.queued = 0  # bytes in ``pipe``
        self.eof = False  # ``src`` ended and everything read was delivered
        self.total = 0  # bytes delivered to ``dst``

    def pump(self, other: Flow) -> bool:
        """Move what the flags allow; True if the turn's budget ran out first.

        ``other`` is the opposite direction: whether it has ended decides how
        this one passes its EOF on.
        """
        src, dst = self.src, self.dst
        moved = 0
        while moved < TURN_BUDGET:
            if self.pending or self.queued:
                if not dst.writable or not self._deliver():
                    src.watch_reads(False)  # until the sink took it (see the module doc)
                    return False
                continue
            if self.eof:
                return False
            if not src.want_reads:
                src.watch_reads(True)
                src.readable = True  # data may have come meanwhile: one try is cheaper
            if not src.readable:
                return False
            received = self._splice_in() if self.bulk else self._read_in()
            if received <= 0:
                if received == 0:
                    self._ended(other)
                return False  # ended, or nothing came (EAGAIN)
            moved += received
        return True

    def release(self) -> None:
        """Give the pipe back (or close it if bytes are left in it)."""
        if self.pipe is not None:
            self.io.pipes.release(self.pipe, empty=self.queued == 0)
            self.pipe = None

    def _deliver(self) -> bool:
        """Send what is in flight; False when the sink is full."""
        dst = self.dst
        if self.pending:
            try:
                sent = dst.sock.send(self.pending, socket.MSG_MORE if self.src.fin else 0)
            except BlockingIOError:
                sent = 0
            self.total += sent
            self.pending = self.pending[sent:]
            if self.pending:
                dst.full()
                return False
            return True
        assert self.pipe is not None
        flags = SPLICE_MORE if self.src.fin else SPLICE_FLAGS
        try:
            sent = os.splice(self.pipe.read_fd, dst.fd, self.queued, flags=flags)
        except BlockingIOError:
            sent = 0
        self.total += sent
        self.queued -= sent
        if self.queued:
            dst.full()
            return False
        return True

    def _read_in(self) -> int:
        """Buffered: read and pass on at once; keep what ``dst`` did not take.

        Returns the bytes read, 0 at EOF, -1 if nothing came.
        """
        src, dst = self.src, self.dst
        buffer = self.io.buffer
        try:
            received = src.sock.recv_into(buffer)
        except BlockingIOError:
            src.readable = False
            return -1
        if received == 0:
            return 0
        if received < BUFFER_SIZE:
            if not src.peer_done:  # Leg.drained(), inlined: once per read
                src.readable = False
        else:
            self.bulk = True  # a full buffer: splice from now on
        sent = 0
        if dst.writable:
            try:
                sent = dst.sock.send(buffer[:received], socket.MSG_MORE if src.fin else 0)
            except BlockingIOError:
                sent = 0
        self.total += sent
        if sent < received:
            dst.full()
            # Out of the shared buffer before anything else reads into it.
            self.pending = bytes(buffer[sent:received])
        return received

    def _splice_in(self) -> int:
        """Bulk: fill a borrowed (empty) pipe from ``src``; -1 if nothing came."""
        pipe = self.pipe
        if pipe is None:
            pipe = self.pipe = self.io.pipes.acquire()
        try:
            received = os.splice(self.src.fd, pipe.write_fd, PIPE_SIZE, flags=SPLICE_FLAGS)
        except BlockingIOError:
            self.src.readable = False
            received = -1
        if received <= 0:
            self.release()  # empty: straight back to the pool
            return received
        self.queued = received
        return received

    def _ended(self, other: Flow) -> None:
        self.eof = True
        if other.eof:
            return  # both directions done: the close that follows sends the FIN
        # ENOTCONN when the peer already reset: the other direction will tell.
        try:  # noqa: SIM105 - no context manager per connection (three calls)
            self.dst.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
