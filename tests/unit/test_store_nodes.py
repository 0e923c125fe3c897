"""Store: migration 0002 and node heartbeats on SQLite (PostgreSQL: test_multihost_pg.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, select
from sqlalchemy.orm import Session

from egressd.store import Store, make_engine, migrate
from egressd.store import nodes as node_queries
from egressd.store.db import alembic_config
from egressd.store.nodes import NodeView
from egressd.store.tables import NodeRow

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    engine = make_engine(f"sqlite:///{tmp_path / 'egressd.db'}")
    migrate(engine)
    yield Store(engine, node="local")
    engine.dispose()


def test_migration_0002_up_down_up(tmp_path: Path) -> None:
    from alembic import command

    engine = make_engine(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        migrate(engine, revision="0001")
        assert "nodes" not in inspect(engine).get_table_names()
        migrate(engine)
        assert {c["name"] for c in inspect(engine).get_columns("nodes")} == {
            "name",
            "last_seen",
            "started_at",
            "version",
        }
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0001")
        assert "nodes" not in inspect(engine).get_table_names()
        migrate(engine)
        migrate(engine)  # idempotent
        assert "nodes" in inspect(engine).get_table_names()
    finally:
        engine.dispose()


def test_heartbeat_inserts_then_updates_keeping_started_at(store: Store) -> None:
    started = store.record_heartbeat("a", version="0.1.0")
    first = store.get_node("a")
    assert first is not None and first.started_at == started == first.last_seen
    again = store.record_heartbeat("a", version="0.1.1", started_at=started)
    assert again == started
    second = store.get_node("a")
    assert second is not None
    assert second.last_seen is not None and first.last_seen is not None
    assert second.last_seen >= first.last_seen
    assert second.started_at == started and second.version == "0.1.1"
    with Session(store.engine) as s:
        assert s.scalar(select(NodeRow.name)) == "a"
        assert len(s.scalars(select(NodeRow)).all()) == 1


@pytest.mark.parametrize("upsert", [node_queries.upsert_native, node_queries.upsert_portable])
def test_both_upsert_paths_insert_and_update(store: Store, upsert: object) -> None:
    assert callable(upsert)
    for i, version in enumerate(("1", "2", "3")):
        with Session(store.engine) as s, s.begin():
            now = T0 + timedelta(seconds=i)
            upsert(s, name="n", now=now, started_at=T0, version=version)
    with Session(store.engine) as s:
        row = s.get(NodeRow, "n")
        assert row is not None
        assert (row.last_seen, row.started_at, row.version) == (T0 + timedelta(seconds=2), T0, "3")


def test_concurrent_first_beats_of_one_name_end_in_one_row(store: Store) -> None:
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def beat() -> None:
        try:
            barrier.wait()
            store.record_heartbeat("same", version="x")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=beat) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert [v.name for v in store.list_nodes()] == ["same"]


def test_list_nodes_includes_nodes_known_only_from_containers(store: Store) -> None:
    store.create_container(container_id=None, name=None, owner=None, runtime="netns", ref="x")
    store.create_container(
        container_id=None, name=None, owner=None, runtime="netns", ref="y", node="b"
    )
    store.create_container(
        container_id=None, name=None, owner=None, runtime="netns", ref="z", node="b"
    )
    store.record_heartbeat("a", version="v")
    views = {v.name: v for v in store.list_nodes()}
    assert sorted(views) == ["a", "b", "local"]
    assert views["a"].containers == 0 and views["a"].last_seen is not None
    assert views["b"].containers == 2 and views["b"].last_seen is None
    assert views["b"].version is None and not views["b"].is_alive(60)
    assert views["local"].containers == 1
    assert store.get_node("b") is None  # never reported
    got = store.get_node("a")
    assert got is not None and got.is_alive(60)


def test_alive_is_a_window_on_the_stores_clock() -> None:
    def view(age: float | None) -> NodeView:
        seen = None if age is None else T0 - timedelta(seconds=age)
        return NodeView("n", seen, seen, "v", 0, checked_at=T0)

    assert view(0).is_alive(15) and view(15).is_alive(15)
    assert not view(15.001).is_alive(15)
    assert not view(None).is_alive(15)
    assert view(4.5).seconds_since_seen == 4.5
    # A writer whose clock ran ahead does not make the age negative.
    assert view(-3).seconds_since_seen == 0.0 and view(-3).is_alive(15)


def test_stale_row_reads_not_alive(store: Store) -> None:
    with Session(store.engine) as s, s.begin():
        old = datetime.now(UTC) - timedelta(seconds=100)
        node_queries.upsert(s, name="old", now=old, started_at=old, version="v")
    got = store.get_node("old")
    assert got is not None
    assert got.seconds_since_seen is not None and got.seconds_since_seen >= 100
    assert not got.is_alive(15) and got.is_alive(1000)
