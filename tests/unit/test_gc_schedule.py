"""Full garbage collections run on the agent's timer while it holds the schedule."""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import pytest

from egressd.agent import gc_schedule
from egressd.agent.gc_schedule import FullCollections
from tests.unit.conftest import Api


def _threshold_is_respected() -> bool:
    before = gc.get_threshold()
    gc.set_threshold(before[0], before[1], 12345)
    try:
        return gc.get_threshold()[2] == 12345
    finally:
        gc.set_threshold(*before)


pytestmark = pytest.mark.skipif(
    not _threshold_is_respected(),
    reason="this interpreter ignores the full-collection threshold (CPython 3.14.0-3.14.4)",
)


@pytest.fixture(autouse=True)
def _schedule_left_as_found() -> Iterator[None]:
    """Each test gives every hold back: a leftover would turn full collections off for the
    rest of the session and fail unrelated tests far from the cause."""
    before = gc.get_threshold()
    yield
    leftover = gc_schedule._holders
    if leftover:
        gc_schedule._holders, gc_schedule._saved = 0, None
        gc.set_threshold(*before)
    assert leftover == 0
    assert gc.get_threshold() == before


@contextmanager
def full_collections_seen() -> Iterator[list[int]]:
    """Counts the generation-2 collections that start while the block runs."""
    seen: list[int] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(callback)
    try:
        yield seen
    finally:
        gc.callbacks.remove(callback)


def churn() -> None:
    """Enough long-lived-then-dropped objects to make CPython start full collections:
    each batch lives through younger collections (so it is promoted) and dies."""
    for _ in range(40):
        batch = [[i] for i in range(50_000)]
        del batch


def test_churn_makes_full_collections_without_the_schedule() -> None:
    """The premise of the next test: this churn does start automatic full collections."""
    gc.collect()
    with full_collections_seen() as seen:
        churn()
    assert seen


def test_no_automatic_full_collection_while_held() -> None:
    before = gc.get_threshold()
    schedule = FullCollections(interval=30.0)
    schedule.take_over()
    try:
        gc.collect()
        with full_collections_seen() as seen:
            churn()
        assert seen == []
        assert gc.get_threshold()[:2] == before[:2]  # younger generations as before
    finally:
        schedule.give_back()
    assert gc.get_threshold() == before


def test_the_holder_collects_fully_when_due_and_not_before() -> None:
    now = [100.0]
    schedule = FullCollections(interval=30.0, clock=lambda: now[0])
    schedule.take_over()
    try:
        with full_collections_seen() as seen:
            now[0] = 129.9
            assert not schedule.run_if_due()
            assert schedule.due_in() < 0.2
            now[0] = 130.0
            assert schedule.run_if_due()
            assert schedule.due_in() == 30.0
            now[0] = 140.0
            assert not schedule.run_if_due()
        assert len(seen) == 1
    finally:
        schedule.give_back()
    now[0] = 1000.0
    assert schedule.due_in() == float("inf")
    assert not schedule.run_if_due()


def test_nested_holders_restore_the_setting_once_the_last_lets_go() -> None:
    before = gc.get_threshold()
    first, second = FullCollections(), FullCollections()
    try:
        first.take_over()
        second.take_over()
        first.give_back()
        assert gc.get_threshold() != before  # the second still holds it
    finally:
        first.give_back()
        second.give_back()
    second.give_back()  # idempotent
    assert gc.get_threshold() == before


def test_a_late_holder_gets_automatic_collections_back_until_it_runs_again() -> None:
    """A hung agent must not leave the process without full collections."""
    before = gc.get_threshold()
    now = [0.0]
    schedule = FullCollections(interval=30.0, clock=lambda: now[0])
    schedule.take_over()
    try:
        churn()  # younger collections, on time: nothing changes
        assert gc.get_threshold()[2] == gc_schedule._NEVER
        now[0] = 30.0 + 2 * 30.0 + 1  # due at 30, late by more than two intervals
        churn()
        assert gc.get_threshold() == before  # automatic again
        with full_collections_seen() as seen:
            assert schedule.run_if_due()
        assert seen
        assert gc.get_threshold()[2] == gc_schedule._NEVER  # the holder's timer again
    finally:
        schedule.give_back()
    assert gc.get_threshold() == before


def test_a_running_agent_holds_the_schedule_and_collects_on_its_thread(
    api_no_agent: Api,
) -> None:
    before = gc.get_threshold()
    agent = api_no_agent.agent
    # Long enough that a slow machine does not make it late (which would lapse the hold).
    agent._collections = FullCollections(interval=0.5)
    threads: list[str] = []

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 2:
            threads.append(threading.current_thread().name)

    gc.callbacks.append(callback)
    try:
        agent.start()
        deadline = time.monotonic() + 5.0
        while "egressd-agent" not in threads and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "egressd-agent" in threads
        assert gc.get_threshold()[2] > 1_000_000  # no automatic full collection meanwhile
    finally:
        gc.callbacks.remove(callback)
        agent.stop()
    assert gc.get_threshold() == before


def test_a_long_pass_still_collects_on_time(
    api_no_agent: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The schedule is kept inside a pass that outlasts the interval, not only between passes:
    a stuck or long pass must not let garbage pile up with the automatic collections off."""
    agent = api_no_agent.agent
    agent._collections = FullCollections(interval=0.05)
    monkeypatch.setattr(agent.store, "get_network", lambda cid: cid)
    monkeypatch.setattr(agent, "reconcile", lambda view: time.sleep(0.06))
    views: Any = [SimpleNamespace(container=SimpleNamespace(id=f"c{i}")) for i in range(4)]
    agent._collections.take_over()
    try:
        with full_collections_seen() as seen:
            agent._reconcile_views(views, full=False)
    finally:
        agent._collections.give_back()
    assert len(seen) >= 3  # one before each of containers 2, 3 and 4


def test_an_agent_thread_that_ends_gives_the_schedule_back_without_stop(
    api_no_agent: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = gc.get_threshold()
    agent = api_no_agent.agent
    entered = threading.Event()

    def held_then_gone() -> None:
        entered.set()
        assert gc.get_threshold()[2] == gc_schedule._NEVER

    monkeypatch.setattr(agent, "_reconcile_until_stopped", held_then_gone)
    agent.start()
    assert agent._thread is not None
    agent._thread.join(5)
    assert entered.is_set()
    assert gc.get_threshold() == before  # no stop() called
