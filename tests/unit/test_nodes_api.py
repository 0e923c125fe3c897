"""Nodes in the API: GET /api/v1/nodes, containers on a node, and a dead node's agent.

Runs the real app, store and agent of node ``local`` (kernel and relay faked).
Other nodes have no agent here: their heartbeats are written by the test.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy.orm import Session

from egressd.agent.heartbeat import Heartbeat
from egressd.model import DesiredState, Status
from egressd.store import Store
from egressd.store import nodes as node_queries
from tests.unit.conftest import Api

BLOCK = {"type": "block"}


def beat_at(store: Store, node: str, seconds_ago: float) -> None:
    """A heartbeat of ``node`` as if sent ``seconds_ago``."""
    when = datetime.now(UTC) - timedelta(seconds=seconds_ago)
    with Session(store.engine) as s, s.begin():
        node_queries.upsert(s, name=node, now=when, started_at=when, version="test")


def register(api: Api, *, node: str | None, ref: str = "ns1", owner: str = "alice") -> str:
    body: dict[str, Any] = {"ref": ref, "owner": owner}
    if node is not None:
        body["node"] = node
    r = api.client.post("/api/v1/containers", json=body, headers=api.h(api.admin))
    assert r.status_code == 201, r.text
    assert r.json()["data"]["node"] == (node or "local")
    return str(r.json()["data"]["id"])


def net(cid: str, tail: str = "") -> str:
    return f"/api/v1/containers/{cid}/network{tail}"


def test_nodes_lists_heartbeats_and_container_nodes(api: Api) -> None:
    api.store.record_heartbeat("local", version="0.1.0")
    beat_at(api.store, "b", seconds_ago=600)
    register(api, node="b")
    register(api, node="c", ref="ns2")
    r = api.client.get("/api/v1/nodes", headers=api.h(api.admin))
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"statusCode", "message", "data"}
    assert (body["statusCode"], body["message"]) == (200, "Nodes retrieved successfully")
    nodes = {n["name"]: n for n in body["data"]}
    assert sorted(nodes) == ["b", "c", "local"]
    local = nodes["local"]
    assert set(local) == {
        "name",
        "alive",
        "last_seen",
        "seconds_since_seen",
        "started_at",
        "version",
        "containers",
    }
    assert local["alive"] is True and local["version"] == "0.1.0"
    assert local["last_seen"].endswith("Z") and local["containers"] == 0
    assert nodes["b"]["alive"] is False and nodes["b"]["seconds_since_seen"] >= 600
    assert nodes["b"]["containers"] == 1
    assert nodes["c"] == {
        "name": "c",
        "alive": False,
        "last_seen": None,
        "seconds_since_seen": None,
        "started_at": None,
        "version": None,
        "containers": 1,
    }


def test_nodes_is_admin_only(api: Api) -> None:
    r = api.client.get("/api/v1/nodes", headers=api.h(api.alice))
    assert r.status_code == 403 and r.json()["message"] == "Admin privileges required"
    r = api.client.get("/api/v1/nodes")
    assert r.status_code == 401 and r.json()["message"] == "Authentication required"


def test_alive_window_follows_settings(api: Api) -> None:
    beat_at(api.store, "b", seconds_ago=5)
    api.settings.heartbeat_interval = 1.0  # window 3 s: dead
    [b] = api.client.get("/api/v1/nodes", headers=api.h(api.admin)).json()["data"]
    assert b["alive"] is False
    api.settings.node_timeout = 10.0  # explicit window wins: alive
    [b] = api.client.get("/api/v1/nodes", headers=api.h(api.admin)).json()["data"]
    assert b["alive"] is True


def test_registration_validates_node(api: Api) -> None:
    for bad in ("*", "", "a b", "x" * 65, 7):
        r = api.client.post(
            "/api/v1/containers", json={"ref": "ns1", "node": bad}, headers=api.h(api.admin)
        )
        assert r.status_code == 400, (bad, r.text)
        assert "node" in r.json()["message"]


@pytest.mark.parametrize(
    ("method", "tail", "message", "prepare"),
    [
        ("POST", "/start", "Failed to start network service", "configured"),
        ("POST", "/stop", "Failed to stop network service", "running"),
        ("DELETE", "", "Failed to remove network configuration", "running"),
        ("PATCH", "", "Failed to update network configuration", "running"),
    ],
)
def test_dead_node_answers_500_at_once_and_changes_nothing(
    api: Api, method: str, tail: str, message: str, prepare: str
) -> None:
    api.settings.apply_timeout = 5.0
    cid = register(api, node="b")
    assert api.client.patch(net(cid), json=BLOCK, headers=api.h(api.alice)).status_code == 200
    if prepare == "running":
        # Node b's agent was alive and ran it; pretend so in the store.
        generation = api.store.set_desired_state(cid, DesiredState.RUNNING)
        api.store.record_observed(
            cid,
            status=Status.RUNNING,
            reason=None,
            is_running=True,
            observed_generation=generation,
            applied={"type": "block", "netns_path": "/run/netns/ns1"},
        )
    before = api.store.get_network(cid)
    beat_at(api.store, "b", seconds_ago=120)
    t0 = time.monotonic()
    body = {"type": "socks5", "proxy": "socks5://198.18.1.2:1080"} if method == "PATCH" else None
    r = api.client.request(method, net(cid, tail), json=body, headers=api.h(api.alice))
    elapsed = time.monotonic() - t0
    assert r.status_code == 500, r.text
    got = r.json()
    assert got["message"] == message and got["error"] == "Internal Server Error"
    assert got["reason"].startswith("agent of node 'b' is not alive (last seen 20")
    assert got["reason"].endswith("Z)")
    assert elapsed < 1.0  # not the 5 s apply timeout
    after = api.store.get_network(cid)
    assert after.desired == before.desired  # nothing written


def test_patch_on_a_stopped_container_of_a_dead_node_is_stored(api: Api) -> None:
    cid = register(api, node="b")
    beat_at(api.store, "b", seconds_ago=120)
    r = api.client.patch(net(cid), json=BLOCK, headers=api.h(api.alice))
    assert r.status_code == 200, r.text  # nothing to wait for: data only
    assert r.json()["data"]["status"] == "configured"


def test_live_node_is_waited_for_and_wakes_only_its_agent(api: Api) -> None:
    api.settings.apply_timeout = 0.3
    woken: list[str | None] = []
    wakeups = api.client.app.state.services.wakeups  # type: ignore[attr-defined]
    original = wakeups.notify_agent

    def spy(node: str | None = None) -> None:
        woken.append(node)
        original(node)

    wakeups.notify_agent = spy
    cid = register(api, node="b")
    beat_at(api.store, "b", seconds_ago=0)
    api.client.patch(net(cid), json=BLOCK, headers=api.h(api.alice))
    t0 = time.monotonic()
    r = api.client.post(net(cid, "/start"), headers=api.h(api.alice))
    assert time.monotonic() - t0 >= 0.3  # alive but nobody applies it here: the timeout
    assert r.status_code == 500
    assert "did not apply the change within 0.3s" in r.json()["reason"]
    assert "has reported" not in r.json()["reason"]
    assert woken == ["b"]


def test_never_reported_node_waits_and_says_so(api: Api) -> None:
    api.settings.apply_timeout = 0.3
    cid = register(api, node="c")
    api.client.patch(net(cid), json=BLOCK, headers=api.h(api.alice))
    r = api.client.post(net(cid, "/start"), headers=api.h(api.alice))
    assert r.status_code == 500
    assert r.json()["reason"] == (
        "the agent did not apply the change within 0.3s (no agent of node 'c' has reported yet)"
    )


def test_own_node_alive_start_and_delete_work(api: Api) -> None:
    api.store.record_heartbeat("local", version="x")
    cid = register(api, node=None)
    api.client.patch(net(cid), json=BLOCK, headers=api.h(api.alice))
    r = api.client.post(net(cid, "/start"), headers=api.h(api.alice))
    assert r.status_code == 200 and r.json()["data"]["status"] == "running", r.text
    assert api.dataplane.enforced == {cid: "block"}
    assert api.client.delete(net(cid), headers=api.h(api.alice)).status_code == 200
    assert api.dataplane.enforced == {}


def test_container_delete_of_a_dead_node_is_refused_with_the_reason(api: Api) -> None:
    cid = register(api, node="b")
    api.client.patch(net(cid), json=BLOCK, headers=api.h(api.alice))
    beat_at(api.store, "b", seconds_ago=120)
    r = api.client.delete(f"/api/v1/containers/{cid}", headers=api.h(api.admin))
    assert r.status_code == 500
    assert r.json()["message"] == "Failed to remove network configuration"
    assert "not alive" in r.json()["reason"]
    assert api.store.get_container(cid).node == "b"


def test_heartbeat_thread_beats_and_keeps_started_at(api: Api) -> None:
    hb = Heartbeat(api.store, node="hb", interval=0.05, version="9.9")
    hb.start()
    try:
        first = api.store.get_node("hb")
        time.sleep(0.3)
        later = api.store.get_node("hb")
    finally:
        hb.stop()
    assert first is not None and later is not None
    assert first.last_seen is not None and later.last_seen is not None
    assert later.last_seen > first.last_seen
    assert later.started_at == first.started_at == hb.started_at
    assert later.version == "9.9"
    stopped = api.store.get_node("hb")
    time.sleep(0.15)
    again = api.store.get_node("hb")
    assert stopped is not None and again is not None
    assert again.last_seen == stopped.last_seen  # no beats after stop()
