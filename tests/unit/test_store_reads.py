"""The API's per-request reads (``store.reads``): same views as the ORM, pooled connections."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import QueuePool, event
from sqlalchemy.orm import Session

from egressd.daemon import open_store
from egressd.errors import NotFound
from egressd.model import Allocation, DesiredState, NetworkConfig, NetworkType, ProxySpec, Status
from egressd.settings import Settings
from egressd.store import ContainerView, NetworkView, Store, reads
from egressd.store.repository import hash_token
from egressd.store.tables import (
    AllocationRow,
    Container,
    NetworkConfigRow,
    NetworkStatusRow,
    Principal,
)
from egressd.store.views import (
    DesiredView,
    ObservedView,
    config_from_row,
    container_view_of,
    stored_subnet,
)

POOL = ipaddress.IPv4Network("10.20.0.0/24")


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    store = open_store(Settings(data_dir=tmp_path))
    yield store
    store.engine.dispose()


def orm_container(store: Store, cid: str) -> ContainerView:
    """What the ORM path made of a container (the reference for the Core reads)."""
    with Session(store.engine) as s:
        row = s.get(Container, cid)
        assert row is not None
        owner = s.get(Principal, row.owner_id) if row.owner_id is not None else None
        return container_view_of(row, owner.name if owner else None)


def orm_network(store: Store, cid: str) -> NetworkView:
    """The view built independently from ORM rows, table by table: the oracle."""
    with Session(store.engine) as s:
        cfg = s.get(NetworkConfigRow, cid)
        alloc = s.get(AllocationRow, cid)
        st = s.get(NetworkStatusRow, cid)
        return NetworkView(
            orm_container(store, cid),
            None
            if cfg is None
            else DesiredView(
                config_from_row(cfg),
                DesiredState(cfg.desired_state),
                cfg.generation,
                cfg.configured_at,
            ),
            None
            if alloc is None
            else Allocation(stored_subnet(alloc.subnet), alloc.bridge_name, alloc.port),
            None
            if st is None
            else ObservedView(
                Status(st.status),
                st.reason,
                st.is_running,
                st.observed_generation,
                st.last_check,
                st.applied,
                st.upstream,
            ),
        )


def proxy(url: str, ntype: NetworkType) -> NetworkConfig:
    return NetworkConfig(
        type=ntype,
        proxy=ProxySpec.parse(url, expected=ntype),
        dns_servers=("198.18.2.2",),
        country="US",
        city="New York",
        region="North America",
        comment="prod",
    )


def new_container(store: Store, *, owner: str | None = None) -> str:
    return store.create_container(
        container_id=None, name="web", owner=owner, runtime="netns", ref="ns1"
    ).id


def test_core_reads_give_the_views_the_orm_gave(store: Store) -> None:
    store.ensure_principal("alice")
    put = {"pool": POOL, "prefix": 29, "port": 1080}
    bare = new_container(store)
    socks = new_container(store, owner="alice")
    store.put_config(
        socks, proxy("socks5://user:p%40ss@198.18.1.2:1080", NetworkType.SOCKS5), **put
    )
    running = new_container(store, owner="alice")
    store.put_config(running, proxy("http://proxy.example.com:3128", NetworkType.HTTP), **put)
    generation = store.set_desired_state(running, DesiredState.RUNNING)
    store.record_observed(
        running,
        status=Status.RUNNING,
        reason=None,
        is_running=True,
        observed_generation=generation,
        applied={"type": "proxy", "netns": "/run/netns/ns1", "routes": [{"dst": "default"}]},
        upstream={"reachable": True, "latency_ms": 1.5},
    )
    blocked = new_container(store)
    store.put_config(blocked, NetworkConfig(type=NetworkType.BLOCK, proxy=None), **put)
    store.set_desired_state(blocked, DesiredState.STOPPED)
    store.record_observed(
        blocked,
        status=Status.ERROR,
        reason="namespace gone",
        is_running=False,
        observed_generation=1,
        applied=None,
    )
    removing = new_container(store, owner="alice")
    store.put_config(removing, proxy("https://[2001:db8::1]:443", NetworkType.HTTPS), **put)
    store.set_desired_state(removing, DesiredState.ABSENT)
    leftover = new_container(store)  # a status row without a configuration
    store.record_observed(
        leftover,
        status=Status.STOPPED,
        reason=None,
        is_running=False,
        observed_generation=0,
        applied={"type": "block"},
    )

    for cid in (bare, socks, running, blocked, removing, leftover):
        assert store.get_network(cid) == orm_network(store, cid)
        assert store.get_container(cid) == orm_container(store, cid)
    view = store.get_network(socks)
    assert view.desired is not None and view.desired.config.proxy is not None
    assert (view.desired.config.proxy.username, view.desired.config.proxy.password) == (
        "user",
        "p@ss",
    )
    assert store.get_network(bare) == NetworkView(orm_container(store, bare), None, None, None)


def test_direct_reads_give_the_rows_sqlalchemy_gave(store: Store) -> None:
    """SQLite reads skip SQLAlchemy's execution; every column must come out the same."""
    store.ensure_principal("alice")
    token = store.create_token("alice")
    cid = new_container(store, owner="alice")
    store.put_config(
        cid,
        proxy("socks5://u:p@198.18.1.2:1080", NetworkType.SOCKS5),
        pool=POOL,
        prefix=29,
        port=1080,
    )
    generation = store.set_desired_state(cid, DesiredState.RUNNING)
    store.record_observed(
        cid,
        status=Status.RUNNING,
        reason=None,
        is_running=True,
        observed_generation=generation,
        applied={"type": "proxy", "routes": [{"dst": "default"}]},
        upstream={"reachable": True, "latency_ms": 1.5},
    )
    cases = [
        (reads.PRINCIPAL_BY_TOKEN_HASH, {"token_hash": hash_token(token)}),
        (reads.CONTAINER_BY_ID, {"container_id": cid}),
        (reads.NETWORK_BY_CONTAINER_ID, {"container_id": cid}),
        (reads.NETWORK_BY_CONTAINER_ID, {"container_id": "f" * 24}),  # no row
    ]
    for statement, params in cases:
        with store.engine.connect() as connection:
            expected = connection.execute(statement, params).first()
        got = reads.DirectRead(statement, store.engine.dialect).first(store.engine, params)
        if expected is None:
            assert got is None
            continue
        assert got is not None
        assert got._asdict() == expected._asdict()
        # Same types too (a datetime, not its text; a bool, not 0/1; JSON decoded).
        assert [type(v) for v in got] == [type(v) for v in expected]
    row = reads.DirectRead(reads.NETWORK_BY_CONTAINER_ID, store.engine.dialect).first(
        store.engine, {"container_id": cid}
    )
    assert row.st_is_running is True and row.cfg_dns_servers == ["198.18.2.2"]
    assert row.st_last_check is not None and row.st_upstream == {
        "reachable": True,
        "latency_ms": 1.5,
    }


def test_direct_reads_refuse_statements_they_would_run_wrong(store: Store) -> None:
    """Bound values, bind processors (a datetime's conversion): SQLAlchemy's job, not ours."""
    from sqlalchemy import bindparam, select

    from egressd.store.tables import NetworkStatusRow

    dialect = store.engine.dialect
    with pytest.raises(ValueError):  # carries its own value ('error')
        reads.DirectRead(reads.networks_of_node("n", only_pending=True), dialect)
    since = select(NetworkStatusRow.container_id).where(
        NetworkStatusRow.last_check > bindparam("since", type_=NetworkStatusRow.last_check.type)
    )
    with pytest.raises(ValueError):  # UTCDateTime converts datetimes on the way in
        reads.DirectRead(since, dialect)


def test_containers_sharing_a_proxy_keep_their_own_credentials(store: Store) -> None:
    """The parsed endpoint is cached and shared; credentials never are."""
    put = {"pool": POOL, "prefix": 29, "port": 1080}
    first, second, third = (new_container(store) for _ in range(3))
    for cid, userinfo in ((first, "a:1@"), (second, "b:2@"), (third, "")):
        url = f"socks5://{userinfo}198.18.1.2:1080"
        store.put_config(cid, proxy(url, NetworkType.SOCKS5), **put)
    seen = []
    for cid in (first, second, third):
        desired = store.get_network(cid).desired
        assert desired is not None and desired.config.proxy is not None
        p = desired.config.proxy
        seen.append((p.endpoint_url, p.username, p.password))
    assert seen == [
        ("socks5://198.18.1.2:1080", "a", "1"),
        ("socks5://198.18.1.2:1080", "b", "2"),
        ("socks5://198.18.1.2:1080", None, None),
    ]


def test_unknown_container_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound, match="Container not found"):
        store.get_network("a" * 24)
    with pytest.raises(NotFound, match="Container not found"):
        store.get_container("a" * 24)


def test_principal_for_token(store: Store) -> None:
    admin = store.create_token("root", admin=True)
    alice = store.create_token("alice")
    got_admin, got_alice = store.principal_for_token(admin), store.principal_for_token(alice)
    assert got_admin is not None and (got_admin.name, got_admin.is_admin) == ("root", True)
    assert got_alice is not None and (got_alice.name, got_alice.is_admin) == ("alice", False)
    assert store.principal_for_token("egd_forged") is None
    assert store.principal_for_token(alice + "x") is None
    store.ensure_principal("alice", admin=True)  # seen by the next request, no caching
    again = store.principal_for_token(alice)
    assert again is not None and again.is_admin


def test_a_burst_of_connections_is_kept_for_the_next_burst(store: Store) -> None:
    """Connections beyond the pool were opened, set up and closed again per use."""
    opened: list[object] = []
    event.listen(store.engine, "connect", lambda conn, _record: opened.append(conn))
    pool = store.engine.pool
    assert isinstance(pool, QueuePool)
    # FastAPI's thread pool (40) and the event loop hold connections at once.
    assert pool.size() >= 41
    for _ in range(2):
        held = [store.engine.connect() for _ in range(24)]
        for connection in held:
            connection.close()
    assert len(opened) <= 24  # the second burst reused the first one's connections


def test_reads_reuse_one_connection_and_every_connection_has_the_pragmas(store: Store) -> None:
    cid = new_container(store)
    opened: list[object] = []
    event.listen(store.engine, "connect", lambda conn, _record: opened.append(conn))
    for _ in range(100):
        store.get_network(cid)
        store.principal_for_token("egd_x")
    assert len(opened) <= 1
    connections = [store.engine.connect() for _ in range(3)]
    try:
        for connection in connections:
            pragmas = {
                name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
                for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
            }
            assert pragmas == {
                "journal_mode": "wal",
                "synchronous": 2,  # FULL
                "foreign_keys": 1,
                "busy_timeout": 5000,
            }
    finally:
        for connection in connections:
            connection.close()
