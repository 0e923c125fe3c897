"""The real dataplane and relay behind the agent's small protocols.

The agent stores what it must undo as JSON (saved routes, upstream health);
these adapters convert between that and the dataplane's / relay's values.
"""

from __future__ import annotations

import ssl
from datetime import UTC, datetime
from typing import Any

from egressd import dataplane
from egressd.model import Allocation, ProxySpec, format_timestamp
from egressd.relay import Relay, probe_upstream


class KernelDataplane:
    """Not thread-safe: used by the one reconciler thread."""

    def __init__(self) -> None:
        self._in_pass = False
        self._host_state: dataplane.HostTableState | None = None
        # Containers whose host rules we changed since the snapshot was read.
        self._touched: set[str] = set()

    def begin_pass(self, table: str) -> None:
        # Read lazily, by the first inspection of the pass: a pass that only
        # applies new containers (a start) never needs it, and the listing
        # grows with the number of containers.
        self._in_pass, self._host_state = True, None
        self._touched.clear()

    def end_pass(self) -> None:
        self._in_pass, self._host_state = False, None
        self._touched.clear()

    def _pass_host_state(self, table: str, container_id: str) -> dataplane.HostTableState | None:
        """The pass's snapshot of the host table, read again only if it is stale for this one."""
        if not self._in_pass:
            return None
        if self._host_state is None or container_id in self._touched:
            self._host_state = dataplane.read_host_table(table)
            self._touched.clear()
        return self._host_state

    def is_enforced(
        self,
        *,
        kind: str,
        container_id: str,
        netns_path: str,
        allocation: Allocation | None,
        table: str,
    ) -> bool:
        seen = dataplane.inspect_container(
            container_id=container_id,
            netns_path=netns_path,
            allocation=allocation,
            table=table,
            host_state=self._pass_host_state(table, container_id),
        )
        return seen.proxy_enforced if kind == "proxy" else seen.block_enforced

    def ensure_host_base(self, table: str) -> None:
        dataplane.ensure_host_base(table)

    def enforced_container_ids(self, table: str) -> set[str]:
        return dataplane.list_host_containers(table)

    def record_routes(self, *, netns_path: str) -> list[dict[str, Any]]:
        return [r.to_dict() for r in dataplane.record_default_routes(netns_path=netns_path)]

    def apply_proxy(
        self,
        *,
        container_id: str,
        netns_path: str,
        allocation: Allocation,
        saved_routes: list[dict[str, Any]] | None,
        table: str,
    ) -> list[dict[str, Any]]:
        self._touched.add(container_id)
        saved = (
            [dataplane.SavedRoute.from_dict(r) for r in saved_routes]
            if saved_routes is not None
            else None
        )
        result = dataplane.apply_proxy_enforcement(
            container_id=container_id,
            netns_path=netns_path,
            allocation=allocation,
            saved_routes=saved,
            table=table,
        )
        return [r.to_dict() for r in result]

    def apply_block(self, *, container_id: str, netns_path: str, table: str) -> None:
        dataplane.apply_block_enforcement(
            container_id=container_id, netns_path=netns_path, table=table
        )

    def remove(
        self,
        *,
        container_id: str,
        netns_path: str | None,
        allocation: Allocation | None,
        saved_routes: list[dict[str, Any]],
        table: str,
    ) -> None:
        self._touched.add(container_id)
        dataplane.remove_enforcement(
            container_id=container_id,
            netns_path=netns_path,
            allocation=allocation,
            saved_routes=[dataplane.SavedRoute.from_dict(r) for r in saved_routes],
            table=table,
        )


class RelayAdapter:
    def __init__(self, relay: Relay, *, ssl_context: ssl.SSLContext | None = None) -> None:
        self.relay = relay
        self.ssl_context = ssl_context

    async def ensure_listener(
        self,
        *,
        container_id: str,
        listen_ip: str,
        port: int,
        upstream: ProxySpec,
        dns_servers: tuple[str, ...],
    ) -> None:
        await self.relay.ensure_listener(
            container_id=container_id,
            listen_ip=listen_ip,
            port=port,
            upstream=upstream,
            dns_servers=dns_servers,
        )

    async def remove_listener(self, container_id: str) -> None:
        await self.relay.remove_listener(container_id)

    async def listener_ids(self) -> set[str]:
        return set(self.relay.listener_addresses())

    async def probe(self, spec: ProxySpec, *, timeout: float) -> dict[str, Any]:
        result = await probe_upstream(spec, timeout=timeout, ssl_context=self.ssl_context)
        return {
            "reachable": result.reachable,
            "latency_ms": round(result.latency_ms, 2) if result.latency_ms is not None else None,
            "last_error": result.error,
            "auth_failed": result.auth_failed,
            "checked_at": format_timestamp(datetime.now(UTC)),
        }
