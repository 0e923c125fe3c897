"""API tokens (admin). A token is shown once, in the creation answer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from egressd.api.deps import AdminDep, ServicesDep
from egressd.api.envelopes import ok
from egressd.api.schemas import TokenCreate

router = APIRouter(prefix="/api/v1/auth", tags=["auth"])


@router.post("/tokens", summary="Create an API token (admin)", status_code=201)
def create_token(body: TokenCreate, _: AdminDep, services: ServicesDep) -> JSONResponse:
    token = services.store.create_token(body.name, admin=body.admin)
    principal = services.store.ensure_principal(body.name)
    data = {"name": principal.name, "admin": principal.is_admin, "token": token}
    return ok("Token created successfully", data, status_code=201)
