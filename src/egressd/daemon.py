"""Wiring of the server processes: ``serve`` (API + agent), ``api``, ``agent``.

* ``serve``: uvicorn's event loop (uvloop) runs the API and the relay; the agent's
  reconciler and heartbeat run in their own threads. SQLite by default.
* ``api``: the API only (no root, no kernel), on PostgreSQL, any number of
  replicas.
* ``agent``: one per host (root): relay, reconciler and heartbeat, no HTTP.
  ``uvloop.run`` owns the relay's loop; SIGTERM/SIGINT stop it gracefully:
  listeners close, kernel walls stay (a stop of the agent is not a stop of
  the containers' enforcement, so their traffic fails closed meanwhile).

API handlers that write run in FastAPI's thread pool; reads of an embedded
SQLite store run on the loop (``api.deps.store_read``). The agent's
reconciler thread reaches the relay through the loop (see
``agent.runner``). Because the loop shares the GIL with that thread, the
interpreter's switch interval is lowered (:data:`SWITCH_INTERVAL_S`). Wake-ups between
them are in-process on SQLite and LISTEN/NOTIFY on PostgreSQL
(``store.wakeups``).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import uvicorn
import uvloop
from fastapi import FastAPI
from sqlalchemy.engine import make_url

from egressd import __version__
from egressd.api import Services, create_app
from egressd.settings import Settings
from egressd.store import Store, make_engine, migrate
from egressd.store.wakeups import Wakeups, wakeups_for

log = logging.getLogger(__name__)
ADMIN_TOKEN_FILE = "admin-token"  # noqa: S105 - a file name
# The event loop (API, relay) gives up the GIL at every system call and then
# waits for the reconciler thread to hand it back, which Python does only
# every switch interval (5 ms by default) while that thread computes: with a
# busy thread beside it, a loop that needs the GIL back thousands of times a
# second crawls (a GET benchmark beside a CPU-bound thread: ~40 req/s at 5 ms,
# ~200 at 1 ms, ~560 at 0.2 ms).
SWITCH_INTERVAL_S = 0.0002


def _favour_the_loop() -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)


def _settle_heap() -> None:
    """Take what start-up built out of the cyclic garbage collector's sight.

    A full (generation 2) collection walks every tracked object, and after
    start-up that is ~125k of them (modules, classes, functions, SQLAlchemy's
    and FastAPI's structures): ~50 ms during which the event loop -- the API
    and every relayed connection -- stands still, whenever the collector
    decides to run one under load. ``gc.freeze`` moves them to a permanent
    generation that collections skip (they are still freed by reference
    counting); what the daemon allocates afterwards is collected as usual.
    """
    gc.collect()
    gc.freeze()


def redacted_url(url: str) -> str:
    """The database URL for logs: no password, neither in userinfo nor in the query."""
    parsed = make_url(url)
    if "password" in parsed.query:
        parsed = parsed.update_query_dict({"password": "***"})
    return parsed.render_as_string(hide_password=True)


def open_store(settings: Settings) -> Store:
    """Connect, bring the schema up to date, and return the store."""
    url = settings.effective_database_url
    if not settings.uses_postgresql:
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    engine = make_engine(url)
    log.info("store: %s", redacted_url(url))
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
    settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path: Path = settings.data_dir / ADMIN_TOKEN_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return token


@asynccontextmanager
async def running_agent(settings: Settings, store: Store, wakeups: Wakeups) -> AsyncIterator[None]:
    """Relay, reconciler and heartbeat of ``settings.node`` on the running loop.

    On exit the heartbeat and the reconciler stop and the relay's listeners
    close; kernel state is left as it is (fail closed).
    """
    from egressd.agent.adapters import KernelDataplane, RelayAdapter
    from egressd.agent.heartbeat import Heartbeat
    from egressd.agent.runner import Agent
    from egressd.relay import Relay

    tls = settings.upstream_ssl_context()
    relay = Relay(
        connect_timeout=settings.upstream_timeout,
        ssl_context=tls,
        socks5_pipelining=settings.socks5_pipelining,
    )
    agent = Agent(
        settings=settings,
        store=store,
        wakeups=wakeups,
        dataplane=KernelDataplane(),
        relay=RelayAdapter(relay, ssl_context=tls),
        loop=asyncio.get_running_loop(),
    )
    heartbeat = Heartbeat(
        store, node=settings.node, interval=settings.heartbeat_interval, version=__version__
    )
    try:
        agent.start()
        await asyncio.to_thread(heartbeat.start)
        yield
    finally:
        await asyncio.to_thread(heartbeat.stop)
        await asyncio.to_thread(agent.stop)
        await relay.close()


def build_app(
    settings: Settings, store: Store, *, wakeups: Wakeups | None = None, with_agent: bool = True
) -> FastAPI:
    """The API app; with ``with_agent`` its lifespan also runs this node's agent.

    Wake-ups passed in belong to the caller; without, they are made here (by
    database) and started and closed with the app.
    """
    owned = wakeups is None
    wakeups = wakeups or wakeups_for(
        store.engine, agent_node=settings.node if with_agent else None, observe=True
    )
    services = Services(settings=settings, store=store, wakeups=wakeups)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with AsyncExitStack() as stack:
            if owned:
                await asyncio.to_thread(wakeups.start)
                stack.push_async_callback(asyncio.to_thread, wakeups.close)
            if with_agent:
                await stack.enter_async_context(running_agent(settings, store, wakeups))
            yield

    return create_app(services, lifespan=lifespan)


def _announce_token(settings: Settings, store: Store) -> None:
    token = ensure_admin_token(settings, store)
    if token is not None:
        print(f"egressd: admin token (shown once, also in {settings.data_dir / ADMIN_TOKEN_FILE}):")
        print(token, flush=True)


def _run_uvicorn(app: FastAPI, *, host: str, port: int, log_level: str) -> None:
    # uvloop: the relay's data path runs as callbacks on this loop, and asyncio's own
    # loop (pure Python per wake-up) measurably adds to the relay's CPU per connection.
    # httptools, named rather than "auto": a venv without it would silently parse HTTP
    # in pure Python (h11), ~30% fewer API requests/s on the same loop.
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http="httptools",
        log_level=log_level,
        access_log=False,
    )
    uvicorn.Server(config).run()


def serve(settings: Settings, *, host: str, port: int, log_level: str = "info") -> None:
    """API and the agent of ``settings.node`` in one process (root)."""
    _favour_the_loop()
    store = open_store(settings)
    _announce_token(settings, store)
    app = build_app(settings, store)
    _settle_heap()
    _run_uvicorn(app, host=host, port=port, log_level=log_level)


def run_api(settings: Settings, *, host: str, port: int, log_level: str = "info") -> None:
    """The API alone: no agent, no kernel access, no root."""
    store = open_store(settings)
    _announce_token(settings, store)
    app = build_app(settings, store, with_agent=False)
    _settle_heap()
    _run_uvicorn(app, host=host, port=port, log_level=log_level)


def run_agent(settings: Settings) -> None:
    """The agent of ``settings.node`` alone, until SIGTERM or SIGINT (root)."""
    _favour_the_loop()
    store = open_store(settings)
    wakeups = wakeups_for(store.engine, agent_node=settings.node, observe=False)
    _settle_heap()
    try:
        uvloop.run(_agent_main(settings, store, wakeups))
    finally:
        store.engine.dispose()


async def _agent_main(settings: Settings, store: Store, wakeups: Wakeups) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await asyncio.to_thread(wakeups.start)
    try:
        async with running_agent(settings, store, wakeups):
            log.info("agent of node %s running", settings.node)
            await stopping.wait()
            log.info("agent of node %s stopping; kernel state stays", settings.node)
    finally:
        await asyncio.to_thread(wakeups.close)
