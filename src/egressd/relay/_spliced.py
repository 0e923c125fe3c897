"""One relayed connection over plain TCP on both legs, driven by readiness callbacks.

This is the data path for ``socks5`` and ``http`` upstreams (``https`` needs
TLS in Python and takes the buffered :func:`egressd.relay._pump.pump`).
A :class:`SplicedConnection` is a state machine, not a task:

    CONNECTING  TCP connect to the proxy, next address on failure
                (``connect_timeout``, which also covers resolving a proxy name)
    HANDSHAKE   the sans-IO SOCKS5 / HTTP CONNECT handshake (``handshake_timeout``)
    RELAYING    both directions at once, each on its own
    CLOSED      orderly (FIN both ways) or aborted (RST both ways)

Both sockets are registered once with the relay's :class:`EdgePoller`
(edge-triggered, for the connection's life); an event only updates what the
socket's :class:`Leg` knows and lets the connection do every step that
allows. No coroutine, no future and no ``epoll_ctl`` per wait. How bytes
move once the tunnel is up (buffered, then spliced; half-close; FIN on the
last segment) is :mod:`egressd.relay._flow`.

The client socket is not read before the tunnel is up, so what the
container sends meanwhile waits in the kernel; bytes that came with the
proxy's reply (early payload) reach the client first. Any error, a timeout,
or :meth:`abort`: close both with RST (fail closed). A busy flow yields to
the loop after ``TURN_BUDGET`` bytes (``call_soon``), because a source that
was not drained will not announce itself again.

Timeouts: two :class:`DeadlineQueue` objects (connect, handshake) shared by
all connections, one timer each, not a timer per connection. A connect that
completes within the call (the usual case on a local network: the greeting
goes out at once) never enters the connect queue.

Per-connection cost is what bounds connections per second, so the fast path
creates little: the proxy leg gets ``TCP_NODELAY`` at once but its keepalive
options (four ``setsockopt``) only ``KEEPALIVE_DELAY`` seconds later, in one
batch for every proxy leg still open then (a short connection is long gone,
and the first probe is due only after ``KEEPALIVE_IDLE`` seconds anyway).
Sockets are the C type (``_socket.socket``), without ``socket.socket``'s
Python layer. A SOCKS5 upstream without credentials (pipelined) gets a
:data:`QuickOpening`: its bytes are cached per destination, no handshake
object is made unless the proxy's first read is anything but both replies
saying yes; the proxy leg's ``SO_RCVLOWAT`` holds its wake-up until both
replies are in (dante sends the method reply at once and the CONNECT reply
after its own connect: two wake-ups otherwise, in about half of the
connections), for at most ``LOWAT_HOLD`` seconds, one shared timer for all,
so a shorter answer is never kept waiting longer than that.

Concurrency model: every method runs on the event loop thread, from the
poller's dispatch, a deadline, ``call_soon`` or the relay; nothing blocks.
``on_close`` is called exactly once, when the connection is closed.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import enum
import errno
import os
import socket
from collections.abc import Callable, Iterable, Iterator

from egressd.errors import UpstreamError, UpstreamProtocolError
from egressd.relay._channel import tune_keepalive
from egressd.relay._deadlines import DeadlineQueue
from egressd.relay._errors import (
    CLOSED_DURING_HANDSHAKE,
    cannot_connect,
    connect_timed_out,
    connection_broke,
    handshake_timed_out,
)
from egressd.relay._events import ClientHandshake, SendBytes, TunnelReady
from egressd.relay._flow import Flow, FlowResources, Leg
from egressd.relay._poller import (
    FAILED,
    PEER_DONE,
    PEER_FIN,
    READABLE,
    WATCH_BASE,
    WATCH_READS,
    WRITABLE,
    EdgePoller,
)
from egressd.relay._sockets import ProxyAddress
from egressd.relay._socks5 import quick_reply

HANDSHAKE_RECV = 4096  # replies are tiny; more just takes another read
# While a quick opening waits for its answer, the proxy leg wakes the relay only once
# 9 bytes are in, or at EOF / error: dante sends the method reply at once and the
# CONNECT reply after its own connect, and both then take one wake-up instead of two.
# 9 bytes is the shortest pair of replies that says yes or names a CONNECT failure;
# a shorter answer (05 ff: no acceptable method, after which RFC 1928 leaves the close
# to us) would wait, so the hold ends after LOWAT_HOLD seconds whatever came, and
# lowering the mark makes the kernel report what is waiting.
LOWAT_HOLD = 0.05
_QUICK_LOWAT = (socket.SOL_SOCKET, socket.SO_RCVLOWAT, 9)
_PLAIN_LOWAT = (socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
KEEPALIVE_DELAY = 1.0  # seconds before a proxy leg still open gets its keepalive options
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
# What the legs are registered for, i.e. Leg.interest() of a new client leg (not read
# before the tunnel is up) and of a new proxy leg (read from the start).
_CLIENT_WATCH = WATCH_BASE
_UPSTREAM_WATCH = WATCH_BASE | WATCH_READS
_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_CONNECT_OK = frozenset({0, errno.EINPROGRESS})

# A pipelined SOCKS5 opening without credentials (``_socks5.quick_opening_bytes``) and
# what makes the handshake that would have sent it: made only when the proxy's first
# answer is not the plain yes that ``_socks5.quick_reply`` takes (one object and five
# calls fewer per connection). A plain tuple: a NamedTuple costs a Python call to make.
QuickOpening = tuple[bytes, Callable[[], ClientHandshake]]
OnClose = Callable[["SplicedConnection", BaseException | None], None]


class Phase(enum.IntEnum):
    CONNECTING = 0
    HANDSHAKE = 1
    RELAYING = 2
    CLOSED = 3


class SpliceShared:
    """What all spliced connections of one relay share: one per event loop."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, connect_timeout: float, handshake_timeout: float
    ) -> None:
        self.loop = loop
        self.poller = EdgePoller(loop)
        self.io = FlowResources()
        self.connecting: DeadlineQueue[SplicedConnection] = DeadlineQueue(
            loop, timeout=connect_timeout, on_expired=SplicedConnection.expire
        )
        self.held: DeadlineQueue[SplicedConnection] = DeadlineQueue(
            loop, timeout=LOWAT_HOLD, on_expired=SplicedConnection.end_hold
        )
        self.handshaking: DeadlineQueue[SplicedConnection] = DeadlineQueue(
            loop, timeout=handshake_timeout, on_expired=SplicedConnection.expire
        )
        self._untuned: list[socket.SocketType] = []  # proxy legs waiting for keepalive
        self._tuner: asyncio.TimerHandle | None = None

    def tune_later(self, sock: socket.SocketType) -> None:
        """Keepalive for ``sock`` in about ``KEEPALIVE_DELAY`` seconds, if still open."""
        self._untuned.append(sock)
        if self._tuner is None:
            self._tuner = self.loop.call_later(KEEPALIVE_DELAY, self._tune_due)

    def _tune_due(self) -> None:
        self._tuner = None
        due, self._untuned = self._untuned, []
        for sock in due:
            if sock.fileno() != -1:  # closed meanwhile: nothing to do
                # An error (e.g. reset by the peer) is for its connection to find out.
                with contextlib.suppress(OSError):
                    tune_keepalive(sock)

    def close(self) -> None:
        """After every connection has closed."""
        if self._tuner is not None:
            self._tuner.cancel()
            self._tuner = None
        self._untuned.clear()
        self.connecting.close()
        self.handshaking.close()
        self.held.close()
        self.poller.shutdown()
        self.io.pipes.close()


_CONNECTING = Phase.CONNECTING
_HANDSHAKE = Phase.HANDSHAKE
_RELAYING = Phase.RELAYING
_CLOSED = Phase.CLOSED


class SplicedConnection:
    """A client socket relayed through a proxy to one destination."""

    __slots__ = (
        "_addresses",
        "_client",
        "_connect_error",
        "_early",
        "_flows",
        "_handshake",
        "_held",
        "_label",
        "_on_close",
        "_outgoing",
        "_queue",
        "_quick",
        "_resolver",
        "_resume",
        "_shared",
        "_upstream",
        "orderly",
        "phase",
    )

    def __init__(
        self,
        *,
        client: socket.SocketType,
        handshake: ClientHandshake | QuickOpening,
        proxy_label: str,
        shared: SpliceShared,
        on_close: OnClose,
    ) -> None:
        """``handshake``: a fresh one, or a :data:`QuickOpening` that makes one only
        if the proxy's first answer is not the one expected."""
        self._shared = shared
        self._handshake: ClientHandshake | None
        self._quick: QuickOpening | None
        if isinstance(handshake, tuple):
            self._handshake, self._quick = None, handshake
            self._outgoing = handshake[0]
        else:
            self._handshake, self._quick = handshake, None
            self._outgoing = b"".join(  # handshake bytes not yet sent
                event.data for event in handshake.initiate() if isinstance(event, SendBytes)
            )
        self._label = proxy_label
        self._on_close = on_close
        self.phase = _CONNECTING
        self.orderly = False  # closed with FIN after both directions ended
        # The client is not read before the tunnel is up (its bytes wait in the kernel),
        # but its FIN, errors and hang-ups are watched from the start.
        self._client = Leg(client, readable=True, want_reads=False)
        self._upstream: Leg | None = None
        self._addresses: Iterator[ProxyAddress] = iter(())
        self._connect_error: OSError | None = None
        self._early = b""  # destination bytes that came with the proxy's reply
        self._flows: tuple[Flow, Flow] | None = None
        self._resume: asyncio.Handle | None = None
        self._resolver: asyncio.Task[None] | None = None
        # The deadline queue the connection is in: ``connecting`` from the lookup or a
        # connect that did not complete at once, then ``handshaking``; None otherwise.
        self._queue: DeadlineQueue[SplicedConnection] | None = None
        self._held = False  # the proxy leg's SO_RCVLOWAT is raised (and in ``held``)
        shared.poller.register(client, self, _CLIENT_WATCH)

    # -- what the relay sees -----------------------------------------------------------------

    @property
    def bytes_out(self) -> int:
        return self._flows[0].total if self._flows is not None else 0

    @property
    def bytes_in(self) -> int:
        return self._flows[1].total if self._flows is not None else 0

    def start(self, addresses: Iterable[ProxyAddress]) -> None:
        """Connect to the proxy at the first of ``addresses`` that answers."""
        if self.phase is not _CONNECTING or self._upstream is not None:
            return
        self._resolver = None
        self._addresses = iter(addresses)
        try:
            self._connect_next()
            self._step()
            if self.phase is _CONNECTING and self._queue is None:
                # The connect did not take the greeting at once: it gets its deadline.
                self._queue = self._shared.connecting
                self._queue.add(self)
        except (UpstreamError, OSError) as exc:
            self.fail(exc)
        except BaseException:
            self.abort()  # a bug: fail closed, and let the caller log it
            raise

    def resolve_with(self, task: asyncio.Task[None]) -> None:
        """``task`` looks the proxy up and then calls :meth:`start` or :meth:`fail`.

        The connect deadline covers the lookup."""
        self._resolver = task
        self._queue = self._shared.connecting
        self._queue.add(self)

    def fail(self, error: BaseException) -> None:
        """End with RST on both legs, reporting ``error``."""
        self._close(error, reset=True)

    def abort(self) -> None:
        """End with RST on both legs, on the relay's behalf (nothing to report)."""
        self._close(None, reset=True)

    def end_hold(self) -> None:
        """Wake for any byte again: the proxy's first read came, or ``LOWAT_HOLD``
        passed without it (then the kernel reports whatever it sent)."""
        if self._held:
            self._held = False
            self._shared.held.discard(self)  # a no-op when called by the queue itself
        if self._upstream is not None and self.phase is not _CLOSED:
            try:  # noqa: SIM105 - an error is for the connection's next step to find
                self._upstream.sock.setsockopt(*_PLAIN_LOWAT)
            except OSError:
                pass

    def expire(self) -> None:
        """The current phase's deadline passed (called by the :class:`DeadlineQueue`)."""
        shared = self._shared
        if self.phase is _CONNECTING:
            self.fail(connect_timed_out(self._label, shared.connecting.timeout))
        elif self.phase is _HANDSHAKE:
            self.fail(handshake_timed_out(self._label, shared.handshaking.timeout))

    # -- EdgeHandler -------------------------------------------------------------------------

    def on_events(self, fd: int, events: int) -> None:
        leg = self._client
        if fd != leg.fd:
            upstream = self._upstream
            if upstream is None or fd != upstream.fd:
                return
            leg = upstream
        elif events & FAILED and self.phase < _RELAYING:
            # The client reset before the tunnel was up: nobody left to serve.
            self.fail(ConnectionResetError(errno.ECONNRESET, "client reset during setup"))
            return
        if events & READABLE:
            leg.readable = True
            if events & PEER_DONE:
                leg.peer_done = True
                if events & PEER_FIN and not events & FAILED:
                    leg.fin = True
        if events & WRITABLE:
            leg.writable = True
        try:
            self._step()
        except (UpstreamError, OSError) as exc:
            self.fail(exc)

    def on_failure(self) -> None:
        self.abort()

    def _step(self) -> None:
        """Every step the legs' flags allow, then the epoll set in line with them."""
        if self.phase < _RELAYING:
            self._handshake_step()
        if self.phase is _RELAYING:
            self._relay_step()
        if self.phase is not _CLOSED:
            # What the steps decided to watch, into the epoll set (rarely a change).
            # Not after the connection closed: its sockets are closed (or about to be).
            if self._client.stale:
                self._client.sync(self._shared.poller)
            upstream = self._upstream
            if upstream is not None and upstream.stale:
                upstream.sync(self._shared.poller)

    # -- connecting and the handshake --------------------------------------------------------

    def _connect_next(self) -> None:
        """Set ``_upstream`` to a socket connecting to the next address that takes the
        connect; :class:`UpstreamUnreachable` when none is left."""
        shared = self._shared
        for family, address in self._addresses:
            # The C socket type: socket.socket's Python layer would add three calls.
            sock = _socket.socket(family, _STREAM)
            try:
                try:  # noqa: SIM105 - best effort, without a context manager per connection
                    sock.setsockopt(*_NODELAY)
                except OSError:
                    pass
                if self._quick is not None:
                    try:
                        sock.setsockopt(*_QUICK_LOWAT)
                    except OSError:
                        pass  # no hold, then: two wake-ups at worst
                    else:
                        self._held = True
                        shared.held.add(self)
                code = sock.connect_ex(address)
                if code not in _CONNECT_OK:
                    raise OSError(code, os.strerror(code))
                # Assumed writable: on fast paths the connect is done already and the
                # greeting goes out at once; an unfinished connect answers EAGAIN (and
                # its edge is watched from then on), a failed one its error.
                leg = Leg(sock, readable=False, want_reads=True)
                shared.poller.register(sock, self, _UPSTREAM_WATCH)
            except OSError as exc:
                sock.close()
                self._connect_error = exc
                continue
            shared.tune_later(sock)
            self._upstream = leg
            return
        raise cannot_connect(self._label, self._connect_error)

    def _handshake_step(self) -> None:
        if self._upstream is None:
            return  # still resolving the proxy's name
        while True:
            up = self._upstream
            assert up is not None  # replaced after a failed connect, or raised
            if self._outgoing:
                if not up.writable:
                    return
                try:
                    sent = up.sock.send(self._outgoing)
                except BlockingIOError:
                    up.full()
                    return
                except OSError as exc:
                    if self.phase is not _CONNECTING:
                        raise connection_broke(self._label, exc) from None
                    # The connect failed; the greeting stays queued for the next address.
                    self._shared.poller.close(up.sock)
                    self._upstream, self._connect_error = None, exc
                    self._connect_next()
                    continue
                if self.phase is _CONNECTING:
                    self.phase = _HANDSHAKE
                    if self._queue is not None:
                        self._queue.discard(self)
                    self._queue = self._shared.handshaking
                    self._queue.add(self)
                if sent < len(self._outgoing):
                    up.full()
                self._outgoing = self._outgoing[sent:]
                continue
            handshake = self._handshake
            if handshake is not None and handshake.is_done:
                break
            if not up.readable:
                return
            try:
                data = up.sock.recv(HANDSHAKE_RECV)
            except BlockingIOError:
                up.readable = False
                return
            except OSError as exc:
                raise connection_broke(self._label, exc) from None
            if len(data) < HANDSHAKE_RECV and not up.peer_done:
                up.readable = False  # drained (Leg.drained, without the call)
            if handshake is None:  # the quick opening went out
                assert self._quick is not None
                early = quick_reply(data)
                if self._held:
                    self.end_hold()
                if early is not None:
                    self._early = early
                    break
                # Anything else is for the handshake proper, which sent the same bytes.
                handshake = self._handshake = self._quick[1]()
                handshake.initiate()
            if not data:
                handshake.receive_eof()
                raise UpstreamProtocolError(CLOSED_DURING_HANDSHAKE)
            for event in handshake.receive_data(data):
                if isinstance(event, SendBytes):
                    self._outgoing += event.data
                elif isinstance(event, TunnelReady):
                    self._early = event.early_payload
        self._tunnel_ready()

    def _tunnel_ready(self) -> None:
        upstream = self._upstream
        assert upstream is not None
        if self._queue is not None:
            self._queue.discard(self)
            self._queue = None
        self.phase = _RELAYING
        self._handshake = self._quick = None
        self._client.watch_reads(True)
        io = self._shared.io
        self._flows = (
            Flow(io, self._client, upstream),
            Flow(io, upstream, self._client, pending=self._early),
        )
        self._early = b""

    # -- relaying ----------------------------------------------------------------------------

    def _relay_step(self) -> None:
        assert self._flows is not None
        outbound, inbound = self._flows
        # A flow with nothing in flight whose source is watched and not readable would
        # return at once: most events concern one direction only, so skip the call.
        busy = False
        src = outbound.src
        if src.readable or outbound.pending or outbound.queued or not src.want_reads:
            busy = outbound.pump(inbound)
        src = inbound.src
        if src.readable or inbound.pending or inbound.queued or not src.want_reads:
            busy = inbound.pump(outbound) or busy
        if outbound.eof and inbound.eof:
            self._close(None, reset=False)
        elif busy and self._resume is None:
            self._resume = self._shared.loop.call_soon(self._resume_turn)

    def _resume_turn(self) -> None:
        self._resume = None
        if self.phase is _RELAYING:
            try:
                self._step()
            except OSError as exc:
                self.fail(exc)
            except BaseException:
                self.abort()  # a bug: fail closed, and let the loop log it
                raise

    def _close(self, error: BaseException | None, *, reset: bool) -> None:
        if self.phase is _CLOSED:
            return
        self.phase = _CLOSED
        self.orderly = error is None and not reset
        shared = self._shared
        if self._queue is not None:
            self._queue.discard(self)
            self._queue = None
        if self._held:
            self._held = False
            shared.held.discard(self)
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._resolver is not None:
            self._resolver.cancel()
            self._resolver = None
        self._handshake = self._quick = None
        if self._flows is not None:
            for flow in self._flows:
                if flow.pipe is not None:
                    flow.release()
        shared.poller.close(self._client.sock, reset=reset)
        if self._upstream is not None:
            shared.poller.close(self._upstream.sock, reset=reset)
        self._on_close(self, error)
