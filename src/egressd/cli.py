"""The ``egressd`` command.

Server side: ``serve`` (API + agent, one host), ``api`` and ``agent`` (many
hosts on one PostgreSQL: API replicas, one agent per host). Store side (local, under
``--data-dir``): ``token create``, ``container create``. Client side
(against the API: ``--url``/``EGRESSD_URL``, ``--token``/``EGRESSD_TOKEN``):
``net get|set|start|stop|rm``, ``container list|create --url``. Human
output by default, ``--json`` for scripts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from egressd.client import ApiError, Client

app = typer.Typer(no_args_is_help=True, add_completion=False, help="Per-container egress control.")
token_app = typer.Typer(no_args_is_help=True, help="API tokens (local store).")
container_app = typer.Typer(no_args_is_help=True, help="Container registration.")
net_app = typer.Typer(no_args_is_help=True, help="Container network (the API).")
app.add_typer(token_app, name="token")
app.add_typer(container_app, name="container")
app.add_typer(net_app, name="net")

DataDir = Annotated[Path, typer.Option("--data-dir", envvar="EGRESSD_DATA_DIR")]
Url = Annotated[str, typer.Option("--url", envvar="EGRESSD_URL")]
Token = Annotated[str | None, typer.Option("--token", envvar="EGRESSD_TOKEN")]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _settings(data_dir: Path, database_url: str | None = None) -> Any:
    from egressd.settings import Settings

    return Settings(data_dir=data_dir, database_url=database_url)


def _token(token: str | None) -> str | None:
    if token:
        return token
    default = Path(os.environ.get("EGRESSD_DATA_DIR", "./var")) / "admin-token"
    if default.exists():
        return default.read_text().strip()
    return None


def _emit(data: Any, as_json: bool, human: str | None = None) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, sort_keys=False))
    elif human is not None:
        typer.echo(human)
    elif isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict):
                typer.echo(f"{key}:")
                for k, v in value.items():
                    typer.echo(f"  {k}: {json.dumps(v) if isinstance(v, dict | list) else v}")
            else:
                typer.echo(f"{key}: {json.dumps(value) if isinstance(value, list) else value}")
    else:
        typer.echo(json.dumps(data, indent=2))


def _call(url: str, token: str | None, as_json: bool, fn: Any) -> Any:
    try:
        with Client(url, token=_token(token)) as client:
            return fn(client)
    except ApiError as exc:
        if as_json:
            body = {"statusCode": exc.status_code, "error": exc.error, "message": exc.message}
            if exc.reason:
                body["reason"] = exc.reason
            typer.echo(json.dumps(body), err=True)
        else:
            typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (OSError, httpx.TransportError) as exc:
        typer.echo(f"error: cannot reach {url}: {exc}", err=True)
        raise typer.Exit(2) from None


DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        envvar="EGRESSD_DATABASE_URL", help="e.g. postgresql+psycopg://user:pw@db/egressd"
    ),
]
Node = Annotated[
    str | None, typer.Option(envvar="EGRESSD_NODE", help="this host's node name (default: local)")
]
LogLevel = Annotated[str, typer.Option()]


def _server_settings(
    data_dir: Path,
    database_url: str | None,
    node: str | None,
    log_level: str,
    *,
    needs_postgresql: str | None = None,
) -> Any:
    """Settings of a server process, with logging set up; exits 2 on a bad setting."""
    from pydantic import ValidationError

    from egressd.settings import Settings

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    overrides: dict[str, Any] = {"data_dir": data_dir, "database_url": database_url}
    if node is not None:
        overrides["node"] = node
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        typer.echo(f"error: {problems}", err=True)
        raise typer.Exit(2) from None
    if needs_postgresql and not settings.uses_postgresql:
        typer.echo(
            f"error: egressd {needs_postgresql} needs --database-url postgresql+psycopg://... "
            "shared by every host (on one host, use `egressd serve`)",
            err=True,
        )
        raise typer.Exit(2)
    return settings


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    data_dir: DataDir = Path("./var"),
    database_url: DatabaseUrl = None,
    node: Node = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the API server and the agent in one process (needs root)."""
    from egressd.daemon import serve as run

    settings = _server_settings(data_dir, database_url, node, log_level)
    run(settings, host=host, port=port, log_level=log_level)


@app.command("api")
def api_command(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    data_dir: DataDir = Path("./var"),
    database_url: DatabaseUrl = None,
    node: Annotated[
        str | None,
        typer.Option(envvar="EGRESSD_NODE", help="node of containers registered without one"),
    ] = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the API server only, on PostgreSQL (no agent, no root needed)."""
    from egressd.daemon import run_api

    settings = _server_settings(data_dir, database_url, node, log_level, needs_postgresql="api")
    run_api(settings, host=host, port=port, log_level=log_level)


@app.command("agent")
def agent_command(
    node: Annotated[str, typer.Option(envvar="EGRESSD_NODE", help="this host's node name")],
    database_url: DatabaseUrl = None,
    data_dir: DataDir = Path("./var"),
    log_level: LogLevel = "info",
) -> None:
    """Run this host's agent only, on PostgreSQL (needs root; no HTTP)."""
    from egressd.daemon import run_agent

    settings = _server_settings(data_dir, database_url, node, log_level, needs_postgresql="agent")
    run_agent(settings)


@token_app.command("create")
def token_create(
    name: str,
    admin: Annotated[bool, typer.Option("--admin")] = False,
    data_dir: DataDir = Path("./var"),
    as_json: Json = False,
) -> None:
    """Create a token for principal NAME in the local store; prints it once."""
    from egressd.daemon import open_store

    store = open_store(_settings(data_dir))
    token = store.create_token(name, admin=admin)
    _emit({"name": name, "admin": admin, "token": token}, as_json, human=token)


@container_app.command("create")
def container_create(
    ref: Annotated[
        str,
        typer.Option(
            help="netns: namespace name; pid: process id; path: netns file path; "
            "docker/podman: container name or id"
        ),
    ],
    runtime: Annotated[str, typer.Option(help="netns | pid | path | docker | podman")] = "netns",
    id: Annotated[str | None, typer.Option("--id", help="24 hex; generated if absent")] = None,
    name: Annotated[str | None, typer.Option()] = None,
    owner: Annotated[str | None, typer.Option(help="principal name")] = None,
    node: Annotated[str | None, typer.Option(help="node (host) it lives on")] = None,
    url: Annotated[str | None, typer.Option("--url", envvar="EGRESSD_URL")] = None,
    token: Token = None,
    data_dir: DataDir = Path("./var"),
    as_json: Json = False,
) -> None:
    """Register a container: through the API with --url, else in the local store."""
    from egressd.errors import InvalidInput
    from egressd.runtimes import validate_ref

    try:
        validate_ref(runtime, ref)  # the API's rules, checked before either path
    except InvalidInput as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    if url:
        data = _call(
            url,
            token,
            as_json,
            lambda c: c.containers.create(
                ref=ref, runtime=runtime, id=id, name=name, owner=owner, node=node
            ),
        )
        _emit(data, as_json, human=None if as_json else data["id"])
        return
    from egressd.daemon import open_store
    from egressd.errors import EgressdError
    from egressd.model import parse_container_id

    try:
        cid = parse_container_id(id) if id else None
        view = open_store(_settings(data_dir)).create_container(
            container_id=cid, name=name, owner=owner, runtime=runtime, ref=ref, node=node
        )
    except EgressdError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    _emit({"id": view.id, "ref": view.ref, "owner": view.owner}, as_json, human=view.id)


@container_app.command("list")
def container_list(
    url: Url = "http://127.0.0.1:8080", token: Token = None, as_json: Json = False
) -> None:
    """List the containers you may see."""
    data = _call(url, token, as_json, lambda c: c.containers.list())
    if as_json:
        _emit(data, True)
        return
    for item in data:
        typer.echo(
            f"{item['id']}  {item['ref']:<20} owner={item['owner'] or '-'}  {item['name'] or ''}"
        )


@net_app.command("get")
def net_get(
    container_id: str,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Show a container's network configuration and status."""
    _emit(
        _call(url, token, as_json, lambda c: c.containers.get_network_config(id=container_id)),
        as_json,
    )


@net_app.command("set")
def net_set(
    container_id: str,
    type: Annotated[str, typer.Option("--type", help="socks5 | http | https | block")],
    proxy: Annotated[str | None, typer.Option(help="e.g. socks5://user:pass@host:1080")] = None,
    country: Annotated[str | None, typer.Option()] = None,
    city: Annotated[str | None, typer.Option()] = None,
    region: Annotated[str | None, typer.Option()] = None,
    comment: Annotated[str | None, typer.Option()] = None,
    dns: Annotated[list[str] | None, typer.Option("--dns", help="repeat for several")] = None,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Configure (PATCH) a container's network."""
    body: dict[str, Any] = {"type": type}
    for key, value in (
        ("proxy", proxy),
        ("country", country),
        ("city", city),
        ("region", region),
        ("comment", comment),
        ("dns_servers", dns),
    ):
        if value:
            body[key] = value
    data = _call(
        url,
        token,
        as_json,
        lambda c: c.containers.update_network_config(id=container_id, data=body),
    )
    _emit(data, as_json)


@net_app.command("start")
def net_start(
    container_id: str,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Start enforcement (proxy or block)."""
    _emit(
        _call(url, token, as_json, lambda c: c.containers.start_network(id=container_id)), as_json
    )


@net_app.command("stop")
def net_stop(
    container_id: str,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Stop enforcement; the configuration is kept."""
    _emit(_call(url, token, as_json, lambda c: c.containers.stop_network(id=container_id)), as_json)


@net_app.command("rm")
def net_rm(
    container_id: str,
    url: Url = "http://127.0.0.1:8080",
    token: Token = None,
    as_json: Json = False,
) -> None:
    """Remove the configuration (enforcement removed first)."""
    _call(url, token, as_json, lambda c: c.containers.remove_network_config(id=container_id))
    _emit({"removed": container_id}, as_json, human=None if as_json else f"removed {container_id}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
