"""``egressd api`` / ``egressd agent`` refuse what cannot work, before touching anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from egressd.cli import app
from egressd.settings import Settings

runner = CliRunner()


@pytest.mark.parametrize(
    "argv",
    [
        ["api"],
        ["api", "--database-url", "sqlite:///x.db"],
        ["agent", "--node", "a"],
        ["agent", "--node", "a", "--database-url", "sqlite:///x.db"],
    ],
)
def test_split_roles_need_postgresql(
    argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EGRESSD_DATABASE_URL", raising=False)
    r = runner.invoke(app, [*argv, "--data-dir", str(tmp_path / "var")])
    assert r.exit_code == 2, r.output
    assert "needs --database-url postgresql" in r.output
    assert not (tmp_path / "var").exists()  # nothing created


def test_agent_needs_a_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EGRESSD_NODE", raising=False)
    r = runner.invoke(app, ["agent", "--database-url", "postgresql+psycopg://u@127.0.0.1:1/d"])
    assert r.exit_code == 2
    assert "--node" in r.output


@pytest.mark.parametrize("command", ["agent", "serve"])
def test_node_name_is_validated(command: str, tmp_path: Path) -> None:
    r = runner.invoke(
        app,
        [command, "--node", "*", "--database-url", "postgresql+psycopg://u@127.0.0.1:1/d"],
    )
    assert r.exit_code == 2, r.output
    assert "node" in r.output and "pattern" in r.output


def test_settings_defaults_for_heartbeats() -> None:
    s = Settings()
    assert (s.heartbeat_interval, s.effective_node_timeout) == (5.0, 15.0)
    assert Settings(heartbeat_interval=1).effective_node_timeout == 3.0
    assert Settings(heartbeat_interval=1, node_timeout=7).effective_node_timeout == 7.0
    assert not s.uses_postgresql
    assert Settings(database_url="postgresql+psycopg://u@h/d").uses_postgresql


def test_logged_database_url_has_no_password() -> None:
    from egressd.daemon import redacted_url

    shown = redacted_url("postgresql+psycopg://u:pw-1@db:5432/e?host=/run/pg&password=pw-2")
    assert "pw-1" not in shown and "pw-2" not in shown
    assert shown.startswith("postgresql+psycopg://u:***@db:5432/e?")
