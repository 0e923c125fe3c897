"""Container registration (admin) and listing (what the caller may see)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from egressd.api import presenters
from egressd.api.deps import (
    AdminDep,
    ContainerIdPath,
    PrincipalDep,
    ServicesDep,
    checked_id,
    store_read,
    visible_container,
)
from egressd.api.envelopes import ApiError, ok
from egressd.api.routes.network import remove_network
from egressd.api.schemas import ContainerCreate
from egressd.errors import Conflict
from egressd.runtimes import validate_ref

router = APIRouter(prefix="/api/v1/containers", tags=["containers"])


@router.post("", summary="Register a container (admin)", status_code=201)
def create_container(body: ContainerCreate, _: AdminDep, services: ServicesDep) -> JSONResponse:
    cid = checked_id(body.id) if body.id is not None else None
    validate_ref(body.runtime, body.ref)  # InvalidInput: 400 "Invalid ref for runtime ..."
    try:
        view = services.store.create_container(
            container_id=cid,
            name=body.name,
            owner=body.owner,
            runtime=body.runtime,
            ref=body.ref,
            node=body.node,
        )
    except Conflict:
        raise ApiError(409, "Container already exists") from None
    return ok("Container created successfully", presenters.container(view), status_code=201)


@router.get("", summary="List the containers the caller may see")
def list_containers(principal: PrincipalDep, services: ServicesDep) -> JSONResponse:
    owner = None if principal.is_admin else principal.id
    views = services.store.list_containers(owner_id=owner)
    return ok("Containers retrieved successfully", [presenters.container(v) for v in views])


@router.get("/{container_id}", summary="Get a container")
async def get_container(
    container_id: ContainerIdPath, principal: PrincipalDep, services: ServicesDep
) -> JSONResponse:
    view = await store_read(
        services,
        visible_container,
        services,
        principal,
        container_id,
        denied="Access denied to this container",
    )
    return ok("Container retrieved successfully", presenters.container(view))


@router.delete(
    "/{container_id}", summary="Delete a container and its network configuration (admin)"
)
def delete_container(
    container_id: ContainerIdPath, admin: AdminDep, services: ServicesDep
) -> JSONResponse:
    visible_container(services, admin, container_id, denied="Access denied to this container")
    if services.store.get_network(container_id).desired is not None:
        remove_network(services, container_id)
    services.store.delete_container(container_id)
    return ok("Container deleted successfully")
