"""Request dependencies: the service objects, the caller, the container.

Order matters and follows the spec's precedence: authentication (401), then
the id format (400), then existence (404), then ownership (403).

Concurrency: the dependencies are ``async def``, so FastAPI calls them on
the event loop instead of sending each to its thread pool (a hop costs more
than the work they do). The one that reads the store does it through
:func:`store_read`: on the loop for SQLite, in the thread pool for
PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, ParamSpec, TypeVar

from fastapi import Depends, Path, Request
from starlette.concurrency import run_in_threadpool

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


P = ParamSpec("P")
T = TypeVar("T")


async def store_read(
    services: Services, read: Callable[P, T], *args: P.args, **kwargs: P.kwargs
) -> T:
    """Run one short store read where it costs least, for both databases.

    SQLite (embedded): on the event loop. A read is one indexed SELECT in a
    local file that the page cache holds, tens of microseconds; in WAL mode
    readers never wait for writers, and the pool always has a connection
    free (``store.db``). A thread-pool hop would cost more than the read,
    and request threads would contend for the GIL with the loop.

    PostgreSQL: in the thread pool. There a query is a network round trip
    that may stall (a busy or failing-over server, a reconnect), and it must
    never stop the loop that serves every other request (and, in ``egressd
    serve``, the relay).
    """
    if services.store.reads_are_local:
        return read(*args, **kwargs)
    return await run_in_threadpool(read, *args, **kwargs)


async def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]

UNAUTHORIZED = ApiError(401, "Authentication required", headers={"WWW-Authenticate": "Bearer"})


async def get_principal(request: Request, services: ServicesDep) -> PrincipalView:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > 256:
        raise UNAUTHORIZED
    principal = await store_read(services, services.store.principal_for_token, token)
    if principal is None:
        raise UNAUTHORIZED
    return principal


PrincipalDep = Annotated[PrincipalView, Depends(get_principal)]


async def require_admin(principal: PrincipalDep) -> PrincipalView:
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


def check_access(principal: PrincipalView, container: ContainerView, *, denied: str) -> None:
    """403 ``denied`` unless the caller is an admin or owns the container."""
    if not principal.is_admin and container.owner_id != principal.id:
        raise ApiError(403, denied)


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
    check_access(principal, container, denied=denied)
    return container
