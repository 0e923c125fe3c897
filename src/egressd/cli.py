"""The ``egressd`` command.

Server side: ``serve`` (API + agent). Store side (local, under
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


@app.command()
def serve(
    host: Annotated[str, typer.Option()] = "127.0.0.1",
    port: Annotated[int, typer.Option()] = 8080,
    data_dir: DataDir = Path("./var"),
    database_url: Annotated[str | None, typer.Option(envvar="EGRESSD_DATABASE_URL")] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Run the API server and the agent in one process (needs root)."""
    from egressd.daemon import serve as run

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run(_settings(data_dir, database_url), host=host, port=port, log_level=log_level)


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
    ref: Annotated[str, typer.Option(help="network namespace name")],
    runtime: Annotated[str, typer.Option()] = "netns",
    id: Annotated[str | None, typer.Option("--id", help="24 hex; generated if absent")] = None,
    name: Annotated[str | None, typer.Option()] = None,
    owner: Annotated[str | None, typer.Option(help="principal name")] = None,
    url: Annotated[str | None, typer.Option("--url", envvar="EGRESSD_URL")] = None,
    token: Token = None,
    data_dir: DataDir = Path("./var"),
    as_json: Json = False,
) -> None:
    """Register a container: through the API with --url, else in the local store."""
    if url:
        data = _call(
            url,
            token,
            as_json,
            lambda c: c.containers.create(ref=ref, runtime=runtime, id=id, name=name, owner=owner),
        )
        _emit(data, as_json, human=None if as_json else data["id"])
        return
    from egressd.daemon import open_store
    from egressd.errors import EgressdError
    from egressd.model import parse_container_id
    from egressd.runtimes import NETNS_NAME_RE

    try:
        cid = parse_container_id(id) if id else None
        if runtime != "netns" or not NETNS_NAME_RE.match(ref):
            raise typer.BadParameter("runtime must be 'netns' and ref a namespace name")
        view = open_store(_settings(data_dir)).create_container(
            container_id=cid, name=name, owner=owner, runtime=runtime, ref=ref
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
