"""CLI commands that work on the local store (no server, no root)."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from egressd.cli import app
from egressd.daemon import open_store
from egressd.settings import Settings

runner = CliRunner()


def test_token_and_container_create_in_local_store(tmp_path: Path) -> None:
    r = runner.invoke(app, ["token", "create", "alice", "--data-dir", str(tmp_path), "--json"])
    assert r.exit_code == 0, r.output
    token = json.loads(r.output)["token"]
    assert token.startswith("egd_")

    r = runner.invoke(
        app,
        [
            "container",
            "create",
            "--ref",
            "ns1",
            "--owner",
            "alice",
            "--id",
            "507f1f77bcf86cd799439012",
            "--data-dir",
            str(tmp_path),
        ],
    )
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "507f1f77bcf86cd799439012"

    store = open_store(Settings(data_dir=tmp_path))
    principal = store.principal_for_token(token)
    assert principal is not None and principal.name == "alice" and not principal.is_admin
    assert store.get_container("507f1f77bcf86cd799439012").owner == "alice"
    store.engine.dispose()


def test_container_create_rejects_bad_input(tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["container", "create", "--ref", "ns1", "--id", "nothex", "--data-dir", str(tmp_path)]
    )
    assert r.exit_code == 1
    assert "Invalid container ID format" in r.output
    r = runner.invoke(
        app,
        ["container", "create", "--ref", "ns1", "--owner", "nobody", "--data-dir", str(tmp_path)],
    )
    assert r.exit_code == 1
    assert "Unknown owner 'nobody'" in r.output


def test_net_commands_report_unreachable_server(tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        ["net", "get", "507f1f77bcf86cd799439012", "--url", "http://127.0.0.1:9", "--token", "x"],
    )
    assert r.exit_code == 2
    assert "cannot reach" in r.output


def test_container_create_on_another_node(tmp_path: Path) -> None:
    r = runner.invoke(
        app, ["container", "create", "--ref", "ns9", "--node", "b", "--data-dir", str(tmp_path)]
    )
    assert r.exit_code == 0, r.output
    store = open_store(Settings(data_dir=tmp_path))
    assert store.get_container(r.output.strip()).node == "b"
    store.engine.dispose()
