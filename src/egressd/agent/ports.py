"""What the agent needs from the kernel and from the relay: two small ports.

The real implementations are in :mod:`egressd.agent.adapters`; tests pass
in-memory fakes. Everything the agent stores about what it applied is
JSON (saved routes, upstream health), so the ports speak dicts.
"""

from __future__ import annotations

from typing import Any, Protocol

from egressd.model import Allocation, ProxySpec


class Dataplane(Protocol):
    def ensure_host_base(self, table: str) -> None: ...
    def record_routes(self, *, netns_path: str) -> list[dict[str, Any]]: ...
    def enforced_container_ids(self, table: str) -> set[str]: ...
    def is_enforced(
        self,
        *,
        kind: str,
        container_id: str,
        netns_path: str,
        allocation: Allocation | None,
        table: str,
    ) -> bool: ...
    def begin_pass(self, table: str) -> None: ...
    def end_pass(self) -> None: ...
    def apply_proxy(
        self,
        *,
        container_id: str,
        netns_path: str,
        allocation: Allocation,
        saved_routes: list[dict[str, Any]] | None,
        table: str,
    ) -> list[dict[str, Any]]: ...
    def apply_block(self, *, container_id: str, netns_path: str, table: str) -> None: ...
    def remove(
        self,
        *,
        container_id: str,
        netns_path: str | None,
        allocation: Allocation | None,
        saved_routes: list[dict[str, Any]],
        table: str,
    ) -> None: ...


class RelayPort(Protocol):
    async def ensure_listener(
        self,
        *,
        container_id: str,
        listen_ip: str,
        port: int,
        upstream: ProxySpec,
        dns_servers: tuple[str, ...],
    ) -> None: ...
    async def remove_listener(self, container_id: str) -> None: ...
    async def listener_ids(self) -> set[str]: ...
    async def probe(self, spec: ProxySpec, *, timeout: float) -> dict[str, Any]: ...
