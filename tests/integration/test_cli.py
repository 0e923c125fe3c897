"""The egressd command against a real server: human and --json output."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration.egressd_proc import EGRESSD, DirectContainer, EgressdServer
from tests.integration.peers import UpstreamWorld


@pytest.fixture
def server() -> Iterator[EgressdServer]:
    with EgressdServer() as srv:
        yield srv


def cli(server: EgressdServer, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"EGRESSD_URL": server.url, "EGRESSD_TOKEN": server.token, "PATH": "/usr/bin:/bin"}
    return subprocess.run([EGRESSD, *args], capture_output=True, text=True, env=env, timeout=60)


def test_cli_block_lifecycle(server: EgressdServer, upstream_world: UpstreamWorld) -> None:
    with DirectContainer(upstream_world) as container:
        r = cli(server, "container", "create", "--ref", container.ns.name, "--url", server.url)
        assert r.returncode == 0, r.stderr
        cid = r.stdout.strip()

        r = cli(
            server, "net", "set", cid, "--type", "block", "--comment", "cli", "--dns", "198.18.0.53"
        )
        assert r.returncode == 0, r.stderr
        assert "type: block" in r.stdout and "comment: cli" in r.stdout

        r = cli(server, "net", "start", cid, "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["status"] == "running"
        assert container.curl(f"http://{upstream_world.remote_ip}/").returncode != 0

        got = json.loads(cli(server, "net", "get", cid, "--json").stdout)
        assert got["status"] == "running" and got["dns_servers"] == ["198.18.0.53"]

        assert json.loads(cli(server, "net", "stop", cid, "--json").stdout)["status"] == "stopped"
        assert cli(server, "net", "rm", cid).returncode == 0

        r = cli(server, "net", "start", cid, "--json")
        assert r.returncode == 1
        assert json.loads(r.stderr) == {
            "statusCode": 400,
            "error": "Bad Request",
            "message": "Network not configured for this container",
        }

        r = cli(server, "net", "get", cid, "--token", "bogus")
        assert r.returncode == 1 and "401 Unauthorized: Authentication required" in r.stderr
