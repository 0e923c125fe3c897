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
all connections, one timer each, not a timer per connection.

Per-connection cost is what bounds connections per second, so the fast path
creates little: the proxy leg gets ``TCP_NODELAY`` at once but its keepalive
options (four ``setsockopt``) only ``KEEPALIVE_DELAY`` seconds later, in one
batch for every proxy leg still open then (a short connection is long gone,
and the first probe is due only after ``KEEPALIVE_IDLE`` seconds anyway).

Concurrency model: every method runs on the event loop thread, from the
poller's dispatch, a deadline, ``call_soon`` or the relay; nothing blocks.
``on_close`` is called exactly once, when the connection is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import os
import socket
from collections.abc import Callable, Iterable, Iterator

from egressd.errors import UpstreamError, UpstreamProtocolError, UpstreamUnreachable
from egressd.relay._channel import tune_keepalive
from egressd.relay._deadlines import DeadlineQueue
from egressd.relay._events import ClientHandshake, SendBytes, TunnelReady, errno_reason
from egressd.relay._flow import Flow, FlowResources, Leg
from egressd.relay._poller import FAILED, PEER_DONE, PEER_FIN, READABLE, WRITABLE, EdgePoller

HANDSHAKE_RECV = 4096  # replies are tiny; more just takes another read
KEEPALIVE_DELAY = 1.0  # seconds before a proxy leg still open gets its keepalive options
_NODELAY = (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK
_CONNECT_OK = frozenset({0, errno.EINPROGRESS})

ProxyAddress = tuple[int, tuple[str, int]]  # (family, sockaddr)
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
        self.handshaking: DeadlineQueue[SplicedConnection] = DeadlineQueue(
            loop, timeout=handshake_timeout, on_expired=SplicedConnection.expire
        )
        self._untuned: list[socket.socket] = []  # proxy legs waiting for keepalive
        self._tuner: asyncio.TimerHandle | None = None

    def tune_later(self, sock: socket.socket) -> None:
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
        "_label",
        "_on_close",
        "_outgoing",
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
        client: socket.socket,
        handshake: ClientHandshake,
        proxy_label: str,
        shared: SpliceShared,
        on_close: OnClose,
    ) -> None:
        self._shared = shared
        self._handshake: ClientHandshake | None = handshake
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
        self._outgoing = b""  # handshake bytes not yet sent
        self._early = b""  # destination bytes that came with the proxy's reply
        self._flows: tuple[Flow, Flow] | None = None
        self._resume: asyncio.Handle | None = None
        self._resolver: asyncio.Task[None] | None = None
        shared.connecting.add(self)
        shared.poller.register(client, self, self._client.interest())

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
        except (UpstreamError, OSError) as exc:
            self.fail(exc)
        except BaseException:
            self.abort()  # a bug: fail closed, and let the caller log it
            raise

    def resolve_with(self, task: asyncio.Task[None]) -> None:
        """``task`` looks the proxy up and then calls :meth:`start` or :meth:`fail`."""
        self._resolver = task

    def fail(self, error: BaseException) -> None:
        """End with RST on both legs, reporting ``error``."""
        self._close(error, reset=True)

    def abort(self) -> None:
        """End with RST on both legs, on the relay's behalf (nothing to report)."""
        self._close(None, reset=True)

    def expire(self) -> None:
        """The current phase's deadline passed (called by the :class:`DeadlineQueue`)."""
        shared = self._shared
        if self.phase is _CONNECTING:
            self.fail(
                UpstreamUnreachable(
                    f"cannot connect to {self._label}: "
                    f"no answer within {shared.connecting.timeout:g}s"
                )
            )
        elif self.phase is _HANDSHAKE:
            self.fail(
                UpstreamUnreachable(
                    f"{self._label} did not complete the handshake "
                    f"within {shared.handshaking.timeout:g}s"
                )
            )

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
            self._sync()

    def _sync(self) -> None:
        """What the steps just decided to watch, into the epoll set (rarely a change).

        Not after the connection closed: its sockets are closed (or about to be).
        """
        client, upstream = self._client, self._upstream
        if client.stale:
            client.sync(self._shared.poller)
        if upstream is not None and upstream.stale:
            upstream.sync(self._shared.poller)

    # -- connecting and the handshake --------------------------------------------------------

    def _connect_next(self) -> None:
        """Set ``_upstream`` to a socket connecting to the next address that takes the
        connect; :class:`UpstreamUnreachable` when none is left."""
        shared = self._shared
        for family, address in self._addresses:
            sock = socket.socket(family, _STREAM)
            try:
                try:  # noqa: SIM105 - best effort, without a context manager per connection
                    sock.setsockopt(*_NODELAY)
                except OSError:
                    pass
                code = sock.connect_ex(address)
                if code not in _CONNECT_OK:
                    raise OSError(code, os.strerror(code))
                # Assumed writable: on fast paths the connect is done already and the
                # greeting goes out at once; an unfinished connect answers EAGAIN (and
                # its edge is watched from then on), a failed one its error.
                leg = Leg(sock, readable=False, want_reads=True)
                shared.poller.register(sock, self, leg.interest())
            except OSError as exc:
                sock.close()
                self._connect_error = exc
                continue
            shared.tune_later(sock)
            self._upstream = leg
            return
        reason = (
            errno_reason(self._connect_error)
            if self._connect_error is not None
            else "no address to connect to"
        )
        raise UpstreamUnreachable(f"cannot connect to {self._label}: {reason}")

    def _handshake_step(self) -> None:
        handshake = self._handshake
        if self._upstream is None or handshake is None:
            return  # still resolving the proxy's name
        if self.phase is _CONNECTING and not self._outgoing:
            for event in handshake.initiate():
                if isinstance(event, SendBytes):
                    self._outgoing += event.data
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
                        raise self._broken(exc) from None
                    # The connect failed; the greeting stays queued for the next address.
                    self._shared.poller.close(up.sock)
                    self._upstream, self._connect_error = None, exc
                    self._connect_next()
                    continue
                if self.phase is _CONNECTING:
                    self.phase = _HANDSHAKE
                    self._shared.connecting.discard(self)
                    self._shared.handshaking.add(self)
                if sent < len(self._outgoing):
                    up.full()
                self._outgoing = self._outgoing[sent:]
                continue
            if handshake.is_done:
                break
            if not up.readable:
                return
            try:
                data = up.sock.recv(HANDSHAKE_RECV)
            except BlockingIOError:
                up.readable = False
                return
            except OSError as exc:
                raise self._broken(exc) from None
            if not data:
                handshake.receive_eof()
                raise UpstreamProtocolError("proxy closed the connection during the handshake")
            if len(data) < HANDSHAKE_RECV:
                up.drained()
            for event in handshake.receive_data(data):
                if isinstance(event, SendBytes):
                    self._outgoing += event.data
                elif isinstance(event, TunnelReady):
                    self._early = event.early_payload
        self._tunnel_ready()

    def _broken(self, exc: OSError) -> UpstreamUnreachable:
        return UpstreamUnreachable(f"connection to {self._label} failed: {errno_reason(exc)}")

    def _tunnel_ready(self) -> None:
        upstream = self._upstream
        assert upstream is not None
        if self.phase is _CONNECTING:  # a handshake that sent nothing (none does today)
            self._shared.connecting.discard(self)
        self._shared.handshaking.discard(self)
        self.phase = _RELAYING
        self._handshake = None
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
        busy = outbound.pump(inbound) | inbound.pump(outbound)
        if outbound.eof and inbound.eof:
            self._close(None, reset=False)
        elif busy and self._resume is None:
            self._resume = self._shared.loop.call_soon(self._resume_turn)

    def _resume_turn(self) -> None:
        self._resume = None
        if self.phase is _RELAYING:
            try:
                self._relay_step()
                if self.phase is _RELAYING:
                    self._sync()
            except OSError as exc:
                self.fail(exc)
            except BaseException:
                self.abort()  # a bug: fail closed, and let the loop log it
                raise

    def _close(self, error: BaseException | None, *, reset: bool) -> None:
        phase = self.phase
        if phase is _CLOSED:
            return
        self.phase = _CLOSED
        self.orderly = error is None and not reset
        shared = self._shared
        if phase is not _RELAYING:  # a relaying one left both queues already
            shared.connecting.discard(self)
            shared.handshaking.discard(self)
        for handle in (self._resume, self._resolver):
            if handle is not None:
                handle.cancel()
        self._resume = self._resolver = None
        self._handshake = None
        if self._flows is not None:
            for flow in self._flows:
                flow.release()
        for leg in (self._client, self._upstream):
            if leg is not None:
                shared.poller.close(leg.sock, reset=reset)
        self._on_close(self, error)
