"""The API's per-request reads: one Core SELECT each, built once.

Every API request looks its token up, and most look a container up; ``GET
.../network`` reads the container with its owner, configuration, allocation
and observed status. Through the ORM that was a session per call and one
identity-map ``get`` per table (up to eight queries for one GET). Here each
read is a single statement with outer joins, compiled once (SQLAlchemy caches
the compiled form of these module-level statements), and its one row becomes
the same frozen views the ORM paths build (``store.views``); a unit test
holds the two paths to the same result. The agent's list of all its
containers (every wake-up, every probe round) is the same statement without
the id. Writes stay on the ORM.

Columns are labelled by table (``cfg_``, ``alloc_``, ``st_``) because the
joined tables share column names (``container_id``).

On SQLite a read is a lookup in a local file that takes a few microseconds,
and SQLAlchemy's execution around it (compiled-cache lookup, execution
context, result metadata, row processing) took 4-5 times as long: ~60 us for
the token and ~105 us for a network, a quarter of a whole GET request.
:class:`DirectRead` runs such a statement on the pooled DBAPI connection
itself: compiled once for the engine's dialect, parameters in the compiled
order, each column through the result processor SQLAlchemy would have applied
(JSON, datetimes, booleans), into a named tuple with the same attribute names
as the ``Row`` (~15-25 us). Only where reads are local (SQLite): on
PostgreSQL the round trip dominates and the autocommit reader saves more.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

from sqlalchemy import Dialect, Engine, Label, Row, Select, Table, bindparam, select

from egressd.model import Allocation, DesiredState, NetworkConfig, NetworkType, Status
from egressd.store.tables import (
    AllocationRow,
    ApiToken,
    Base,
    Container,
    NetworkConfigRow,
    NetworkStatusRow,
    Principal,
)
from egressd.store.views import (
    ContainerView,
    DesiredView,
    NetworkView,
    ObservedView,
    PrincipalView,
    stored_proxy,
    stored_subnet,
)

_containers = Base.metadata.tables[Container.__tablename__]
_principals = Base.metadata.tables[Principal.__tablename__]
_tokens = Base.metadata.tables[ApiToken.__tablename__]
_configs = Base.metadata.tables[NetworkConfigRow.__tablename__]
_allocations = Base.metadata.tables[AllocationRow.__tablename__]
_statuses = Base.metadata.tables[NetworkStatusRow.__tablename__]


def _labelled(table: Table, prefix: str) -> list[Label[Any]]:
    return [column.label(prefix + column.name) for column in table.c]


PRINCIPAL_BY_TOKEN_HASH: Select[Any] = (
    select(_principals.c.id, _principals.c.name, _principals.c.is_admin, _tokens.c.token_hash)
    .select_from(_tokens)
    .join(_principals, _principals.c.id == _tokens.c.principal_id)
    .where(_tokens.c.token_hash == bindparam("token_hash"))
)

_CONTAINER_COLUMNS = [*_containers.c, _principals.c.name.label("owner_name")]

CONTAINER_BY_ID: Select[Any] = (
    select(*_CONTAINER_COLUMNS)
    .select_from(_containers)
    .outerjoin(_principals, _principals.c.id == _containers.c.owner_id)
    .where(_containers.c.id == bindparam("container_id"))
)

_NETWORKS: Select[Any] = (
    select(
        *_CONTAINER_COLUMNS,
        *_labelled(_configs, "cfg_"),
        *_labelled(_allocations, "alloc_"),
        *_labelled(_statuses, "st_"),
    )
    .select_from(_containers)
    .outerjoin(_principals, _principals.c.id == _containers.c.owner_id)
    .outerjoin(_configs, _configs.c.container_id == _containers.c.id)
    .outerjoin(_allocations, _allocations.c.container_id == _containers.c.id)
    .outerjoin(_statuses, _statuses.c.container_id == _containers.c.id)
)

NETWORK_BY_CONTAINER_ID: Select[Any] = _NETWORKS.where(
    _containers.c.id == bindparam("container_id")
)


def networks_of_node(node: str, *, only_pending: bool) -> Select[Any]:
    """The agent's list: containers of ``node`` with a configuration or a status row.

    ``only_pending``: those it has not acted on yet -- no observed record,
    an older observed generation, a failed apply (error and not running),
    or leftovers of a removed configuration (status but no config); the
    same rule as ``agent.runner._pending``, which a unit test holds it to.
    """
    query = (
        _NETWORKS.where(_containers.c.node == node)
        .where(_configs.c.container_id.is_not(None) | _statuses.c.container_id.is_not(None))
        .order_by(_containers.c.id)
    )
    if only_pending:
        query = query.where(
            _configs.c.container_id.is_(None)
            | _statuses.c.container_id.is_(None)
            | (_statuses.c.observed_generation != _configs.c.generation)
            | ((_statuses.c.status == Status.ERROR.value) & _statuses.c.is_running.is_(False))
        )
    return query


def probe_targets_of_node(node: str) -> Select[Any]:
    """The probe round's list: the running proxy containers of ``node``, settled.

    Settled: the agent has acted on the latest desired state and the
    enforcement runs (observed at the configuration's generation, running),
    the rule ``agent.runner`` used to apply to the full list, which a unit
    test holds this to. Only what a probe needs: a whole view costs ~55 us
    of Python a row, and a probe round lists every container.
    """
    return (
        select(
            _containers.c.id,
            _configs.c.type,
            _configs.c.proxy_url,
            _configs.c.proxy_username,
            _configs.c.proxy_password,
            _statuses.c.status,
        )
        .select_from(_containers)
        .join(_configs, _configs.c.container_id == _containers.c.id)
        .join(_statuses, _statuses.c.container_id == _containers.c.id)
        .where(_containers.c.node == node)
        .where(_configs.c.desired_state == DesiredState.RUNNING.value)
        .where(_configs.c.proxy_url.is_not(None) & (_configs.c.proxy_url != ""))
        .where(_statuses.c.is_running.is_(True))
        .where(_statuses.c.observed_generation == _configs.c.generation)
        .order_by(_containers.c.id)
    )


class DirectRead:
    """One module-level SELECT of this module, run on the raw DBAPI connection."""

    __slots__ = ("_names", "_processors", "_row", "_sql")

    def __init__(self, statement: Select[Any], dialect: Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        if not compiled.positional or compiled.positiontup is None:
            raise ValueError(f"{dialect.name}: direct reads need a positional paramstyle")
        # What this class does not do that SQLAlchemy would: bind processors (e.g. a
        # datetime type's conversion), parameters with values of their own, expanding
        # (IN) or literal parameters. A statement that needs any is refused, not run wrong.
        if compiled._bind_processors or any(
            bind.value is not None or bind.callable is not None or bind.expanding
            for bind in compiled.binds.values()
        ):
            raise ValueError("direct reads take plain bound parameters only")
        self._sql = str(compiled)
        self._names = tuple(compiled.positiontup)
        columns = list(statement.selected_columns)
        self._row: Any = namedtuple("DirectRow", [c.key for c in columns])  # type: ignore[misc]
        self._processors: list[Callable[[Any], Any] | None] = [
            c.type.dialect_impl(dialect).result_processor(dialect, None) for c in columns
        ]

    def first(self, engine: Engine, params: Mapping[str, Any]) -> Any | None:
        """The first row (attribute access like a ``Row``), or None."""
        connection = engine.raw_connection()
        try:
            cursor = connection.cursor()
            try:
                cursor.execute(self._sql, [params[name] for name in self._names])
                raw = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            connection.close()  # back to the pool
        if raw is None:
            return None
        return self._row._make(
            value if process is None or value is None else process(value)
            for process, value in zip(self._processors, raw, strict=True)
        )


def principal_of(row: Row[Any]) -> PrincipalView:
    return PrincipalView(row.id, row.name, row.is_admin)


def container_of(row: Row[Any]) -> ContainerView:
    """A row of ``CONTAINER_BY_ID`` (or ``NETWORK_BY_CONTAINER_ID``)."""
    return ContainerView(
        id=row.id,
        name=row.name,
        owner=row.owner_name,
        owner_id=row.owner_id,
        runtime=row.runtime,
        ref=row.ref,
        node=row.node,
        created_at=row.created_at,
    )


def network_of(row: Row[Any]) -> NetworkView:
    """A row of ``NETWORK_BY_CONTAINER_ID`` (or of ``networks_of_node``) as a view."""
    desired = None
    if row.cfg_container_id is not None:
        ntype = NetworkType(row.cfg_type)
        config = NetworkConfig(
            type=ntype,
            proxy=stored_proxy(
                ntype, row.cfg_proxy_url, row.cfg_proxy_username, row.cfg_proxy_password
            ),
            dns_servers=tuple(row.cfg_dns_servers),
            country=row.cfg_country,
            city=row.cfg_city,
            region=row.cfg_region,
            comment=row.cfg_comment,
        )
        desired = DesiredView(
            config=config,
            desired_state=DesiredState(row.cfg_desired_state),
            generation=row.cfg_generation,
            configured_at=row.cfg_configured_at,
        )
    allocation = None
    if row.alloc_container_id is not None:
        allocation = Allocation(
            subnet=stored_subnet(row.alloc_subnet),
            bridge_name=row.alloc_bridge_name,
            port=row.alloc_port,
        )
    observed = None
    if row.st_container_id is not None:
        observed = ObservedView(
            status=Status(row.st_status),
            reason=row.st_reason,
            is_running=row.st_is_running,
            observed_generation=row.st_observed_generation,
            last_check=row.st_last_check,
            applied=row.st_applied,
            upstream=row.st_upstream,
        )
    return NetworkView(container_of(row), desired, allocation, observed)
