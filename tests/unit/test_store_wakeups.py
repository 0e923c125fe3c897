"""Wake-ups: the in-process implementation, and PgWakeups' routing without a server.

Real LISTEN/NOTIFY between processes is in tests/integration/test_multihost_pg.py.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine

from egressd.store.wakeups import (
    AGENT_CHANNEL,
    OBSERVED_CHANNEL,
    PgWakeups,
    Wakeups,
    wakeups_for,
)


@pytest.fixture
def sqlite_engine() -> Iterator[Engine]:
    engine = create_engine("sqlite://")
    yield engine
    engine.dispose()


def test_in_process_notify_agent_takes_an_optional_node() -> None:
    w = Wakeups()
    assert not w.work_pending()
    w.notify_agent()
    assert w.work_pending()
    assert w.wait_for_work(0) is True
    assert not w.work_pending()
    w.notify_agent("b")  # one process, one agent: any node wakes it
    assert w.wait_for_work(0) is True
    assert w.wait_for_work(0.01) is False
    w.start()
    w.close()


def test_wait_until_wakes_on_notify_long_before_the_poll() -> None:
    w = Wakeups(poll=30.0)
    flag = threading.Event()

    def later() -> None:
        time.sleep(0.1)
        flag.set()
        w.notify_observed()

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    assert w.wait_until(flag.is_set, timeout=10)
    assert time.monotonic() - t0 < 2


def test_wait_until_does_not_lose_a_notify_between_check_and_wait() -> None:
    w = Wakeups(poll=30.0)
    calls = 0

    def done() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            w.notify_observed()  # lands after the check, before the wait
            return False
        return True

    t0 = time.monotonic()
    assert w.wait_until(done, timeout=10)
    assert time.monotonic() - t0 < 1


def test_wait_until_times_out() -> None:
    w = Wakeups(poll=0.01)
    t0 = time.monotonic()
    assert w.wait_until(lambda: False, timeout=0.1) is False
    assert 0.1 <= time.monotonic() - t0 < 1


def test_wakeups_for_picks_by_database(sqlite_engine: Engine) -> None:
    assert type(wakeups_for(sqlite_engine, agent_node="a", observe=True)) is Wakeups
    pg = create_engine("postgresql+psycopg://u@127.0.0.1:1/db")
    try:
        chosen = wakeups_for(pg, agent_node="a", observe=False)
        assert isinstance(chosen, PgWakeups)
        assert chosen.channels == (AGENT_CHANNEL,)
    finally:
        pg.dispose()


def test_pg_dispatch_wakes_only_our_node_or_everyone(sqlite_engine: Engine) -> None:
    agent = PgWakeups(sqlite_engine, agent_node="a", observe=False)
    agent.dispatch(AGENT_CHANNEL, "b")
    assert not agent.work_pending()
    agent.dispatch(AGENT_CHANNEL, "a")
    assert agent.wait_for_work(0)
    agent.dispatch(AGENT_CHANNEL, "*")
    assert agent.wait_for_work(0)
    agent.dispatch(OBSERVED_CHANNEL, "")  # not an API process: ignored
    assert not agent.work_pending()


def test_pg_dispatch_observed_wakes_api_waiters(sqlite_engine: Engine) -> None:
    api = PgWakeups(sqlite_engine, agent_node=None, observe=True, poll=30.0)
    assert api.channels == (OBSERVED_CHANNEL,)
    api.dispatch(AGENT_CHANNEL, "*")  # no agent here
    assert not api.work_pending()
    flag = threading.Event()

    def later() -> None:
        time.sleep(0.1)
        flag.set()
        api.dispatch(OBSERVED_CHANNEL, "")

    threading.Thread(target=later).start()
    t0 = time.monotonic()
    assert api.wait_until(flag.is_set, timeout=10)
    assert time.monotonic() - t0 < 2


def test_pg_notify_is_best_effort_and_wakes_our_own_agent_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Nothing listens on 127.0.0.1:1: sending fails, is logged without the password, and
    # the local agent is still woken (Agent.stop relies on it with the database away).
    engine = create_engine(
        "postgresql+psycopg://egressd:s3cret-pw@127.0.0.1:1/egressd",
        connect_args={"connect_timeout": 2},
    )
    try:
        w = PgWakeups(engine, agent_node="a", observe=True)
        with caplog.at_level(logging.WARNING, logger="egressd.store.wakeups"):
            w.notify_agent()
            w.notify_observed()
        assert w.work_pending()
        other = PgWakeups(engine, agent_node="a", observe=False)
        other.notify_agent("b")  # another node's agent: not ours to wake
        assert not other.work_pending()
    finally:
        engine.dispose()
    assert "NOTIFY egressd_agent failed" in caplog.text
    assert "s3cret-pw" not in caplog.text


def test_pg_start_without_channels_is_a_no_op(sqlite_engine: Engine) -> None:
    w = PgWakeups(sqlite_engine, agent_node=None, observe=False)
    w.start()
    assert not w.listening
    w.close()
