"""Plain frozen views of stored rows: what the API and the agent get back.

Never ORM rows, so callers cannot write by accident. Network views are
built from one joined row in :func:`egressd.store.reads.network_of`.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from egressd.model import (
    Allocation,
    DesiredState,
    NetworkConfig,
    NetworkType,
    ProxySpec,
    Status,
)
from egressd.store.tables import Container, NetworkConfigRow


@dataclass(frozen=True)
class PrincipalView:
    id: int
    name: str
    is_admin: bool


@dataclass(frozen=True)
class ContainerView:
    id: str
    name: str | None
    owner: str | None
    owner_id: int | None
    runtime: str
    ref: str
    node: str
    created_at: datetime


@dataclass(frozen=True)
class DesiredView:
    config: NetworkConfig
    desired_state: DesiredState
    generation: int
    configured_at: datetime


@dataclass(frozen=True)
class ObservedView:
    status: Status
    reason: str | None
    is_running: bool
    observed_generation: int
    last_check: datetime | None
    applied: dict[str, Any] | None
    upstream: dict[str, Any] | None


@dataclass(frozen=True)
class NetworkView:
    container: ContainerView
    desired: DesiredView | None
    allocation: Allocation | None
    observed: ObservedView | None


# Stored strings were validated when they were written; parsing them again on
# every read is pure, and cost more than the SELECT itself (``ProxySpec.parse``
# checks every character). Both results are immutable, so sharing them is safe;
# the caches hold no credentials (endpoint URLs carry no userinfo).
@functools.lru_cache(maxsize=4096)
def _stored_endpoint(url: str, ntype: NetworkType) -> ProxySpec:
    return ProxySpec.parse(url, expected=ntype)


@functools.lru_cache(maxsize=4096)
def stored_subnet(subnet: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(subnet)


def stored_proxy(
    ntype: NetworkType, url: str | None, username: str | None, password: str | None
) -> ProxySpec | None:
    """The proxy of a stored configuration: its endpoint URL (no userinfo) plus credentials."""
    if not url:
        return None
    endpoint = _stored_endpoint(url, ntype)
    return ProxySpec(
        scheme=ntype, host=endpoint.host, port=endpoint.port, username=username, password=password
    )


def config_from_row(row: NetworkConfigRow) -> NetworkConfig:
    ntype = NetworkType(row.type)
    proxy = stored_proxy(ntype, row.proxy_url, row.proxy_username, row.proxy_password)
    return NetworkConfig(
        type=ntype,
        proxy=proxy,
        dns_servers=tuple(row.dns_servers),
        country=row.country,
        city=row.city,
        region=row.region,
        comment=row.comment,
    )


def container_view_of(row: Container, owner: str | None) -> ContainerView:
    return ContainerView(
        id=row.id,
        name=row.name,
        owner=owner,
        owner_id=row.owner_id,
        runtime=row.runtime,
        ref=row.ref,
        node=row.node,
        created_at=row.created_at,
    )
