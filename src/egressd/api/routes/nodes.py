"""Nodes (hosts) and whether their agents are alive (admin).

A node appears once its agent has sent a heartbeat or a container names it.
``alive``: a heartbeat within ``settings.node_timeout`` seconds, by the
store's clock. Sync handler, one short read.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from egressd.api.deps import AdminDep, ServicesDep
from egressd.api.envelopes import iso, ok
from egressd.store import NodeView

router = APIRouter(prefix="/api/v1/nodes", tags=["nodes"])


def node_public(view: NodeView, *, timeout: float) -> dict[str, Any]:
    age = view.seconds_since_seen
    return {
        "name": view.name,
        "alive": view.is_alive(timeout),
        "last_seen": iso(view.last_seen),
        "seconds_since_seen": None if age is None else round(age, 3),
        "started_at": iso(view.started_at),
        "version": view.version,
        "containers": view.containers,
    }


@router.get("", summary="List nodes and their agents' liveness (admin)")
def list_nodes(_: AdminDep, services: ServicesDep) -> JSONResponse:
    timeout = services.settings.effective_node_timeout
    data = [node_public(v, timeout=timeout) for v in services.store.list_nodes()]
    return ok("Nodes retrieved successfully", data)
