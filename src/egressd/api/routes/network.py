"""The five endpoints of the Container Network API (spec), plus PUT = PATCH.

The handlers that write are sync: FastAPI runs them in its thread pool,
where waiting for the agent (bounded by ``settings.apply_timeout``) blocks
only that thread. Before waiting on a node's agent they check its
heartbeat: when the agent has stopped reporting, they answer 500 at once
and change nothing. GET only reads, once, through ``deps.store_read`` (on
the loop for SQLite, in the thread pool for PostgreSQL): it is the hot path.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from egressd.api import presenters
from egressd.api.deps import (
    ContainerIdPath,
    PrincipalDep,
    Services,
    ServicesDep,
    check_access,
    checked_id,
    store_read,
    visible_container,
)
from egressd.api.envelopes import ApiError, iso, ok
from egressd.api.schemas import NetworkConfigUpdate
from egressd.errors import AllocationExhausted, InvalidInput, NotFound
from egressd.model import (
    DesiredState,
    NetworkConfig,
    NetworkType,
    ProxySpec,
    Status,
    parse_dns_servers,
)
from egressd.store import NetworkView

log = logging.getLogger(__name__)
router = APIRouter(prefix="/api/v1/containers", tags=["container network"])


def _require_live_agent(services: Services, node: str, *, failed: str) -> None:
    """500 ``failed`` at once when ``node``'s agent has stopped sending heartbeats.

    A node whose agent never reported is waited for as before: the wait's
    timeout says so.
    """
    seen = services.store.get_node(node)
    if seen is None or seen.is_alive(services.settings.effective_node_timeout):
        return
    reason = f"agent of node '{node}' is not alive (last seen {iso(seen.last_seen)})"
    raise ApiError(500, failed, reason=reason)


def _configured(view: NetworkView) -> bool:
    return view.desired is not None and view.desired.desired_state is not DesiredState.ABSENT


def _wait_applied(
    services: Services, container_id: str, generation: int, *, node: str
) -> NetworkView | None:
    """Wait (bounded) until the agent of ``node`` has acted on ``generation``."""
    services.wakeups.notify_agent(node)
    seen: list[NetworkView] = []

    def applied() -> bool:
        view = services.store.get_network(container_id)
        seen[:] = [view]
        return view.observed is not None and view.observed.observed_generation >= generation

    if services.wakeups.wait_until(applied, timeout=services.settings.apply_timeout):
        return seen[0]
    return None


def _timeout_reason(services: Services, node: str) -> str:
    reason = f"the agent did not apply the change within {services.settings.apply_timeout:g}s"
    if services.store.get_node(node) is None:
        reason += f" (no agent of node '{node}' has reported yet)"
    return reason


@router.get("/{container_id}/network", summary="Get container network configuration")
async def get_network_config(
    container_id: ContainerIdPath, principal: PrincipalDep, services: ServicesDep
) -> JSONResponse:
    # One read answers existence (404), ownership (403) and the body.
    cid = checked_id(container_id)
    try:
        view = await store_read(services, services.store.get_network, cid)
    except NotFound:
        raise ApiError(404, "Container not found") from None
    except Exception:
        log.exception("reading network configuration of %s", cid)
        raise ApiError(500, "Failed to retrieve network configuration") from None
    check_access(principal, view.container, denied="Access denied to this container")
    return ok("Network configuration retrieved successfully", presenters.network_status(view))


def _merge(body: NetworkConfigUpdate, current: NetworkConfig | None) -> NetworkConfig:
    ntype = NetworkType(body.type)
    given = body.model_fields_set
    proxy: ProxySpec | None = None
    if ntype.is_proxy:
        if not body.proxy:
            raise InvalidInput("Proxy URL required for non-block type")
        proxy = ProxySpec.parse(body.proxy, expected=ntype)
    elif body.proxy:
        raise InvalidInput("Proxy URL must be empty for type 'block'")

    def keep(field: str) -> Any:
        if field in given:
            return getattr(body, field)
        return getattr(current, field) if current is not None else None

    dns = (
        parse_dns_servers(body.dns_servers)
        if "dns_servers" in given or current is None
        else current.dns_servers
    )
    return NetworkConfig(
        type=ntype,
        proxy=proxy,
        dns_servers=dns,
        country=keep("country"),
        city=keep("city"),
        region=keep("region"),
        comment=keep("comment"),
    )


def update_network_config(
    container_id: ContainerIdPath,
    body: NetworkConfigUpdate,
    principal: PrincipalDep,
    services: ServicesDep,
) -> JSONResponse:
    visible_container(
        services, principal, container_id, denied="Cannot configure network for this container"
    )
    current = services.store.get_network(container_id)
    config = _merge(body, current.desired.config if current.desired else None)
    if current.desired is not None and current.desired.desired_state is DesiredState.RUNNING:
        _require_live_agent(
            services, current.container.node, failed="Failed to update network configuration"
        )
    s = services.settings
    try:
        view = services.store.put_config(
            container_id, config, pool=s.pool, prefix=s.subnet_prefix, port=s.relay_port
        )
    except AllocationExhausted as exc:
        raise ApiError(500, "Failed to update network configuration", reason=str(exc)) from None
    except NotFound:
        raise ApiError(404, "Container not found") from None
    log.info("container %s: configured type=%s", container_id, config.type.value)
    if view.desired is not None and view.desired.desired_state is DesiredState.RUNNING:
        applied = _wait_applied(
            services, container_id, view.desired.generation, node=view.container.node
        )
        view = applied or view
    return ok("Network configuration updated successfully", presenters.network_config(view))


router.add_api_route(
    "/{container_id}/network",
    update_network_config,
    methods=["PATCH"],
    summary="Update container network configuration",
)
router.add_api_route(
    "/{container_id}/network",
    update_network_config,
    methods=["PUT"],
    summary="Update container network configuration (alias of PATCH)",
    operation_id="update_network_config_put",
)


def _transition(
    services: Services,
    container_id: str,
    *,
    state: DesiredState,
    failed: str,
) -> NetworkView:
    current = services.store.get_network(container_id)
    if not _configured(current):
        raise ApiError(400, "Network not configured for this container")
    node = current.container.node
    _require_live_agent(services, node, failed=failed)
    try:
        generation = services.store.set_desired_state(container_id, state)
    except NotFound:
        raise ApiError(400, "Network not configured for this container") from None
    view = _wait_applied(services, container_id, generation, node=node)
    if view is None:
        raise ApiError(500, failed, reason=_timeout_reason(services, node))
    if view.observed is not None and view.observed.status is Status.ERROR:
        raise ApiError(500, failed, reason=view.observed.reason)
    return view


@router.post("/{container_id}/network/start", summary="Start container network proxy/blocking")
def start_network(
    container_id: ContainerIdPath, principal: PrincipalDep, services: ServicesDep
) -> JSONResponse:
    visible_container(
        services, principal, container_id, denied="Cannot start network for this container"
    )
    view = _transition(
        services, container_id, state=DesiredState.RUNNING, failed="Failed to start network service"
    )
    log.info("container %s: network started", container_id)
    return ok("Network service started successfully", presenters.service_state(view))


@router.post("/{container_id}/network/stop", summary="Stop container network proxy/blocking")
def stop_network(
    container_id: ContainerIdPath, principal: PrincipalDep, services: ServicesDep
) -> JSONResponse:
    visible_container(
        services, principal, container_id, denied="Cannot stop network for this container"
    )
    view = _transition(
        services, container_id, state=DesiredState.STOPPED, failed="Failed to stop network service"
    )
    log.info("container %s: network stopped", container_id)
    return ok("Network service stopped successfully", presenters.service_state(view))


def remove_network(services: Services, container_id: str) -> None:
    """Mark the configuration absent and wait until the agent has undone and forgotten it."""
    failed = "Failed to remove network configuration"
    try:
        current = services.store.get_network(container_id)
    except NotFound:
        raise ApiError(404, "Container or network configuration not found") from None
    if not _configured(current):
        raise ApiError(404, "Container or network configuration not found")
    node = current.container.node
    _require_live_agent(services, node, failed=failed)
    try:
        services.store.set_desired_state(container_id, DesiredState.ABSENT)
    except NotFound:
        raise ApiError(404, "Container or network configuration not found") from None
    services.wakeups.notify_agent(node)

    def gone() -> bool:
        return services.store.get_network(container_id).desired is None

    if not services.wakeups.wait_until(gone, timeout=services.settings.apply_timeout):
        view = services.store.get_network(container_id)
        reason = view.observed.reason if view.observed and view.observed.reason else None
        raise ApiError(500, failed, reason=reason or _timeout_reason(services, node))


@router.delete("/{container_id}/network", summary="Remove container network configuration")
def remove_network_config(
    container_id: ContainerIdPath, principal: PrincipalDep, services: ServicesDep
) -> JSONResponse:
    visible_container(
        services,
        principal,
        container_id,
        denied="Cannot remove network configuration from this container",
        not_found="Container or network configuration not found",
    )
    remove_network(services, container_id)
    log.info("container %s: network configuration removed", container_id)
    return ok("Network configuration removed successfully")
