"""The spliced data path's building blocks alone: EdgePoller, DeadlineQueue, PipePool,
and the kernel behaviour the relay relies on (options inherited at accept, ET edges)."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from egressd.relay._channel import KEEPALIVE_IDLE, tune_tcp
from egressd.relay._deadlines import DeadlineQueue
from egressd.relay._pipes import PipePool
from egressd.relay._poller import WATCH_BASE, WATCH_READS, WATCH_WRITES, EdgePoller
from egressd.relay._spliced import SpliceShared
from tests.unit.test_relay_channels import tcp_pair
from tests.unit.test_relay_peers import LOOPBACK, async_test

EVERYTHING = WATCH_BASE | WATCH_READS | WATCH_WRITES


class Recorder:
    """An EdgeHandler that records its events and can act on them."""

    def __init__(self, name: str, log: list[tuple[str, int]]) -> None:
        self.name = name
        self.log = log
        self.action: object = None
        self.failed = False

    def on_events(self, fd: int, events: int) -> None:
        self.log.append((self.name, events))
        if callable(self.action):
            self.action()

    def on_failure(self) -> None:
        self.failed = True


@contextmanager
def nonblocking_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    one, two = tcp_pair()
    try:
        for sock in (one, two):
            sock.setblocking(False)
        yield one, two
    finally:
        one.close()
        two.close()


async def settle() -> None:
    """A few loop turns: enough for the epoll fd's reader callback to run."""
    for _ in range(3):
        await asyncio.sleep(0.01)


# -- EdgePoller ----------------------------------------------------------------------------


@async_test
async def test_poller_reports_each_change_once() -> None:
    poller = EdgePoller(asyncio.get_running_loop())
    log: list[tuple[str, int]] = []
    with nonblocking_pair() as (watched, peer):
        poller.register(watched, Recorder("a", log), EVERYTHING)
        await settle()
        assert log and log[-1][1] & select.EPOLLOUT  # writable at registration
        log.clear()
        peer.send(b"x")
        await settle()
        assert len(log) == 1 and log[0][1] & select.EPOLLIN
        await settle()
        assert len(log) == 1  # edge-triggered: no repeat although still readable
        peer.send(b"y")  # every arrival is a new edge, drained or not
        await settle()
        assert len(log) == 2
        poller.close(watched)
    poller.shutdown()


@async_test
async def test_poller_modify_drops_and_restores_read_interest() -> None:
    poller = EdgePoller(asyncio.get_running_loop())
    log: list[tuple[str, int]] = []
    with nonblocking_pair() as (watched, peer):
        poller.register(watched, Recorder("a", log), EVERYTHING)
        await settle()
        poller.modify(watched, WATCH_BASE | WATCH_WRITES)
        await settle()
        log.clear()
        peer.send(b"unseen")
        await settle()
        assert not any(events & select.EPOLLIN for _, events in log)
        poller.modify(watched, EVERYTHING)  # what is pending is reported at once
        await settle()
        assert any(events & select.EPOLLIN for _, events in log)
        poller.close(watched)
    poller.shutdown()


@async_test
async def test_poller_defers_closes_to_the_end_of_a_batch() -> None:
    """A socket closed by an earlier handler keeps its fd number for the rest of the batch
    (so no new socket can take it), and its own pending event is dropped."""
    poller = EdgePoller(asyncio.get_running_loop())
    log: list[tuple[str, int]] = []
    with nonblocking_pair() as (a, a_peer), nonblocking_pair() as (b, b_peer):
        first, second = Recorder("a", log), Recorder("b", log)
        poller.register(a, first, EVERYTHING)
        poller.register(b, second, EVERYTHING)
        await settle()
        log.clear()
        seen_open: list[bool] = []

        def closer(other: socket.socket) -> Callable[[], None]:
            def close_other() -> None:
                fd = other.fileno()
                poller.close(other)
                seen_open.append(fd_is_open(fd))  # still open within the batch

            return close_other

        first.action = closer(b)
        second.action = closer(a)
        a_peer.send(b"1")
        b_peer.send(b"2")
        await settle()
        names = [name for name, _ in log]
        assert len(names) == 1  # whichever ran first closed the other: its event was dropped
        assert seen_open == [True]
        assert b.fileno() == -1 or a.fileno() == -1  # and closed after the batch
    poller.shutdown()


@async_test
async def test_poller_isolates_a_failing_handler(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="egressd.relay")
    poller = EdgePoller(asyncio.get_running_loop())
    log: list[tuple[str, int]] = []
    with nonblocking_pair() as (a, a_peer), nonblocking_pair() as (b, b_peer):
        broken, fine = Recorder("a", log), Recorder("b", log)
        poller.register(a, broken, EVERYTHING)
        poller.register(b, fine, EVERYTHING)
        await settle()
        log.clear()

        def boom() -> None:
            raise RuntimeError("bug")

        broken.action = boom
        a_peer.send(b"1")
        b_peer.send(b"2")
        await settle()
        assert broken.failed and not fine.failed
        assert ("b", select.EPOLLIN) in [(n, e & select.EPOLLIN) for n, e in log]
        assert "handler failed" in caplog.text
        poller.close(a)
        poller.close(b)
    poller.shutdown()
    poller.shutdown()  # idempotent


# -- DeadlineQueue -------------------------------------------------------------------------


@async_test
async def test_deadlines_expire_in_order_unless_discarded() -> None:
    expired: list[str] = []
    queue: DeadlineQueue[str] = DeadlineQueue(
        asyncio.get_running_loop(), timeout=0.05, on_expired=expired.append
    )
    queue.add("a")
    queue.add("b")
    queue.add("c")
    queue.discard("a")  # the armed timer fires for nothing, then re-arms for "b"
    queue.discard("missing")
    assert len(queue) == 2 and "b" in queue
    await asyncio.sleep(0.4)
    assert expired == ["b", "c"]
    assert len(queue) == 0


@async_test
async def test_deadlines_added_while_expiring_are_not_lost() -> None:
    loop = asyncio.get_running_loop()
    expired: list[tuple[str, float]] = []
    queue: DeadlineQueue[str]

    def on_expired(key: str) -> None:
        expired.append((key, loop.time()))
        if key == "a":
            queue.add("late")

    queue = DeadlineQueue(loop, timeout=0.05, on_expired=on_expired)
    started = loop.time()
    queue.add("a")
    await asyncio.sleep(0.02)
    queue.add("b")
    await asyncio.sleep(0.5)
    assert [key for key, _ in expired] == ["a", "b", "late"]
    assert all(when - started >= 0.05 for _, when in expired)


@async_test
async def test_deadlines_readd_restarts_the_clock_and_close_stops_all() -> None:
    expired: list[str] = []
    queue: DeadlineQueue[str] = DeadlineQueue(
        asyncio.get_running_loop(), timeout=0.3, on_expired=expired.append
    )
    queue.add("a")
    await asyncio.sleep(0.15)
    queue.add("a")  # back to the end, full timeout again
    await asyncio.sleep(0.2)  # past the first deadline, well before the second
    assert expired == []
    await asyncio.sleep(0.4)
    assert expired == ["a"]
    queue.add("b")
    queue.close()
    await asyncio.sleep(0.4)
    assert expired == ["a"]


# -- PipePool ------------------------------------------------------------------------------


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_pipe_pool_reuses_only_empty_pipes_and_bounds_idle_ones() -> None:
    pool = PipePool(max_idle=1)
    first = pool.acquire()
    assert pool.created == 1
    pool.release(first, empty=True)
    assert pool.acquire() is first  # reused, not made anew
    assert pool.created == 1
    os.write(first.write_fd, b"left over")
    pool.release(first, empty=False)  # bytes in it: never handed out again
    assert not fd_is_open(first.read_fd) and not fd_is_open(first.write_fd)
    two, three = pool.acquire(), pool.acquire()
    pool.release(two, empty=True)
    pool.release(three, empty=True)  # beyond max_idle: closed
    assert len(pool) == 1 and not fd_is_open(three.read_fd)
    pool.close()
    assert len(pool) == 0 and not fd_is_open(two.read_fd)


@async_test
async def test_proxy_legs_get_keepalive_later_if_still_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Keepalive options cost four syscalls: only legs that outlive the delay get them."""
    monkeypatch.setattr("egressd.relay._spliced.KEEPALIVE_DELAY", 0.05)
    shared = SpliceShared(asyncio.get_running_loop(), connect_timeout=1, handshake_timeout=1)
    kept, kept_peer = tcp_pair()
    gone, gone_peer = tcp_pair()
    with kept, kept_peer, gone_peer:
        shared.tune_later(kept)
        shared.tune_later(gone)
        gone.close()  # a short connection: over before the delay
        assert not kept.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        await asyncio.sleep(0.15)
        assert kept.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        assert kept.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
        shared.tune_later(kept)
        shared.close()  # the pending batch is dropped with the timer
        assert shared._tuner is None and not shared._untuned


# -- what the relay assumes of the kernel --------------------------------------------------


def test_accepted_sockets_inherit_the_listeners_tcp_options() -> None:
    """The relay tunes its listeners once instead of every accepted socket."""
    with socket.socket() as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen()
        tune_tcp(listener)
        with socket.create_connection(listener.getsockname()) as _client:
            accepted, _ = listener.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
                assert (
                    accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == KEEPALIVE_IDLE
                )
