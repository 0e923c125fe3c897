"""Where the API's store reads run, and GET's answers around them.

SQLite reads run on the event loop, PostgreSQL reads in the thread pool
(``api.deps.store_read``); GET .../network reads once and keeps the spec's
precedence, envelope and key order.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from egressd.api.deps import store_read
from tests.unit.conftest import Api

GOOD = {"type": "socks5", "proxy": "socks5://user:pass@198.18.1.2:1080"}


@pytest.mark.parametrize(("local", "on_loop"), [(True, True), (False, False)])
def test_store_reads_run_on_the_loop_only_for_a_local_store(local: bool, on_loop: bool) -> None:
    services: Any = SimpleNamespace(store=SimpleNamespace(reads_are_local=local))

    def read(value: int, *, plus: int) -> tuple[int, int]:
        return value + plus, threading.get_ident()

    async def main() -> tuple[tuple[int, int], int]:
        return await store_read(services, read, 1, plus=2), threading.get_ident()

    (result, reader_thread), loop_thread = asyncio.run(main())
    assert result == 3
    assert (reader_thread == loop_thread) is on_loop


def test_the_app_store_reads_locally_on_sqlite(api: Api) -> None:
    assert api.store.reads_are_local


def test_get_network_answers_500_when_the_read_fails(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    cid = api.container()

    def broken(container_id: str) -> None:
        raise RuntimeError("database is on fire")

    monkeypatch.setattr(api.store, "get_network", broken)
    r = api.client.get(f"/api/v1/containers/{cid}/network", headers=api.h(api.alice))
    assert r.status_code == 500
    assert r.json() == {
        "statusCode": 500,
        "error": "Internal Server Error",
        "message": "Failed to retrieve network configuration",
    }


def test_get_network_body_keys_and_order(api: Api) -> None:
    cid = api.container()
    base = f"/api/v1/containers/{cid}/network"
    api.client.patch(base, json={**GOOD, "country": "US"}, headers=api.h(api.alice))
    assert api.client.post(base + "/start", headers=api.h(api.alice)).status_code == 200
    body = api.client.get(base, headers=api.h(api.alice)).json()
    assert list(body) == ["statusCode", "message", "data"]
    assert (body["statusCode"], body["message"]) == (
        200,
        "Network configuration retrieved successfully",
    )
    data = body["data"]
    assert list(data) == [
        "container_id",
        "configured",
        "type",
        "proxy",
        "credentials_configured",
        "country",
        "city",
        "region",
        "comment",
        "dns_servers",
        "status",
        "status_reason",
        "configured_at",
        "last_status_check",
        "remote_status",
    ]
    assert list(data["remote_status"]) == ["is_running", "last_check", "bridge_details", "upstream"]
    assert data["proxy"] == "socks5://198.18.1.2:1080" and data["credentials_configured"] is True
    assert data["remote_status"]["bridge_details"] == {
        "bridge_name": f"br-{cid[:12]}",
        "bridge_ip": "10.20.0.1",
        "gost_listener_ip": "10.20.0.2",
        "port": 1080,
    }


@pytest.mark.parametrize(
    ("who", "cid", "status", "message"),
    [
        (None, "bad", 401, "Authentication required"),  # 401 before 400
        ("admin", "bad", 400, "Invalid container ID format"),
        ("bob", "a" * 24, 404, "Container not found"),  # 404 before 403
        ("bob", None, 403, "Access denied to this container"),
        ("alice", None, 200, "Container retrieved successfully"),
        ("admin", None, 200, "Container retrieved successfully"),
    ],
)
def test_get_container_precedence(
    api: Api, who: str | None, cid: str | None, status: int, message: str
) -> None:
    mine = api.container(owner="alice")
    token = getattr(api, who) if who else None
    r = api.client.get(f"/api/v1/containers/{cid or mine}", headers=api.h(token))
    assert r.status_code == status, r.text
    assert r.json()["message"] == message
    if status == 200:
        assert r.json()["data"]["id"] == mine and r.json()["data"]["owner"] == "alice"
