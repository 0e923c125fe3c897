"""Response envelopes of the spec and the mapping from our error tree.

Success: ``{statusCode, message, data?}``. Error: ``{statusCode, error,
message}`` (plus ``reason`` when we know why an operation failed). Every
error the API can produce, FastAPI's own included, leaves through here.
"""

from __future__ import annotations

from datetime import datetime
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from egressd import errors
from egressd.model import format_timestamp


class ApiError(Exception):
    """An error response with the exact message the spec prescribes."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        reason: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.reason = reason
        self.headers = headers


def iso(ts: datetime | None) -> str | None:
    """``2025-01-15T10:00:00.000Z``, as in the spec."""
    return None if ts is None else format_timestamp(ts)


def ok(message: str, data: Any = None, *, status_code: int = 200) -> JSONResponse:
    body: dict[str, Any] = {"statusCode": status_code, "message": message}
    if data is not None:
        body["data"] = data
    return JSONResponse(body, status_code=status_code)


def error_response(
    status_code: int,
    message: str,
    *,
    reason: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body: dict[str, Any] = {
        "statusCode": status_code,
        "error": HTTPStatus(status_code).phrase,
        "message": message,
    }
    if reason:
        body["reason"] = reason
    return JSONResponse(body, status_code=status_code, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    errs = exc.errors()
    if not errs:
        return "Invalid request"
    err = errs[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body",)]
    field = ".".join(loc)
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return f"Unknown field '{field}'"
    if kind == "missing":
        return f"Field '{field}' is required"
    if kind in ("json_invalid", "model_attributes_type", "dict_type") or not field:
        return "Request body must be a JSON object"
    if field == "type" and kind == "literal_error":
        return "Field 'type' must be one of: socks5, http, https, block"
    msg = str(err.get("msg", "is invalid"))
    return f"Field '{field}': {msg}"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status_code, exc.message, reason=exc.reason, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, _validation_message(exc))

    @app.exception_handler(errors.InvalidInput)
    async def _invalid(_: Request, exc: errors.InvalidInput) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(errors.Conflict)
    async def _conflict(_: Request, exc: errors.Conflict) -> JSONResponse:
        return error_response(409, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
        headers = dict(exc.headers) if exc.headers else None
        return error_response(exc.status_code, message, headers=headers)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, "Internal server error")
