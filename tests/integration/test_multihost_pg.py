"""Multi-host on PostgreSQL, real parts: one ``egressd api``, two ``egressd agent``.

A PostgreSQL cluster of the test's own (``pg_cluster.PgCluster``). Each agent
runs in its own "host" network namespace with its own dante and remote host
(``pg_hosts.HostWorld``) and reaches the database over the cluster's unix
socket; the API runs in the machine's namespace and uses TCP on 127.0.0.1.
Each node has one container whose own network reaches its remote host
directly (``DirectContainer``), so "fails closed" is checked against what
would otherwise have arrived.

Agents resync only every 60 s: a start that returns in a few seconds was
woken by NOTIFY. Heartbeats every 1 s, so a node is dead after 3 s.
"""

from __future__ import annotations

import secrets
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.orm import Session

from egressd.client import ApiError, Client
from egressd.model import DesiredState, NetworkConfig, NetworkType, ProxySpec, Status
from egressd.store import Store, make_engine, migrate
from egressd.store import nodes as node_queries
from egressd.store.db import alembic_config
from egressd.store.repository import HealthUpdate
from egressd.store.tables import NodeRow
from egressd.store.wakeups import PgWakeups
from tests.integration.conftest import require_tools
from tests.integration.egressd_proc import DirectContainer, EgressdServer, free_port, link_state
from tests.integration.peers import (
    Dante,
    RemoteHttpServer,
    SystemUser,
    UpstreamWorld,
    run,
    scratch_dir,
)
from tests.integration.pg_cluster import PgCluster, pg_bin_dir
from tests.integration.pg_hosts import (
    EgressdProcess,
    HostWorld,
    api_ready,
    nodes_by_name,
    wait_for,
)

RESYNC = 60.0
HEARTBEAT = 1.0


@pytest.fixture
def pg() -> Iterator[PgCluster]:
    require_tools("runuser")
    if pg_bin_dir() is None:
        pytest.skip("needs the PostgreSQL server (apt: postgresql; run `make setup`)")
    with PgCluster() as cluster:
        yield cluster


# --------------------------------------------------------------------------- store on PostgreSQL


def test_schema_and_store_on_postgresql(pg: PgCluster, monkeypatch: pytest.MonkeyPatch) -> None:
    from alembic import command

    engine = make_engine(pg.url())
    try:
        migrate(engine, revision="0001")
        assert "nodes" not in inspect(engine).get_table_names()
        # Several processes starting at once: the advisory lock serializes them.
        failures: list[BaseException] = []

        def upgrade() -> None:
            try:
                migrate(engine)
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=upgrade) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        with engine.connect() as c:
            assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
        with engine.begin() as connection:
            command.downgrade(alembic_config(connection), "0001")
        assert "nodes" not in inspect(engine).get_table_names()
        migrate(engine)
        assert "nodes" in inspect(engine).get_table_names()

        store = Store(engine, node="api")
        # Heartbeats: the database's clock, started_at kept.
        started = store.record_heartbeat("a", version="1")
        assert store.record_heartbeat("a", version="2", started_at=started) == started
        with engine.connect() as c:
            db_now = c.execute(text("SELECT now()")).scalar()
        seen = store.get_node("a")
        assert seen is not None and seen.last_seen is not None and seen.version == "2"
        assert abs((db_now - seen.last_seen).total_seconds()) < 5
        assert seen.is_alive(5)
        for i, upsert in enumerate((node_queries.upsert_native, node_queries.upsert_portable)):
            for version in ("x", "y"):
                with Session(engine) as s, s.begin():
                    now = node_queries.store_now(s)
                    upsert(s, name=f"n{i}", now=now, started_at=now, version=version)
            with Session(engine) as s:
                row = s.get(NodeRow, f"n{i}")
                assert row is not None and row.version == "y"
        # The update-then-insert path under a race of first beats: one row, no error.
        monkeypatch.setattr(node_queries, "upsert", node_queries.upsert_portable)
        barrier = threading.Barrier(8)

        def beat() -> None:
            try:
                barrier.wait()
                store.record_heartbeat("raced", version="v")
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=beat) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert failures == []
        assert [n.name for n in store.list_nodes()] == ["a", "n0", "n1", "raced"]

        # Desired, allocations and observed state work the same as on SQLite.
        cid = store.create_container(
            container_id=None, name=None, owner=None, runtime="netns", ref="x", node="b"
        ).id
        config = NetworkConfig(
            type=NetworkType.SOCKS5,
            proxy=ProxySpec.parse("socks5://u:p@198.18.1.2:1080", expected=NetworkType.SOCKS5),
            dns_servers=("198.18.1.53",),
        )
        import ipaddress

        store.put_config(
            cid, config, pool=ipaddress.IPv4Network("10.20.0.0/24"), prefix=29, port=1080
        )
        generation = store.set_desired_state(cid, DesiredState.RUNNING)
        store.record_observed(
            cid,
            status=Status.RUNNING,
            reason=None,
            is_running=True,
            observed_generation=generation,
            applied={"type": "socks5", "saved_routes": [{"dst": "default"}]},
        )
        [view] = store.list_networks(node="b")
        assert store.list_networks(node="a") == []
        assert view.observed is not None and view.observed.applied is not None
        assert view.observed.applied["saved_routes"] == [{"dst": "default"}]
        assert view.desired is not None and view.desired.config.proxy is not None
        assert view.desired.config.proxy.password == "p"
        assert {n.name: n.containers for n in store.list_nodes()}["b"] == 1
        # A probe round: its slim list (not a failed apply), and its write of the health alone.
        failed = store.create_container(
            container_id=None, name=None, owner=None, runtime="netns", ref="y", node="b"
        ).id
        store.put_config(
            failed, config, pool=ipaddress.IPv4Network("10.20.0.0/24"), prefix=29, port=1080
        )
        store.record_observed(
            failed,
            status=Status.ERROR,
            reason="apply failed",
            is_running=False,
            observed_generation=store.set_desired_state(failed, DesiredState.RUNNING),
            applied=None,
        )
        [target] = store.probe_targets(node="b")
        assert store.probe_targets(node="a") == []
        assert (target.container_id, target.proxy, target.status) == (
            cid,
            config.proxy,
            Status.RUNNING,
        )
        down = {"reachable": False, "last_error": "refused"}
        store.record_health(
            [HealthUpdate([cid], status=Status.ERROR, reason="upstream down", upstream=down)]
        )
        observed = store.get_network(cid).observed
        assert observed is not None and observed.last_check is not None
        assert (observed.status, observed.reason, observed.upstream) == (
            Status.ERROR,
            "upstream down",
            down,
        )
        assert observed.is_running and observed.applied == view.observed.applied
    finally:
        engine.dispose()


def test_listen_notify_wakeups(pg: PgCluster) -> None:
    engine = make_engine(pg.url())
    migrate(engine)
    agent_a = PgWakeups(engine, agent_node="a", observe=False)
    agent_b = PgWakeups(engine, agent_node="b", observe=False)
    api = PgWakeups(engine, agent_node=None, observe=True, poll=30.0)
    sender = PgWakeups(engine, agent_node=None, observe=False)
    listeners = (agent_a, agent_b, api)
    try:
        for w in listeners:
            w.start()
            assert w.listening
        for w in (agent_a, agent_b):
            w.wait_for_work(0)  # the wake-up every (re)connect gives

        sender.notify_agent("a")
        assert agent_a.wait_for_work(5)
        assert not agent_b.wait_for_work(0.3)
        sender.notify_agent()  # '*'
        assert agent_a.wait_for_work(5) and agent_b.wait_for_work(5)

        flag = threading.Event()

        def observed_later() -> None:
            time.sleep(0.2)
            flag.set()
            sender.notify_observed()

        threading.Thread(target=observed_later).start()
        t0 = time.monotonic()
        assert api.wait_until(flag.is_set, timeout=20)
        assert time.monotonic() - t0 < 3  # the NOTIFY, not the 30 s poll

        # The server drops the listeners' sessions: they reconnect and listen again.
        with engine.begin() as c:
            dropped = c.execute(
                text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE query LIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                )
            ).scalar()
        assert dropped == 3
        wait_for("listeners dropped", lambda: not agent_a.listening, timeout=5)
        wait_for("listeners back", lambda: all(w.listening for w in listeners), timeout=15)
        assert agent_a.wait_for_work(0)  # woken after the reconnect: it may have missed some
        agent_b.wait_for_work(0)
        sender.notify_agent("b")
        assert agent_b.wait_for_work(5)
        assert not agent_a.wait_for_work(0.3)
    finally:
        for w in listeners:
            w.close()
        engine.dispose()
    assert not any(t.name == "egressd-listen" for t in threading.enumerate())


# --------------------------------------------------------------------------- two hosts, one API


@dataclass
class Host:
    name: str
    world: HostWorld
    dante: Dante
    remote: RemoteHttpServer
    container: DirectContainer
    before: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.world.remote_ip}/"


@dataclass
class Deployment:
    pg: PgCluster
    hosts: dict[str, Host]
    dir: Path
    table: str = field(default_factory=lambda: f"egressd_t{secrets.token_hex(3)}")
    pool: str = field(default_factory=lambda: f"10.20.{secrets.randbelow(256)}.0/24")
    api: EgressdProcess | None = None
    agents: dict[str, EgressdProcess] = field(default_factory=dict)
    token: str = ""
    port: int = 0

    def start_api(self) -> None:
        self.port = free_port()
        data_dir = self.dir / "api"
        env = {
            "EGRESSD_DATABASE_URL": self.pg.url(),
            "EGRESSD_POOL": self.pool,
            "EGRESSD_APPLY_TIMEOUT": "20",
            "EGRESSD_HEARTBEAT_INTERVAL": str(HEARTBEAT),
        }
        argv = ["api", "--port", str(self.port), "--data-dir", str(data_dir)]
        self.api = EgressdProcess(argv, env=env, log_path=self.dir / "api.log").start()
        self.token = api_ready(self.api, port=self.port, data_dir=data_dir)

    def client(self) -> Client:
        return Client(f"http://127.0.0.1:{self.port}", token=self.token, timeout=60)

    def start_agent(self, name: str) -> EgressdProcess:
        """Start node ``name``'s agent in its host netns; return once it reports alive."""
        with self.client() as c:
            before = nodes_by_name(c).get(name, {}).get("started_at")
        env = {
            "EGRESSD_DATABASE_URL": self.pg.socket_url(),
            "EGRESSD_NODE": name,
            "EGRESSD_NFT_TABLE": self.table,
            "EGRESSD_POOL": self.pool,
            "EGRESSD_RESYNC_INTERVAL": str(RESYNC),
            "EGRESSD_PROBE_INTERVAL": "30",
            "EGRESSD_HEARTBEAT_INTERVAL": str(HEARTBEAT),
            "EGRESSD_DATA_DIR": str(self.dir / f"agent-{name}"),
        }
        agent = EgressdProcess(
            ["agent"],
            env=env,
            log_path=self.dir / f"agent-{name}.log",
            ns=self.hosts[name].world.host_ns,
        ).start()
        self.agents[name] = agent

        def reported() -> bool:
            if not agent.alive():
                raise RuntimeError(f"agent {name} exited:\n{agent.log()}")
            with self.client() as c:
                node = nodes_by_name(c).get(name, {})
            return bool(node.get("alive")) and node.get("started_at") != before

        wait_for(f"agent {name} alive", reported, timeout=30, on_fail=agent.log)
        return agent

    def logs(self) -> str:
        parts = [self.api.log()] if self.api else []
        return "\n".join(parts + [a.log() for a in self.agents.values()])

    def close(self) -> None:
        try:
            if self.api is not None and self.api.alive():
                with self.client() as c:
                    for container in c.containers.list():
                        with suppress(ApiError):
                            c.containers.remove_network_config(id=container["id"])
        finally:
            for agent in self.agents.values():
                agent.stop()
            if self.api is not None:
                self.api.stop()
            # Whatever the agents left lives in the hosts' namespaces, removed with them.


@pytest.fixture
def hosts(proxy_user: SystemUser) -> Iterator[dict[str, Host]]:
    require_tools("danted", "curl", "nft")
    with ExitStack() as stack:
        found = {}
        for name in ("a", "b"):
            world = stack.enter_context(HostWorld())
            dante = stack.enter_context(Dante(world, user=proxy_user))
            remote = stack.enter_context(RemoteHttpServer(world.remote_ns, world.remote_ip))
            container = stack.enter_context(DirectContainer(world))
            found[name] = Host(name, world, dante, remote, container)
        yield found


@pytest.fixture
def deployment(pg: PgCluster, hosts: dict[str, Host]) -> Iterator[Deployment]:
    with scratch_dir("multihost") as directory:
        d = Deployment(pg=pg, hosts=hosts, dir=directory)
        try:
            d.start_api()
            for name in hosts:
                d.start_agent(name)
            yield d
        finally:
            d.close()


def register(c: Client, host: Host) -> str:
    body = {"ref": host.container.ns.name, "node": host.name}
    return str(c.request("POST", "/api/v1/containers", json=body)["id"])


def through_proxy(host: Host) -> None:
    """The container reaches its remote host, which sees the node's proxy, not the container."""
    r = host.container.curl(host.url)
    assert r.returncode == 0, r.stderr
    assert r.stdout == host.remote.body.decode()
    assert host.remote.peers()[-1] == host.dante.external_ip


def fails_closed(host: Host) -> None:
    """Nothing leaves: the request fails and the remote host sees nothing new."""
    seen = len(host.remote.peers())
    assert host.container.curl(host.url).returncode != 0
    time.sleep(0.2)
    assert len(host.remote.peers()) == seen


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.monotonic()
    result = fn()
    return result, time.monotonic() - t0


def test_two_nodes_one_api(deployment: Deployment) -> None:
    d = deployment
    a, b = d.hosts["a"], d.hosts["b"]
    for host in (a, b):
        host.before = link_state(host.container.ns)
        r = host.container.curl(host.url)  # before egressd: straight to the remote host
        assert r.returncode == 0 and host.remote.peers()[-1] == host.container.ip

    with d.client() as c:
        ids = {host.name: register(c, host) for host in (a, b)}
        for host in (a, b):
            c.containers.update_network_config(
                id=ids[host.name],
                data={
                    "type": "socks5",
                    "proxy": host.dante.url,
                    "dns_servers": [host.world.remote_ip],
                },
            )
            # Woken by NOTIFY: the agents' own resync is 60 s away.
            started, elapsed = timed(lambda h=host: c.containers.start_network(id=ids[h.name]))
            assert started["status"] == "running", started
            assert elapsed < 5, f"start on node {host.name} took {elapsed:.2f}s"
            print(f"start on node {host.name}: {elapsed:.3f}s (resync every {RESYNC:g}s)")
        for host in (a, b):
            through_proxy(host)
            # Each agent's kernel state is in its own host namespace, none in ours.
            assert host.world.host_ns.run(["nft", "list", "table", "inet", d.table]).returncode == 0
        assert run(["nft", "list", "table", "inet", d.table], check=False).returncode != 0
        nodes = nodes_by_name(c)
        assert nodes["a"]["alive"] and nodes["b"]["alive"]
        assert nodes["a"]["containers"] == nodes["b"]["containers"] == 1

        # Node a's agent dies hard.
        d.agents["a"].signal(signal.SIGKILL)
        d.agents["a"].wait(timeout=10)
        t0 = time.monotonic()
        wait_for(
            "node a not alive", lambda: not nodes_by_name(c)["a"]["alive"], timeout=HEARTBEAT * 10
        )
        print(f"node a seen dead {time.monotonic() - t0:.2f}s after SIGKILL")
        assert nodes_by_name(c)["b"]["alive"]
        fails_closed(a)  # walls stay, relay gone: nothing goes direct
        for call, message in (
            (c.containers.start_network, "Failed to start network service"),
            (c.containers.stop_network, "Failed to stop network service"),
            (c.containers.remove_network_config, "Failed to remove network configuration"),
        ):
            t0 = time.monotonic()
            with pytest.raises(ApiError) as err:
                call(id=ids["a"])
            elapsed = time.monotonic() - t0
            print(f"{message} on dead node a: {elapsed:.3f}s ({err.value.reason})")
            assert elapsed < 1.5  # at once, not after the 20 s apply timeout
            assert err.value.status_code == 500 and err.value.message == message
            assert err.value.reason is not None
            assert err.value.reason.startswith("agent of node 'a' is not alive (last seen 20")
        fails_closed(a)

        # Node b is unaffected: stop (direct again), start (through its proxy again).
        t0 = time.monotonic()
        stopped = c.containers.stop_network(id=ids["b"])
        assert stopped["status"] == "stopped" and time.monotonic() - t0 < 5
        assert link_state(b.container.ns) == b.before
        assert b.container.curl(b.url).returncode == 0
        assert b.remote.peers()[-1] == b.container.ip
        assert c.containers.start_network(id=ids["b"])["status"] == "running"
        through_proxy(b)
        fails_closed(a)

        # Node a's agent comes back: it re-adopts its container, which works again.
        d.start_agent("a")
        wait_for(
            "node a's container through its proxy",
            lambda: a.container.curl(a.url).returncode == 0,
            timeout=15,
        )
        through_proxy(a)

        # SIGTERM is a graceful stop of the agent, not of enforcement: walls stay.
        d.agents["b"].signal(signal.SIGTERM)
        assert d.agents["b"].wait(timeout=20) == 0, d.agents["b"].log()
        assert "stopping; kernel state stays" in d.agents["b"].log()
        assert b.world.host_ns.run(["nft", "list", "table", "inet", d.table]).returncode == 0
        fails_closed(b)
        d.start_agent("b")
        wait_for(
            "node b's container through its proxy",
            lambda: b.container.curl(b.url).returncode == 0,
            timeout=15,
        )
        through_proxy(b)

        # DELETE through the one API: each container's network is its own again.
        for host in (a, b):
            c.containers.remove_network_config(id=ids[host.name])
            assert link_state(host.container.ns) == host.before
            assert host.container.curl(host.url).returncode == 0
            assert host.remote.peers()[-1] == host.container.ip
    assert d.pg.password not in d.logs()
    assert d.api is not None and f"{d.pg.user}:***@" in d.api.log()  # store URL, password hidden


# --------------------------------------------------------------------------- serve: one host


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_serve_registers_its_node_and_works_on_either_database(
    database: str,
    request: pytest.FixtureRequest,
    upstream_world: UpstreamWorld,
    remote_http: RemoteHttpServer,
) -> None:
    extra = {"EGRESSD_HEARTBEAT_INTERVAL": str(HEARTBEAT)}
    node = "local"
    if database == "postgresql":
        cluster: PgCluster = request.getfixturevalue("pg")
        node = "solo"
        extra |= {"EGRESSD_DATABASE_URL": cluster.url(), "EGRESSD_NODE": node}
    url = f"http://{upstream_world.remote_ip}/"
    with (
        DirectContainer(upstream_world) as container,
        EgressdServer(resync_interval=RESYNC, extra_env=extra) as server,
        server.client() as c,
    ):
        assert nodes_by_name(c)[node]["alive"] is True
        cid = c.containers.create(ref=container.ns.name)["id"]
        assert c.containers.get(id=cid)["node"] == node  # the server's own node by default
        c.containers.update_network_config(id=cid, data={"type": "block"})
        started, elapsed = timed(lambda: c.containers.start_network(id=cid))
        assert started["status"] == "running" and elapsed < 5
        assert container.curl(url).returncode != 0
        assert remote_http.peers() == []
        c.containers.remove_network_config(id=cid)
        assert container.curl(url).returncode == 0
        assert remote_http.peers() == [container.ip]
        if database == "postgresql":
            assert cluster.password not in server.log()
