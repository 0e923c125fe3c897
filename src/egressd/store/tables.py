"""SQLAlchemy table definitions.

Desired configuration (``network_configs``), host allocations
(``allocations``) and what the agent observed (``network_status``) are
separate records: the API writes the first, allocates the second, and only
the agent writes the third. ``nodes`` holds each agent's heartbeat. Portable
SQL only (SQLite and PostgreSQL).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Stores UTC; always hands back timezone-aware datetimes (SQLite has no tz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Principal(Base):
    __tablename__ = "principals"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(Base):
    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    principal_id: Mapped[int] = mapped_column(ForeignKey("principals.id", ondelete="CASCADE"))
    # sha256 of the token: tokens are 256-bit random, so a fast hash is enough.
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Container(Base):
    __tablename__ = "containers"
    id: Mapped[str] = mapped_column(String(24), primary_key=True)
    name: Mapped[str | None] = mapped_column(String(128), nullable=True)
    owner_id: Mapped[int | None] = mapped_column(
        ForeignKey("principals.id", ondelete="SET NULL"), nullable=True
    )
    runtime: Mapped[str] = mapped_column(String(16))
    ref: Mapped[str] = mapped_column(String(256))
    node: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class NetworkConfigRow(Base):
    """Desired state, written by the API only."""

    __tablename__ = "network_configs"
    container_id: Mapped[str] = mapped_column(
        ForeignKey("containers.id", ondelete="CASCADE"), primary_key=True
    )
    type: Mapped[str] = mapped_column(String(16))
    proxy_url: Mapped[str | None] = mapped_column(String(2048), nullable=True)  # no userinfo
    proxy_username: Mapped[str | None] = mapped_column(String(255), nullable=True)
    proxy_password: Mapped[str | None] = mapped_column(String(255), nullable=True)
    country: Mapped[str | None] = mapped_column(String(64), nullable=True)
    city: Mapped[str | None] = mapped_column(String(64), nullable=True)
    region: Mapped[str | None] = mapped_column(String(64), nullable=True)
    comment: Mapped[str | None] = mapped_column(Text, nullable=True)
    dns_servers: Mapped[list[str]] = mapped_column(JSON)
    desired_state: Mapped[str] = mapped_column(String(16))
    # Bumped on every change the agent must act on; the agent echoes it back.
    generation: Mapped[int] = mapped_column(Integer, default=1)
    configured_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class AllocationRow(Base):
    __tablename__ = "allocations"
    __table_args__ = (
        UniqueConstraint("node", "subnet", name="uq_allocations_node_subnet"),
        UniqueConstraint("node", "bridge_name", name="uq_allocations_node_bridge"),
    )
    container_id: Mapped[str] = mapped_column(
        ForeignKey("containers.id", ondelete="CASCADE"), primary_key=True
    )
    node: Mapped[str] = mapped_column(String(64))
    subnet: Mapped[str] = mapped_column(String(43))
    bridge_name: Mapped[str] = mapped_column(String(15))
    port: Mapped[int] = mapped_column(Integer)


class NetworkStatusRow(Base):
    """Observed state, written by the agent only."""

    __tablename__ = "network_status"
    container_id: Mapped[str] = mapped_column(
        ForeignKey("containers.id", ondelete="CASCADE"), primary_key=True
    )
    status: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    is_running: Mapped[bool] = mapped_column(Boolean, default=False)
    observed_generation: Mapped[int] = mapped_column(Integer, default=0)
    last_check: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # What the agent put in the kernel and must undo: type, netns path, saved routes.
    applied: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    upstream: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class NodeRow(Base):
    """One row per node (host) whose agent has ever run; written by that agent only."""

    __tablename__ = "nodes"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    # The store's clock, not the agent's: hosts' clocks may disagree.
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    version: Mapped[str] = mapped_column(String(32))
