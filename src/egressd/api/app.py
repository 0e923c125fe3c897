"""The FastAPI application factory. Services are passed in, never global."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import FastAPI

from egressd import __version__
from egressd.api.deps import Services
from egressd.api.envelopes import error_response, install_error_handlers
from egressd.api.routes import containers, health, network, nodes, tokens

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, before parsing them."""

    def __init__(self, app: ASGIApp, *, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await self._too_large(scope, receive, send)
                return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"Request body larger than {self.limit} bytes")
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


def create_app(services: Services, *, lifespan: Lifespan | None = None) -> FastAPI:
    app = FastAPI(
        lifespan=lifespan,
        title="egressd",
        version=__version__,
        description="Container Network API: per-container egress through a proxy, or none.",
    )
    app.state.services = services
    install_error_handlers(app)
    for module in (network, containers, nodes, tokens, health):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, limit=services.settings.max_body_bytes)
    return app
