"""Node heartbeats: which agents are alive, by the store's own clock.

Each agent upserts its ``nodes`` row every ``heartbeat_interval`` seconds;
the API reads it before waiting on that agent. Times come from the store's
clock (PostgreSQL's ``now()``; the local clock for SQLite, which is only
ever used on one host), so skew between hosts does not make a live agent
look dead. Functions here run inside a session the caller opened
(``Store`` keeps one short transaction per call); they hold no state.

The upsert is dialect-specific where the dialect has one (``INSERT ... ON
CONFLICT DO UPDATE`` on PostgreSQL and SQLite) and update-then-insert
elsewhere; both paths are tested on both databases.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from egressd.store.tables import Container, NodeRow, utcnow


@dataclass(frozen=True)
class NodeView:
    """A node as the store knows it, read at ``checked_at`` (the store's clock).

    ``last_seen`` is ``None`` for a node that containers name but whose agent
    has never reported.
    """

    name: str
    last_seen: datetime | None
    started_at: datetime | None
    version: str | None
    containers: int
    checked_at: datetime

    @property
    def seconds_since_seen(self) -> float | None:
        if self.last_seen is None:
            return None
        return max(0.0, (self.checked_at - self.last_seen).total_seconds())

    def is_alive(self, timeout: float) -> bool:
        """Whether the agent reported within the last ``timeout`` seconds."""
        age = self.seconds_since_seen
        return age is not None and age <= timeout


def store_now(session: Session) -> datetime:
    """The store's clock: the database server's on PostgreSQL, ours on SQLite."""
    if session.get_bind().dialect.name == "postgresql":
        value = session.scalar(select(func.now()))
        assert isinstance(value, datetime)
        return value
    return utcnow()


def upsert_native(
    session: Session, *, name: str, now: datetime, started_at: datetime, version: str
) -> None:
    """``INSERT ... ON CONFLICT (name) DO UPDATE`` (PostgreSQL, SQLite >= 3.24)."""
    values = {"last_seen": now, "started_at": started_at, "version": version}
    if session.get_bind().dialect.name == "postgresql":
        pg = postgresql.insert(NodeRow).values(name=name, **values)
        session.execute(pg.on_conflict_do_update(index_elements=[NodeRow.name], set_=values))
    else:
        lite = sqlite.insert(NodeRow).values(name=name, **values)
        session.execute(lite.on_conflict_do_update(index_elements=[NodeRow.name], set_=values))


def upsert_portable(
    session: Session, *, name: str, now: datetime, started_at: datetime, version: str
) -> None:
    """UPDATE, and INSERT when no row was there.

    Two writers inserting the same new name at once make one transaction fail
    with ``IntegrityError``; the caller retries it, and the retry updates.
    """
    result = session.execute(
        update(NodeRow)
        .where(NodeRow.name == name)
        .values(last_seen=now, started_at=started_at, version=version)
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) == 0:
        session.add(NodeRow(name=name, last_seen=now, started_at=started_at, version=version))
        session.flush()


def upsert(
    session: Session, *, name: str, now: datetime, started_at: datetime, version: str
) -> None:
    if session.get_bind().dialect.name in ("postgresql", "sqlite"):
        upsert_native(session, name=name, now=now, started_at=started_at, version=version)
    else:
        upsert_portable(session, name=name, now=now, started_at=started_at, version=version)


def list_nodes(session: Session) -> list[NodeView]:
    """Every node with a heartbeat or a container, by name."""
    now = store_now(session)
    counts: dict[str, int] = {
        node: count
        for node, count in session.execute(
            select(Container.node, func.count()).group_by(Container.node)
        )
    }
    rows = {row.name: row for row in session.scalars(select(NodeRow))}
    return [
        _view(name, rows.get(name), counts.get(name, 0), now)
        for name in sorted(set(rows) | set(counts))
    ]


def get_node(session: Session, name: str) -> NodeView | None:
    """The node's heartbeat, or ``None`` when its agent has never reported."""
    row = session.get(NodeRow, name)
    if row is None:
        return None
    count = session.scalar(select(func.count()).where(Container.node == name)) or 0
    return _view(name, row, count, store_now(session))


def _view(name: str, row: NodeRow | None, containers: int, now: datetime) -> NodeView:
    return NodeView(
        name=name,
        last_seen=row.last_seen if row else None,
        started_at=row.started_at if row else None,
        version=row.version if row else None,
        containers=containers,
        checked_at=now,
    )
