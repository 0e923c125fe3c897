from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from egressd.agent import Agent
from egressd.daemon import build_app, open_store
from egressd.settings import Settings
from egressd.store import Store
from egressd.store.wakeups import Wakeups
from tests.unit.fakes import FakeDataplane, FakeRelay, loop_in_thread


@dataclass
class Api:
    client: TestClient
    store: Store
    settings: Settings
    dataplane: FakeDataplane
    relay: FakeRelay
    agent: Agent
    admin: str
    alice: str
    bob: str

    def h(self, token: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"} if token else {}

    def container(self, owner: str | None = "alice", ref: str = "ns1") -> str:
        r = self.client.post(
            "/api/v1/containers", json={"ref": ref, "owner": owner}, headers=self.h(self.admin)
        )
        assert r.status_code == 201, r.text
        return str(r.json()["data"]["id"])


def make_api(tmp_path: Path, *, with_agent: bool) -> Iterator[Api]:
    settings = Settings(
        data_dir=tmp_path, apply_timeout=3.0, resync_interval=60.0, probe_interval=0.2
    )
    store = open_store(settings)
    tokens = {n: store.create_token(n, admin=(n == "admin")) for n in ("admin", "alice", "bob")}
    wakeups = Wakeups(poll=0.05)
    dataplane, relay = FakeDataplane(), FakeRelay()
    app = build_app(settings, store, wakeups=wakeups, with_agent=False)
    with loop_in_thread() as loop, TestClient(app) as client:
        agent = Agent(
            settings=settings,
            store=store,
            wakeups=wakeups,
            dataplane=dataplane,
            relay=relay,
            loop=loop,
            resolve=lambda runtime, ref: f"/run/netns/{ref}",
        )
        if with_agent:
            agent.start()
        try:
            yield Api(client, store, settings, dataplane, relay, agent, **tokens)
        finally:
            agent.stop()
            store.engine.dispose()


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path, with_agent=True)


@pytest.fixture
def api_no_agent(tmp_path: Path) -> Iterator[Api]:
    yield from make_api(tmp_path, with_agent=False)
