"""Engine creation and schema migrations.

SQLite is the embedded default: WAL journal and ``synchronous=FULL`` so a
write acknowledged to a client survives ``kill -9`` (and power loss) of the
server. PostgreSQL is used through the same code by URL; there several
processes (API replicas, agents) may start at once, so ``migrate`` holds a
transaction-scoped advisory lock and the later ones find the schema current.

Pools hand out the most recently returned connection first (LIFO), so a
steady load keeps reusing a few warm connections. On SQLite the pool is as
large as the number of threads that can hold a connection at once (FastAPI's
thread pool, the agent's threads, the event loop): a connection beyond the
pool would be opened, set up (PRAGMAs, schema read) and closed again for
every use, which under load cost more than the queries themselves. The
event loop reads SQLite directly (``Store.reads_are_local``), so it must
never have to wait for a free connection.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
# pg_advisory_xact_lock key serializing schema migrations (any constant of our own).
MIGRATION_LOCK_KEY = 0x6567_7265_7373_6400  # "egressd\0"


# FastAPI's thread pool (anyio's default limiter: 40 threads), the agent's and
# heartbeat's threads, asyncio's default executor, and the event loop.
SQLITE_POOL_SIZE = 64
# PostgreSQL connections are server processes shared by every replica and
# agent (max_connections): at most 24 per process, as before, but 16 of them
# kept open so a request burst does not connect and disconnect per request.
PG_POOL_SIZE = 16
PG_MAX_OVERFLOW = 8


def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    """Once per engine: WAL is a property of the database file and persists in it."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Per connection: these settings live in the connection, not in the file."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _with_driver(url: str) -> str:
    """``postgresql://`` means psycopg 3 here (SQLAlchemy would pick psycopg2)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def make_engine(url: str) -> Engine:
    url = _with_driver(url)
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False},
            pool_size=SQLITE_POOL_SIZE,
            max_overflow=0,
            pool_use_lifo=True,
        )
        event.listen(engine, "first_connect", _sqlite_wal)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=PG_POOL_SIZE,
        max_overflow=PG_MAX_OVERFLOW,
        pool_use_lifo=True,
    )


def alembic_config(connection: Connection) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def migrate(engine: Engine, *, revision: str = "head") -> None:
    """Bring the schema to ``revision`` (default: the newest; idempotent)."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Released at commit; DDL is transactional there, so it is all or nothing.
            connection.execute(
                text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY}
            )
        command.upgrade(alembic_config(connection), revision)


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
