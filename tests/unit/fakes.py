"""In-memory stand-ins for the kernel and the relay, for tests without root.

They record what the agent asked for, so tests can assert on it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from egressd.model import Allocation, ProxySpec


class FakeDataplane:
    def __init__(self) -> None:
        self.enforced: dict[str, str] = {}  # container id -> "proxy" | "block"
        self.calls: list[str] = []

    def ensure_host_base(self, table: str) -> None:
        self.calls.append("base")

    def begin_pass(self, table: str) -> None:
        self.calls.append("begin")

    def end_pass(self) -> None:
        self.calls.append("end")

    def is_enforced(
        self,
        *,
        kind: str,
        container_id: str,
        netns_path: str,
        allocation: Allocation | None,
        table: str,
    ) -> bool:
        return self.enforced.get(container_id) == kind

    def enforced_container_ids(self, table: str) -> set[str]:
        return {cid for cid, kind in self.enforced.items() if kind == "proxy"}

    def record_routes(self, *, netns_path: str) -> list[dict[str, Any]]:
        return [{"dst": "default", "gateway": "192.0.2.1"}]

    def apply_proxy(
        self,
        *,
        container_id: str,
        netns_path: str,
        allocation: Allocation,
        saved_routes: list[dict[str, Any]] | None,
        table: str,
    ) -> list[dict[str, Any]]:
        self.calls.append(f"proxy {container_id}")
        self.enforced[container_id] = "proxy"
        return saved_routes or [{"dst": "default", "gateway": "192.0.2.1"}]

    def apply_block(self, *, container_id: str, netns_path: str, table: str) -> None:
        self.calls.append(f"block {container_id}")
        self.enforced[container_id] = "block"

    def remove(
        self,
        *,
        container_id: str,
        netns_path: str | None,
        allocation: Allocation | None,
        saved_routes: list[dict[str, Any]],
        table: str,
    ) -> None:
        self.calls.append(f"remove {container_id}")
        self.enforced.pop(container_id, None)


class FakeRelay:
    def __init__(self) -> None:
        self.listeners: dict[str, ProxySpec] = {}
        self.dns: dict[str, tuple[str, ...]] = {}
        self.reachable = True
        self.down_ports: set[int] = set()  # upstreams that fail while the others answer
        self.error = "connection refused"
        self.probed: list[ProxySpec] = []

    async def ensure_listener(
        self,
        *,
        container_id: str,
        listen_ip: str,
        port: int,
        upstream: ProxySpec,
        dns_servers: tuple[str, ...] = (),
    ) -> None:
        self.listeners[container_id] = upstream
        self.dns[container_id] = dns_servers

    async def remove_listener(self, container_id: str) -> None:
        self.listeners.pop(container_id, None)

    async def listener_ids(self) -> set[str]:
        return set(self.listeners)

    async def probe(self, spec: ProxySpec, *, timeout: float) -> dict[str, Any]:
        self.probed.append(spec)
        reachable = self.reachable and spec.port not in self.down_ports
        return {
            "reachable": reachable,
            "latency_ms": 1.0 if reachable else None,
            "last_error": None if reachable else self.error,
            "checked_at": "2026-01-01T00:00:00.000Z",
        }


@contextmanager
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
