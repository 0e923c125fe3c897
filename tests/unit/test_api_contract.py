"""The Container Network API contract: envelopes, status codes, messages.

Runs the real app, store and agent (with the kernel and relay faked), so
start/stop answer with what the agent observed.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tests.unit.conftest import Api

GOOD = {"type": "socks5", "proxy": "socks5://user:pass@198.18.1.2:1080"}
MISSING = "aaaaaaaaaaaaaaaaaaaaaaaa"

ENDPOINTS = [
    ("GET", "/api/v1/containers/{id}/network", None),
    ("PATCH", "/api/v1/containers/{id}/network", GOOD),
    ("PUT", "/api/v1/containers/{id}/network", GOOD),
    ("POST", "/api/v1/containers/{id}/network/start", None),
    ("POST", "/api/v1/containers/{id}/network/stop", None),
    ("DELETE", "/api/v1/containers/{id}/network", None),
]

DENIED = {
    ("GET", "network"): "Access denied to this container",
    ("PATCH", "network"): "Cannot configure network for this container",
    ("PUT", "network"): "Cannot configure network for this container",
    ("POST", "start"): "Cannot start network for this container",
    ("POST", "stop"): "Cannot stop network for this container",
    ("DELETE", "network"): "Cannot remove network configuration from this container",
}


def call(api: Api, method: str, path: str, body: Any, token: str | None, cid: str) -> Any:
    return api.client.request(method, path.format(id=cid), json=body, headers=api.h(token))


def assert_error(r: Any, status: int, error: str, message: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert {k: body[k] for k in ("statusCode", "error", "message")} == {
        "statusCode": status,
        "error": error,
        "message": message,
    }
    assert set(body) <= {"statusCode", "error", "message", "reason"}


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
@pytest.mark.parametrize("token", [None, "wrong", "egd_forged"])
def test_401_without_or_with_bad_token(
    api: Api, method: str, path: str, body: Any, token: Any
) -> None:
    cid = api.container()
    r = call(api, method, path, body, token, cid)
    assert_error(r, 401, "Unauthorized", "Authentication required")
    assert r.headers["www-authenticate"] == "Bearer"


def test_401_with_wrong_scheme(api: Api) -> None:
    cid = api.container()
    r = api.client.get(
        f"/api/v1/containers/{cid}/network", headers={"Authorization": f"Basic {api.admin}"}
    )
    assert_error(r, 401, "Unauthorized", "Authentication required")


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
@pytest.mark.parametrize("bad", ["123", "507F1F77BCF86CD799439012", "zz7f1f77bcf86cd799439012"])
def test_400_invalid_container_id(api: Api, method: str, path: str, body: Any, bad: str) -> None:
    r = call(api, method, path, body, api.admin, bad)
    assert_error(r, 400, "Bad Request", "Invalid container ID format")


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_404_unknown_container(api: Api, method: str, path: str, body: Any) -> None:
    r = call(api, method, path, body, api.admin, MISSING)
    expected = (
        "Container or network configuration not found"
        if method == "DELETE"
        else "Container not found"
    )
    assert_error(r, 404, "Not Found", expected)


@pytest.mark.parametrize(("method", "path", "body"), ENDPOINTS)
def test_403_someone_elses_container(api: Api, method: str, path: str, body: Any) -> None:
    cid = api.container(owner="alice")
    r = call(api, method, path, body, api.bob, cid)
    assert_error(r, 403, "Forbidden", DENIED[(method, path.rsplit("/", 1)[1])])
    # and the owner is not refused
    assert (
        call(api, "GET", "/api/v1/containers/{id}/network", None, api.alice, cid).status_code == 200
    )


def test_unowned_container_is_admin_only(api: Api) -> None:
    cid = api.container(owner=None)
    r = call(api, "GET", "/api/v1/containers/{id}/network", None, api.alice, cid)
    assert_error(r, 403, "Forbidden", "Access denied to this container")


def test_get_unconfigured(api: Api) -> None:
    cid = api.container()
    r = api.client.get(f"/api/v1/containers/{cid}/network", headers=api.h(api.alice))
    assert r.status_code == 200
    body = r.json()
    assert body["statusCode"] == 200
    assert body["message"] == "Network configuration retrieved successfully"
    assert body["data"]["container_id"] == cid
    assert body["data"]["configured"] is False


def test_patch_success_envelope_and_write_only_credentials(api: Api) -> None:
    cid = api.container()
    r = api.client.patch(
        f"/api/v1/containers/{cid}/network",
        json={
            **GOOD,
            "country": "US",
            "city": "New York",
            "region": "North America",
            "comment": "prod",
            "dns_servers": ["198.18.2.2"],
        },
        headers=api.h(api.alice),
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["statusCode"] == 200
    assert body["message"] == "Network configuration updated successfully"
    data = body["data"]
    assert data["container_id"] == cid
    assert data["type"] == "socks5"
    assert data["proxy"] == "socks5://198.18.1.2:1080"
    assert data["credentials_configured"] is True
    assert (data["country"], data["city"], data["region"], data["comment"]) == (
        "US",
        "New York",
        "North America",
        "prod",
    )
    assert data["dns_servers"] == ["198.18.2.2"]
    assert data["status"] == "configured"
    assert data["configured_at"].endswith("Z") and len(data["configured_at"]) == 24
    details = data["bridge_details"]
    assert details == {
        "bridge_name": f"br-{cid[:12]}",
        "bridge_ip": "10.20.0.1",
        "gost_listener_ip": "10.20.0.2",
        "port": 1080,
    }
    assert "pass" not in r.text and "user" not in r.text.replace("user_", "")
    got = api.client.get(f"/api/v1/containers/{cid}/network", headers=api.h(api.alice))
    assert "pass" not in got.text
    assert got.json()["data"]["credentials_configured"] is True


def test_patch_same_endpoint_without_userinfo_keeps_credentials(api: Api) -> None:
    cid = api.container()
    url = f"/api/v1/containers/{cid}/network"
    api.client.patch(url, json=GOOD, headers=api.h(api.alice))
    r = api.client.patch(
        url, json={"type": "socks5", "proxy": "socks5://198.18.1.2:1080"}, headers=api.h(api.alice)
    )
    assert r.json()["data"]["credentials_configured"] is True
    proxy = api.store.get_network(cid).desired.config.proxy  # type: ignore[union-attr]
    assert proxy is not None and (proxy.username, proxy.password) == ("user", "pass")
    # another endpoint without userinfo drops them
    r = api.client.patch(
        url, json={"type": "socks5", "proxy": "socks5://198.18.1.3:1080"}, headers=api.h(api.alice)
    )
    assert r.json()["data"]["credentials_configured"] is False


def test_put_is_patch(api: Api) -> None:
    cid = api.container()
    r = api.client.put(f"/api/v1/containers/{cid}/network", json=GOOD, headers=api.h(api.alice))
    assert r.status_code == 200
    assert r.json()["message"] == "Network configuration updated successfully"
    assert r.json()["data"]["type"] == "socks5"


def test_patch_merges_optional_fields(api: Api) -> None:
    cid = api.container()
    url = f"/api/v1/containers/{cid}/network"
    api.client.patch(url, json={**GOOD, "country": "US", "comment": "x"}, headers=api.h(api.alice))
    r = api.client.patch(url, json={**GOOD, "comment": None}, headers=api.h(api.alice))
    data = r.json()["data"]
    assert data["country"] == "US" and data["comment"] is None
    assert data["dns_servers"] == ["1.1.1.1", "8.8.8.8"]  # the spec's default


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"type": "socks5"}, "Proxy URL required for non-block type"),
        ({"type": "http", "proxy": ""}, "Proxy URL required for non-block type"),
        ({}, "Field 'type' is required"),
        ({"type": "vpn"}, "Field 'type' must be one of: socks5, http, https, block"),
        ({"type": 5}, "Field 'type' must be one of: socks5, http, https, block"),
        ({**GOOD, "extra": 1}, "Unknown field 'extra'"),
        (
            {"type": "socks5", "proxy": "http://h:1"},
            "Proxy URL scheme must be 'socks5' for type 'socks5'",
        ),
        ({"type": "socks5", "proxy": "socks5://h"}, "Proxy URL must include a port"),
        (
            {"type": "socks5", "proxy": "socks5://h:99999"},
            "Invalid proxy URL: Port out of range 0-65535",
        ),
        ({"type": "socks5", "proxy": "socks5://h:0"}, "Proxy port must be between 1 and 65535"),
        ({"type": "socks5", "proxy": "socks5://bad_host!:1"}, "Invalid proxy host 'bad_host!'"),
        (
            {"type": "socks5", "proxy": "socks5://h:1/path"},
            "Proxy URL must not have a path, query or fragment",
        ),
        ({"type": "block", "proxy": "socks5://h:1"}, "Proxy URL must be empty for type 'block'"),
        (
            {**GOOD, "dns_servers": ["1.1.1.1"] * 5},
            "Field 'dns_servers': List should have at most 4 items after validation, not 5",
        ),
        ({**GOOD, "dns_servers": ["1.1.1.300"]}, "Invalid DNS server address '1.1.1.300'"),
        ({**GOOD, "dns_servers": "1.1.1.1"}, "Field 'dns_servers': Input should be a valid list"),
        (
            {**GOOD, "comment": "x" * 501},
            "Field 'comment': String should have at most 500 characters",
        ),
        (
            {**GOOD, "country": "x" * 65},
            "Field 'country': String should have at most 64 characters",
        ),
        ([GOOD], "Request body must be a JSON object"),
    ],
)
def test_patch_validation_is_400_in_the_envelope(api: Api, body: Any, message: str) -> None:
    cid = api.container()
    r = api.client.patch(f"/api/v1/containers/{cid}/network", json=body, headers=api.h(api.alice))
    assert_error(r, 400, "Bad Request", message)
    assert (
        api.client.get(f"/api/v1/containers/{cid}/network", headers=api.h(api.alice)).json()[
            "data"
        ]["configured"]
        is False
    )


def test_patch_malformed_json(api: Api) -> None:
    cid = api.container()
    r = api.client.patch(
        f"/api/v1/containers/{cid}/network",
        content=b"{not json",
        headers={**api.h(api.alice), "Content-Type": "application/json"},
    )
    assert_error(r, 400, "Bad Request", "Request body must be a JSON object")


def test_body_size_bounded(api: Api) -> None:
    cid = api.container()
    r = api.client.patch(
        f"/api/v1/containers/{cid}/network",
        content=b'{"type": "block", "comment": "' + b"x" * 20000 + b'"}',
        headers={**api.h(api.alice), "Content-Type": "application/json"},
    )
    assert_error(r, 413, "Request Entity Too Large", "Request body larger than 16384 bytes")


@pytest.mark.parametrize("action", ["start", "stop"])
def test_start_stop_need_a_configuration(api: Api, action: str) -> None:
    cid = api.container()
    r = api.client.post(f"/api/v1/containers/{cid}/network/{action}", headers=api.h(api.alice))
    assert_error(r, 400, "Bad Request", "Network not configured for this container")


def test_lifecycle_start_stop_delete(api: Api) -> None:
    cid = api.container()
    base = f"/api/v1/containers/{cid}/network"
    h = api.h(api.alice)
    api.client.patch(base, json=GOOD, headers=h)

    r = api.client.post(base + "/start", headers=h)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["message"] == "Network service started successfully"
    assert body["data"]["status"] == "running" and body["data"]["is_running"] is True
    assert body["data"]["bridge_details"]["gost_listener_ip"] == "10.20.0.2"
    assert body["data"]["last_check"].endswith("Z")
    assert api.dataplane.enforced[cid] == "proxy"
    assert api.relay.listeners[cid].password == "pass"  # the relay gets the secret

    got = api.client.get(base, headers=h).json()["data"]
    assert got["status"] == "running"
    assert got["remote_status"]["is_running"] is True
    assert got["remote_status"]["bridge_details"]["bridge_name"] == f"br-{cid[:12]}"
    assert got["remote_status"]["upstream"]["reachable"] is True
    assert got["last_status_check"] is not None

    r = api.client.post(base + "/stop", headers=h)
    assert r.status_code == 200
    assert r.json()["message"] == "Network service stopped successfully"
    assert r.json()["data"]["status"] == "stopped" and r.json()["data"]["is_running"] is False
    assert cid not in api.dataplane.enforced and cid not in api.relay.listeners
    assert api.client.get(base, headers=h).json()["data"]["type"] == "socks5"  # kept

    # switch to block while stopped, start, then delete while running
    api.client.patch(base, json={"type": "block"}, headers=h)
    assert api.client.post(base + "/start", headers=h).json()["data"]["bridge_details"] is None
    assert api.dataplane.enforced[cid] == "block"
    r = api.client.delete(base, headers=h)
    assert r.status_code == 200
    assert r.json() == {"statusCode": 200, "message": "Network configuration removed successfully"}
    assert cid not in api.dataplane.enforced
    assert api.client.get(base, headers=h).json()["data"]["configured"] is False
    assert_error(
        api.client.delete(base, headers=h),
        404,
        "Not Found",
        "Container or network configuration not found",
    )


def test_patch_running_container_switches_enforcement(api: Api) -> None:
    cid = api.container()
    base = f"/api/v1/containers/{cid}/network"
    h = api.h(api.alice)
    api.client.patch(base, json=GOOD, headers=h)
    api.client.post(base + "/start", headers=h)
    r = api.client.patch(base, json={"type": "block"}, headers=h)
    assert r.json()["data"]["status"] == "running"
    assert api.dataplane.enforced[cid] == "block" and cid not in api.relay.listeners


def test_start_with_unreachable_upstream_reports_error(api: Api) -> None:
    cid = api.container()
    base = f"/api/v1/containers/{cid}/network"
    h = api.h(api.alice)
    api.relay.reachable = False
    api.relay.error = "upstream proxy rejected the username/password"
    api.client.patch(base, json=GOOD, headers=h)
    r = api.client.post(base + "/start", headers=h)
    assert_error(r, 500, "Internal Server Error", "Failed to start network service")
    assert "rejected the username/password" in r.json()["reason"]
    got = api.client.get(base, headers=h).json()["data"]
    assert got["status"] == "error"
    assert "rejected the username/password" in got["status_reason"]
    assert api.dataplane.enforced[cid] == "proxy"  # fail closed: the walls stay


def test_start_without_agent_times_out_with_500(api_no_agent: Api) -> None:
    api = api_no_agent
    api.settings.apply_timeout = 0.3
    cid = api.container()
    base = f"/api/v1/containers/{cid}/network"
    api.client.patch(base, json={"type": "block"}, headers=api.h(api.alice))
    r = api.client.post(base + "/start", headers=api.h(api.alice))
    assert_error(r, 500, "Internal Server Error", "Failed to start network service")
    assert "did not apply" in r.json()["reason"]


def test_unknown_route_uses_error_envelope(api: Api) -> None:
    assert_error(
        api.client.get("/api/v1/nope", headers=api.h(api.admin)), 404, "Not Found", "Not Found"
    )


def test_users_see_only_their_containers(api: Api) -> None:
    mine = api.container(owner="alice")
    api.container(owner="bob", ref="ns2")
    ids = [
        c["id"]
        for c in api.client.get("/api/v1/containers", headers=api.h(api.alice)).json()["data"]
    ]
    assert ids == [mine]
    assert len(api.client.get("/api/v1/containers", headers=api.h(api.admin)).json()["data"]) == 2


def test_tokens_admin_only_and_shown_once(api: Api) -> None:
    r = api.client.post("/api/v1/auth/tokens", json={"name": "carol"}, headers=api.h(api.alice))
    assert_error(r, 403, "Forbidden", "Admin privileges required")
    r = api.client.post("/api/v1/auth/tokens", json={"name": "carol"}, headers=api.h(api.admin))
    assert r.status_code == 201
    token = r.json()["data"]["token"]
    assert r.json()["data"]["admin"] is False
    assert api.client.get("/api/v1/containers", headers=api.h(token)).status_code == 200
    # stored hashed only
    with api.store.engine.connect() as conn:
        dump = "\n".join(str(row) for row in conn.exec_driver_sql("select * from api_tokens"))
    assert token not in dump


def test_container_registration_admin_only_and_validated(api: Api) -> None:
    r = api.client.post("/api/v1/containers", json={"ref": "x"}, headers=api.h(api.alice))
    assert_error(r, 403, "Forbidden", "Admin privileges required")
    r = api.client.post("/api/v1/containers", json={"ref": "../etc"}, headers=api.h(api.admin))
    assert_error(
        r,
        400,
        "Bad Request",
        "Invalid ref for runtime 'netns': must be a network namespace name ([A-Za-z0-9_.-], at most 64 characters)",
    )
    r = api.client.post(
        "/api/v1/containers", json={"ref": "a", "id": "xyz"}, headers=api.h(api.admin)
    )
    assert_error(r, 400, "Bad Request", "Invalid container ID format")
    cid = "507f1f77bcf86cd799439012"
    r = api.client.post(
        "/api/v1/containers", json={"ref": "a", "id": cid}, headers=api.h(api.admin)
    )
    assert r.status_code == 201 and r.json()["data"]["id"] == cid
    r = api.client.post(
        "/api/v1/containers", json={"ref": "a", "id": cid}, headers=api.h(api.admin)
    )
    assert_error(r, 409, "Conflict", "Container already exists")


def test_delete_container_removes_network_first(api: Api) -> None:
    cid = api.container()
    base = f"/api/v1/containers/{cid}/network"
    api.client.patch(base, json={"type": "block"}, headers=api.h(api.admin))
    api.client.post(base + "/start", headers=api.h(api.admin))
    r = api.client.delete(f"/api/v1/containers/{cid}", headers=api.h(api.admin))
    assert r.status_code == 200
    assert cid not in api.dataplane.enforced
    assert api.client.get(f"/api/v1/containers/{cid}", headers=api.h(api.admin)).status_code == 404


def test_healthz_and_openapi(api: Api) -> None:
    assert api.client.get("/healthz").json()["statusCode"] == 200
    spec = api.client.get("/openapi.json").json()
    assert "/api/v1/containers/{container_id}/network/start" in spec["paths"]
    assert api.client.get("/docs").status_code == 200


def test_live_status_follows_upstream_health(api: Api) -> None:
    import time

    cid = api.container()
    base = f"/api/v1/containers/{cid}/network"
    h = api.h(api.alice)
    api.client.patch(base, json=GOOD, headers=h)
    assert api.client.post(base + "/start", headers=h).status_code == 200

    def status_becomes(expected: str) -> dict[str, Any]:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            data: dict[str, Any] = api.client.get(base, headers=h).json()["data"]
            if data["status"] == expected:
                return data
            time.sleep(0.05)
        raise AssertionError(f"status never became {expected}")

    api.relay.reachable = False
    data = status_becomes("error")
    assert data["remote_status"]["upstream"]["reachable"] is False
    assert "connection refused" in data["status_reason"]
    assert data["remote_status"]["is_running"] is True  # enforcement stays: fail closed
    api.relay.reachable = True
    data = status_becomes("running")
    assert data["status_reason"] is None


def test_one_probe_per_shared_upstream(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    """A probe round probes each distinct upstream once, and updates every container of it."""
    h = api.h(api.alice)
    other = {**GOOD, "proxy": GOOD["proxy"].replace(":1080", ":1081")}
    cids = [api.container() for _ in range(4)]
    for cid, body in zip(cids, [GOOD, GOOD, GOOD, other], strict=True):
        base = f"/api/v1/containers/{cid}/network"
        api.client.patch(base, json=body, headers=h)
        assert api.client.post(base + "/start", headers=h).status_code == 200
    api.agent.stop()  # no probe rounds of its own from here: the next one is ours
    api.relay.probed.clear()
    api.relay.reachable = False
    api.agent.probe_all()
    assert sorted(spec.port for spec in api.relay.probed) == [1080, 1081]
    for cid in cids:
        data = api.client.get(f"/api/v1/containers/{cid}/network", headers=h).json()["data"]
        assert data["status"] == "error" and data["remote_status"]["upstream"]["reachable"] is False
    # Each upstream's result goes to its own containers: one recovers, the other stays down.
    api.relay.reachable, api.relay.down_ports = True, {1081}
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="egressd.agent.runner"):
        api.agent.probe_all()
    recovered = {r.getMessage() for r in caplog.records if "upstream recovered" in r.getMessage()}
    assert recovered == {f"container {cid}: upstream recovered" for cid in cids[:3]}
    seen = {
        cid: api.client.get(f"/api/v1/containers/{cid}/network", headers=h).json()["data"]
        for cid in cids
    }
    for cid in cids[:3]:
        assert seen[cid]["status"] == "running" and seen[cid]["status_reason"] is None
        assert seen[cid]["remote_status"]["upstream"]["reachable"] is True
    assert seen[cids[3]]["status"] == "error"
    assert "connection refused" in seen[cids[3]]["status_reason"]
    assert seen[cids[3]]["remote_status"]["upstream"]["reachable"] is False


def test_namespace_lost_is_an_error_and_recovers(api: Api) -> None:
    import time

    from egressd.errors import RuntimeLookupError

    present = {"yes": True}

    def resolve(runtime: str, ref: str) -> str:
        if not present["yes"]:
            raise RuntimeLookupError(f"network namespace '{ref}' not found")
        return f"/run/netns/{ref}"

    agent_resolve = api.agent.resolve
    api.agent.resolve = resolve
    try:
        cid = api.container()
        base = f"/api/v1/containers/{cid}/network"
        h = api.h(api.alice)
        api.client.patch(base, json={"type": "block"}, headers=h)
        assert api.client.post(base + "/start", headers=h).status_code == 200
        present["yes"] = False
        api.agent.reconcile_all()
        data = api.client.get(base, headers=h).json()["data"]
        assert data["status"] == "error" and "not found" in data["status_reason"]
        present["yes"] = True
        api.agent.reconcile_all(only_pending=True)  # failed applies are pending
        deadline = time.monotonic() + 3
        while api.client.get(base, headers=h).json()["data"]["status"] != "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        api.agent.resolve = agent_resolve


def test_garbage_collection_removes_orphans(api: Api) -> None:
    orphan = "f" * 24
    api.dataplane.enforced[orphan] = "proxy"
    api.relay.listeners[orphan] = None  # type: ignore[assignment]
    cid = api.container()
    base = f"/api/v1/containers/{cid}/network"
    api.client.patch(base, json=GOOD, headers=api.h(api.alice))
    api.client.post(base + "/start", headers=api.h(api.alice))
    api.agent.collect_garbage()
    assert orphan not in api.dataplane.enforced and orphan not in api.relay.listeners
    assert api.dataplane.enforced[cid] == "proxy" and cid in api.relay.listeners


def test_resync_adopts_what_is_in_place_and_repairs_drift(api: Api) -> None:
    cid = api.container()
    base = f"/api/v1/containers/{cid}/network"
    api.client.patch(base, json=GOOD, headers=api.h(api.alice))
    api.client.post(base + "/start", headers=api.h(api.alice))
    applies = api.dataplane.calls.count(f"proxy {cid}")
    status_before = api.store.get_network(cid).observed
    api.agent.reconcile_all()  # a full resync with everything in place
    assert api.dataplane.calls.count(f"proxy {cid}") == applies
    assert api.store.get_network(cid).observed == status_before  # no flapping, no writes
    del api.dataplane.enforced[cid]  # drift: somebody removed it
    api.agent.reconcile_all()
    assert api.dataplane.calls.count(f"proxy {cid}") == applies + 1
    assert api.dataplane.enforced[cid] == "proxy"


def test_ids_sharing_a_bridge_name_get_a_clear_409(api: Api) -> None:
    h = api.h(api.admin)
    first, second = "abcdef012345" + "0" * 12, "abcdef012345" + "1" * 12
    for cid in (first, second):
        assert (
            api.client.post(
                "/api/v1/containers", json={"ref": "n", "id": cid}, headers=h
            ).status_code
            == 201
        )
    assert (
        api.client.patch(f"/api/v1/containers/{first}/network", json=GOOD, headers=h).status_code
        == 200
    )
    r = api.client.patch(f"/api/v1/containers/{second}/network", json=GOOD, headers=h)
    assert r.status_code == 409
    assert r.json()["error"] == "Conflict"
    assert "already uses bridge br-abcdef012345" in r.json()["message"]
    # nothing half-applied: the second container stays unconfigured
    assert (
        api.client.get(f"/api/v1/containers/{second}/network", headers=h).json()["data"][
            "configured"
        ]
        is False
    )
