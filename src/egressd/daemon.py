"""Wiring of ``egressd serve``: store, API, relay and agent in one process.

Concurrency model: uvicorn's asyncio loop runs the API and the relay; the
agent's reconciler runs in its own thread and reaches the relay through the
loop (see ``agent.runner``). API handlers run in FastAPI's thread pool.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from egressd.api import Services, create_app
from egressd.settings import Settings
from egressd.store import Store, make_engine, migrate
from egressd.store.wakeups import Wakeups

log = logging.getLogger(__name__)
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name


def open_store(settings: Settings) -> Store:
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(settings.effective_database_url)
    migrate(engine)
    db_file = settings.data_dir / "egressd.db"
    if db_file.exists():
        os.chmod(db_file, 0o600)  # proxy credentials live in it
    return Store(engine, node=settings.node)


def ensure_admin_token(settings: Settings, store: Store) -> str | None:
    """On first start: create an admin token, write it 0600; return it (else None)."""
    if store.has_admin():
        return None
    token = store.create_token("admin", admin=True)
    path: Path = settings.data_dir / ADMIN_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


def build_app(
    settings: Settings, store: Store, *, wakeups: Wakeups | None = None, with_agent: bool = True
) -> FastAPI:
    wakeups = wakeups or Wakeups()
    services = Services(settings=settings, store=store, wakeups=wakeups)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not with_agent:
            yield
            return
        from egressd.agent.adapters import KernelDataplane, RelayAdapter
        from egressd.agent.runner import Agent
        from egressd.relay import Relay

        tls = settings.upstream_ssl_context()
        relay = Relay(connect_timeout=settings.upstream_timeout, ssl_context=tls)
        agent = Agent(
            settings=settings,
            store=store,
            wakeups=wakeups,
            dataplane=KernelDataplane(),
            relay=RelayAdapter(relay, ssl_context=tls),
            loop=asyncio.get_running_loop(),
        )
        agent.start()
        try:
            yield
        finally:
            # Not a stop: listeners close, kernel walls stay (fail closed).
            await asyncio.to_thread(agent.stop)
            await relay.close()

    return create_app(services, lifespan=lifespan)


def serve(settings: Settings, *, host: str, port: int, log_level: str = "info") -> None:
    store = open_store(settings)
    token = ensure_admin_token(settings, store)
    if token is not None:
        print(f"egressd: admin token (shown once, also in {settings.data_dir / ADMIN_TOKEN_FILE}):")
        print(token, flush=True)
    app = build_app(settings, store)
    config = uvicorn.Config(
        app, host=host, port=port, loop="asyncio", log_level=log_level, access_log=False
    )
    uvicorn.Server(config).run()
