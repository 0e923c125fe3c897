"""Queries and writes, one short transaction each.

``Store`` is the only object the API and the agent use to reach the
database. It returns plain frozen views (``NetworkView``), never ORM rows,
so callers cannot write by accident. Thread-safe: every method opens its
own session. The reads every API request makes (token, container, network)
are single Core SELECTs on a pooled connection (``store.reads``).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, Row, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from egressd import gil
from egressd.errors import AllocationExhausted, Conflict, InvalidInput, NotFound
from egressd.model import (
    DesiredState,
    NetworkConfig,
    NetworkType,
    ProxySpec,
    Status,
    bridge_name_for,
)
from egressd.store import nodes, reads
from egressd.store.db import make_sessionmaker
from egressd.store.nodes import NodeView
from egressd.store.tables import (
    AllocationRow,
    ApiToken,
    Container,
    NetworkConfigRow,
    NetworkStatusRow,
    Principal,
    utcnow,
)
from egressd.store.views import (
    ContainerView,
    NetworkView,
    PrincipalView,
    config_from_row,
    container_view_of,
    stored_proxy,
)

# Ids per IN (...) list: well below SQLite's bound on parameters in one statement.
_IDS_PER_QUERY = 500


@dataclass(frozen=True)
class ProbeTarget:
    """A container the probe round checks (see :meth:`Store.probe_targets`)."""

    container_id: str
    proxy: ProxySpec
    status: Status  # as last observed


@dataclass(frozen=True)
class HealthUpdate:
    """One probe result for the containers behind one upstream (see :meth:`Store.record_health`)."""

    container_ids: Sequence[str]
    status: Status
    reason: str | None
    upstream: dict[str, Any]


TOKEN_PREFIX = "egd_"  # noqa: S105 - a prefix, not a secret


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Store:
    def __init__(self, engine: Engine, *, node: str) -> None:
        self.engine = engine
        self.node = node
        self._sessions = make_sessionmaker(engine)
        # Single-statement reads need no transaction around them: one SELECT
        # sees one snapshot either way. On PostgreSQL autocommit saves the BEGIN
        # and ROLLBACK round trips (same pool as ``engine``); Python's sqlite3
        # never begins a transaction for a SELECT, and switching its mode per
        # checkout would only add cost there.
        self._reader = (
            engine
            if self.reads_are_local
            else engine.execution_options(isolation_level="AUTOCOMMIT")
        )
        # SQLite: the per-request reads straight on the DBAPI cursor (see ``reads``).
        self._direct: dict[Any, reads.DirectRead] | None = {} if self.reads_are_local else None

    @property
    def reads_are_local(self) -> bool:
        """Whether a read is a lookup in a local file (SQLite), never a network round trip.

        Such reads take tens of microseconds, and in WAL mode a reader never
        waits for a writer; the API runs them on its event loop instead of
        paying a thread-pool hop (see ``api.deps.store_read``).
        """
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def _read_one(self, statement: Any, params: dict[str, Any]) -> Row[Any] | None:
        """One row of one of ``reads``' SELECTs, on a pooled connection, without a Session."""
        if self._direct is not None:
            direct = self._direct.get(statement)
            if direct is None:
                direct = self._direct[statement] = reads.DirectRead(statement, self.engine.dialect)
            row: Row[Any] | None = direct.first(self.engine, params)
            return row
        with self._reader.connect() as connection:
            return connection.execute(statement, params).first()

    # -- principals and tokens -------------------------------------------------

    def ensure_principal(self, name: str, *, admin: bool = False) -> PrincipalView:
        with self._tx() as s:
            row = s.scalar(select(Principal).where(Principal.name == name))
            if row is None:
                row = Principal(name=name, is_admin=admin, created_at=utcnow())
                s.add(row)
                s.flush()
            elif admin and not row.is_admin:
                row.is_admin = True
            return PrincipalView(row.id, row.name, row.is_admin)

    def create_token(self, principal_name: str, *, admin: bool = False) -> str:
        """Create a token for ``principal_name`` (created if new); returns it once."""
        principal = self.ensure_principal(principal_name, admin=admin)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._tx() as s:
            s.add(ApiToken(principal_id=principal.id, token_hash=hash_token(token)))
        return token

    def principal_for_token(self, token: str) -> PrincipalView | None:
        digest = hash_token(token)
        row = self._read_one(reads.PRINCIPAL_BY_TOKEN_HASH, {"token_hash": digest})
        if row is None or not hmac.compare_digest(row.token_hash, digest):
            return None
        return reads.principal_of(row)

    def has_admin(self) -> bool:
        with self._tx() as s:
            return (
                s.scalar(
                    select(func.count())
                    .select_from(ApiToken)
                    .join(Principal, Principal.id == ApiToken.principal_id)
                    .where(Principal.is_admin.is_(True))
                )
                or 0
            ) > 0

    # -- containers ------------------------------------------------------------

    def _container_view(self, s: Session, row: Container) -> ContainerView:
        owner = s.get(Principal, row.owner_id) if row.owner_id is not None else None
        return container_view_of(row, owner.name if owner else None)

    def create_container(
        self,
        *,
        container_id: str | None,
        name: str | None,
        owner: str | None,
        runtime: str,
        ref: str,
        node: str | None = None,
    ) -> ContainerView:
        cid = container_id or secrets.token_hex(12)
        with self._tx() as s:
            owner_id = None
            if owner is not None:
                p = s.scalar(select(Principal).where(Principal.name == owner))
                if p is None:
                    raise InvalidInput(f"Unknown owner '{owner}'")
                owner_id = p.id
            if s.get(Container, cid) is not None:
                raise Conflict("Container already exists")
            row = Container(
                id=cid,
                name=name,
                owner_id=owner_id,
                runtime=runtime,
                ref=ref,
                node=node or self.node,
                created_at=utcnow(),
            )
            s.add(row)
            s.flush()
            return self._container_view(s, row)

    def get_container(self, container_id: str) -> ContainerView:
        row = self._read_one(reads.CONTAINER_BY_ID, {"container_id": container_id})
        if row is None:
            raise NotFound("Container not found")
        return reads.container_of(row)

    def list_containers(self, *, owner_id: int | None = None) -> list[ContainerView]:
        with self._tx() as s:
            q = select(Container).order_by(Container.created_at, Container.id)
            if owner_id is not None:
                q = q.where(Container.owner_id == owner_id)
            return [self._container_view(s, row) for row in s.scalars(q)]

    def delete_container(self, container_id: str) -> None:
        with self._tx() as s:
            if s.get(NetworkConfigRow, container_id) is not None:
                raise Conflict("Container still has a network configuration")
            s.execute(delete(NetworkStatusRow).where(NetworkStatusRow.container_id == container_id))
            s.execute(delete(AllocationRow).where(AllocationRow.container_id == container_id))
            s.execute(delete(Container).where(Container.id == container_id))

    # -- network configuration (desired) ---------------------------------------

    def get_network(self, container_id: str) -> NetworkView:
        """The container with its configuration, allocation and observed state: one SELECT."""
        row = self._read_one(reads.NETWORK_BY_CONTAINER_ID, {"container_id": container_id})
        if row is None:
            raise NotFound("Container not found")
        return reads.network_of(row)

    def list_networks(self, *, node: str, only_pending: bool = False) -> list[NetworkView]:
        """Every container of ``node`` that has a configuration or leftovers to undo.

        One query (outer joins), not one per container: the agent calls this
        on every wake-up, with hundreds of containers per node.
        ``only_pending``: just those the agent has not acted on yet (no
        observed record, an older observed generation, a failed apply, or
        leftovers of a removed configuration), filtered in SQL.
        """
        query = reads.networks_of_node(node, only_pending=only_pending)
        views: list[NetworkView] = []
        with self.engine.connect() as connection:
            for row in connection.execute(query):
                views.append(reads.network_of(row))
                gil.breathe()  # ~50 us of Python a row: let the API's loop in
        return views

    def probe_targets(self, *, node: str) -> list[ProbeTarget]:
        """The running proxy containers of ``node`` that the agent has settled.

        What a probe round needs and no more (``reads.probe_targets_of_node``):
        at a thousand containers the full views cost the agent's thread ~55 ms
        of Python per round, next to the API's loop.
        """
        targets: list[ProbeTarget] = []
        proxies: dict[tuple[str, str, str | None, str | None], ProxySpec | None] = {}
        with self.engine.connect() as connection:
            for cid, ntype, url, username, password, status in connection.execute(
                reads.probe_targets_of_node(node)
            ):
                key = (ntype, url, username, password)
                if key not in proxies:  # hundreds of containers share an upstream
                    proxies[key] = stored_proxy(NetworkType(ntype), url, username, password)
                proxy = proxies[key]
                if proxy is not None:
                    targets.append(ProbeTarget(cid, proxy, Status(status)))
        return targets

    def record_health(self, updates: Sequence[HealthUpdate]) -> None:
        """Write a probe round: status, reason, upstream and check time, in one transaction.

        One UPDATE per upstream (per 500 of its containers), not a row's worth of
        Python per container; what the agent applied, its generation and
        ``is_running`` stay as they are. Containers deleted meanwhile have no
        row left to update.
        """
        now = utcnow()
        with self.engine.begin() as connection:
            for health in updates:
                ids = list(health.container_ids)
                for first in range(0, len(ids), _IDS_PER_QUERY):
                    connection.execute(
                        update(NetworkStatusRow)
                        .where(
                            NetworkStatusRow.container_id.in_(ids[first : first + _IDS_PER_QUERY])
                        )
                        .values(
                            status=health.status.value,
                            reason=health.reason,
                            upstream=health.upstream,
                            last_check=now,
                        )
                    )

    def put_config(
        self,
        container_id: str,
        config: NetworkConfig,
        *,
        pool: ipaddress.IPv4Network,
        prefix: int,
        port: int,
    ) -> NetworkView:
        """Store the desired configuration; allocate host resources for proxy types.

        Credentials are kept when the new proxy has the same endpoint and no
        userinfo. A running container stays running (the agent re-applies).
        """
        for attempt in range(5):
            try:
                with self._tx() as s:
                    self._put_config(s, container_id, config, pool, prefix, port)
                return self.get_network(container_id)
            except IntegrityError:  # a concurrent allocation took our subnet: retry
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    def _put_config(
        self,
        s: Session,
        container_id: str,
        config: NetworkConfig,
        pool: ipaddress.IPv4Network,
        prefix: int,
        port: int,
    ) -> None:
        container = s.get(Container, container_id)
        if container is None:
            raise NotFound("Container not found")
        row = s.get(NetworkConfigRow, container_id)
        stored = config_from_row(row) if row is not None and row.desired_state != "absent" else None
        proxy = config.proxy
        if proxy is not None:
            proxy = proxy.keeping_credentials_of(stored.proxy if stored else None)
        if row is None:
            row = NetworkConfigRow(container_id=container_id, generation=0)
            s.add(row)
            row.desired_state = DesiredState.CONFIGURED.value
        elif row.desired_state == DesiredState.ABSENT.value:
            row.desired_state = DesiredState.CONFIGURED.value
        row.type = config.type.value
        row.proxy_url = proxy.endpoint_url if proxy else None
        row.proxy_username = proxy.username if proxy else None
        row.proxy_password = proxy.password if proxy else None
        row.country, row.city, row.region = config.country, config.city, config.region
        row.comment = config.comment
        row.dns_servers = list(config.dns_servers)
        row.generation = (row.generation or 0) + 1
        row.configured_at = utcnow()
        if config.type.is_proxy and s.get(AllocationRow, container_id) is None:
            s.add(self._allocate(s, container, pool, prefix, port))

    def _allocate(
        self,
        s: Session,
        container: Container,
        pool: ipaddress.IPv4Network,
        prefix: int,
        port: int,
    ) -> AllocationRow:
        bridge = bridge_name_for(container.id)
        holder = s.scalar(
            select(AllocationRow.container_id).where(
                AllocationRow.node == container.node, AllocationRow.bridge_name == bridge
            )
        )
        if holder is not None:
            # Bridge names keep 12 hex of the id (IFNAMSIZ): ids that share
            # them cannot both be enforced on one node.
            raise Conflict(
                f"Container {holder} on node '{container.node}' already uses bridge {bridge} "
                "(container ids share their first 12 hex digits)"
            )
        taken = set(
            s.scalars(select(AllocationRow.subnet).where(AllocationRow.node == container.node))
        )
        for subnet in pool.subnets(new_prefix=prefix):
            if str(subnet) not in taken:
                return AllocationRow(
                    container_id=container.id,
                    node=container.node,
                    subnet=str(subnet),
                    bridge_name=bridge_name_for(container.id),
                    port=port,
                )
        raise AllocationExhausted(f"No free /{prefix} left in pool {pool}")

    def set_desired_state(self, container_id: str, state: DesiredState) -> int:
        """Record what the operator wants; returns the generation to wait for."""
        with self._tx() as s:
            row = s.get(NetworkConfigRow, container_id)
            if row is None or row.desired_state == DesiredState.ABSENT.value:
                raise NotFound("Network not configured for this container")
            row.desired_state = state.value
            row.generation += 1
            return row.generation

    # -- observed state (agent only) --------------------------------------------

    def record_observed(
        self,
        container_id: str,
        *,
        status: Status,
        reason: str | None,
        is_running: bool,
        observed_generation: int,
        applied: dict[str, Any] | None,
        upstream: dict[str, Any] | None = None,
    ) -> None:
        """Write the agent's observed record of one container; nothing if it was deleted."""
        values = {
            "status": status.value,
            "reason": reason,
            "is_running": is_running,
            "observed_generation": observed_generation,
            "last_check": utcnow(),
            "applied": applied,
            "upstream": upstream,
        }
        with self.engine.begin() as connection:
            if connection.scalar(select(Container.id).where(Container.id == container_id)) is None:
                return
            changed = connection.execute(
                update(NetworkStatusRow)
                .where(NetworkStatusRow.container_id == container_id)
                .values(values)
            ).rowcount
            if not changed:
                connection.execute(
                    insert(NetworkStatusRow).values(container_id=container_id, **values)
                )

    def forget_network(self, container_id: str, *, generation: int) -> bool:
        """Drop config, allocation and status once the agent has undone everything.

        Only when the configuration is still the one marked absent at
        ``generation``: a PATCH that came in meanwhile wins.
        """
        with self._tx() as s:
            row = s.get(NetworkConfigRow, container_id)
            if row is not None and (
                row.desired_state != DesiredState.ABSENT.value or row.generation != generation
            ):
                return False
            s.execute(delete(NetworkConfigRow).where(NetworkConfigRow.container_id == container_id))
            s.execute(delete(AllocationRow).where(AllocationRow.container_id == container_id))
            s.execute(delete(NetworkStatusRow).where(NetworkStatusRow.container_id == container_id))
            return True

    # -- nodes (agent heartbeats) --------------------------------------------------

    def record_heartbeat(
        self, node: str, *, version: str, started_at: datetime | None = None
    ) -> datetime:
        """Mark ``node``'s agent alive now; returns its ``started_at`` (now on a first beat)."""
        for attempt in range(2):
            try:
                with self._tx() as s:
                    now = nodes.store_now(s)
                    started = started_at or now
                    nodes.upsert(s, name=node, now=now, started_at=started, version=version)
                    return started
            except IntegrityError:  # a concurrent first insert of the same name: update
                if attempt == 1:
                    raise
        raise AssertionError("unreachable")

    def list_nodes(self) -> list[NodeView]:
        with self._tx() as s:
            return nodes.list_nodes(s)

    def get_node(self, node: str) -> NodeView | None:
        with self._tx() as s:
            return nodes.get_node(s, node)
