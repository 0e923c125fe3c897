"""Request dependencies: the service objects, the caller, the container.

Order matters and follows the spec's precedence: authentication (401), then
the id format (400), then existence (404), then ownership (403).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Path, Request

from egressd.api.envelopes import ApiError
from egressd.errors import InvalidInput, NotFound
from egressd.model import parse_container_id
from egressd.settings import Settings
from egressd.store import ContainerView, PrincipalView, Store
from egressd.store.wakeups import Wakeups


@dataclass(frozen=True)
class Services:
    settings: Settings
    store: Store
    wakeups: Wakeups


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

UNAUTHORIZED = ApiError(401, "Authentication required", headers={"WWW-Authenticate": "Bearer"})


def get_principal(request: Request, services: ServicesDep) -> PrincipalView:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 256:
        raise UNAUTHORIZED
    principal = services.store.principal_for_token(token)
    if principal is None:
        raise UNAUTHORIZED
    return principal


PrincipalDep = Annotated[PrincipalView, Depends(get_principal)]


def require_admin(principal: PrincipalDep) -> PrincipalView:
    if not principal.is_admin:
        raise ApiError(403, "Admin privileges required")
    return principal


AdminDep = Annotated[PrincipalView, Depends(require_admin)]

ContainerIdPath = Annotated[
    str, Path(description="24-hex container id", examples=["507f1f77bcf86cd799439012"])
]


def checked_id(container_id: str) -> str:
    try:
        return parse_container_id(container_id)
    except InvalidInput as exc:
        raise ApiError(400, str(exc)) from None


def visible_container(
    services: Services,
    principal: PrincipalView,
    container_id: str,
    *,
    denied: str,
    not_found: str = "Container not found",
) -> ContainerView:
    """The container, if it exists (404) and the caller may act on it (403)."""
    try:
        container = services.store.get_container(checked_id(container_id))
    except NotFound:
        raise ApiError(404, not_found) from None
    if not principal.is_admin and container.owner_id != principal.id:
        raise ApiError(403, denied)
    return container
