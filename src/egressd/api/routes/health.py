"""Liveness: the API answers and the store is reachable."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from egressd.api.deps import ServicesDep
from egressd.api.envelopes import error_response, ok

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Health check")
def healthz(services: ServicesDep) -> JSONResponse:
    try:
        services.store.has_admin()
    except Exception:
        return error_response(503, "Store unreachable")
    return ok("ok", {"node": services.settings.node})
