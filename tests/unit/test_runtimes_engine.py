"""Docker / Podman backends against a fake Docker Engine API on a unix socket.

The fake is ``http.server`` over ``AF_UNIX`` in a tmp dir, answering
``GET /containers/{ref}/json`` from a table the test fills in: running
(with the PID of a real child of ours), 404, not running, an API error,
garbage, a stalled answer. Every server and child is stopped at the end.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from egressd.errors import RuntimeLookupError
from egressd.runtimes import EngineApiRuntime, RuntimeSettings, backend_for, resolve_netns
from tests.unit.test_runtimes import host_sleeper, netns_sleeper

__all__ = ["host_sleeper", "netns_sleeper"]  # fixtures shared with test_runtimes


@dataclass
class Answer:
    status: int
    body: bytes
    stall: bool = False  # never answer (until the server stops)


@dataclass
class FakeEngine:
    socket_path: Path
    answers: dict[str, Answer] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)

    def running(self, ref: str, pid: int) -> None:
        state = {"Status": "running", "Running": True, "Paused": False, "Pid": pid}
        self.answers[ref] = Answer(200, json.dumps({"Id": "ab" * 32, "State": state}).encode())

    def answer(self, ref: str, status: int, body: Any, *, stall: bool = False) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.answers[ref] = Answer(status, raw, stall)


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        engine = self.server.engine
        engine.paths.append(self.path)
        parts = self.path.split("/")
        ref = parts[2] if len(parts) == 4 and parts[1] == "containers" else ""
        answer = engine.answers.get(ref) or Answer(
            404, b'{"message":"No such container: ' + ref.encode() + b'"}'
        )
        if answer.stall:
            engine.stopping.wait(10)
            return
        try:
            self.send_response(answer.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)
        except OSError:
            pass  # the client gave up

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(str(engine.socket_path), _Handler)
        self.engine = engine


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[FakeEngine]:
    fake = FakeEngine(tmp_path / "engine.sock")
    server = _Server(fake)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield fake
    finally:
        fake.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _docker(engine: FakeEngine, timeout: float = 5.0) -> EngineApiRuntime:
    return EngineApiRuntime("docker", socket_path=str(engine.socket_path), timeout=timeout)


def test_running_container_resolves_to_its_netns(engine: FakeEngine, netns_sleeper: int) -> None:
    engine.running("web-1", netns_sleeper)
    assert _docker(engine).resolve("web-1") == f"/proc/{netns_sleeper}/ns/net"
    assert engine.paths == ["/containers/web-1/json"]


def test_podman_socket_from_the_environment(
    engine: FakeEngine, netns_sleeper: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.running("0123456789ab", netns_sleeper)
    monkeypatch.setenv("EGRESSD_PODMAN_SOCKET", str(engine.socket_path))
    assert backend_for("podman").is_supported()
    assert resolve_netns("podman", "0123456789ab") == f"/proc/{netns_sleeper}/ns/net"
    settings = RuntimeSettings(docker_socket=str(engine.socket_path))
    assert resolve_netns("docker", "0123456789ab", settings) == f"/proc/{netns_sleeper}/ns/net"


def test_host_network_container_is_refused(engine: FakeEngine, host_sleeper: int) -> None:
    engine.running("hostnet", host_sleeper)  # what `docker run --network host` looks like
    with pytest.raises(RuntimeLookupError, match="host's network namespace") as err:
        _docker(engine).resolve("hostnet")
    assert "docker container 'hostnet'" in str(err.value)


def test_not_found_not_running_and_api_errors(engine: FakeEngine) -> None:
    docker = _docker(engine)
    with pytest.raises(RuntimeLookupError, match="docker container 'ghost' not found"):
        docker.resolve("ghost")
    engine.answer("stopped", 200, {"State": {"Status": "exited", "Running": False, "Pid": 0}})
    with pytest.raises(RuntimeLookupError, match=r"'stopped' is not running \(status: exited\)"):
        docker.resolve("stopped")
    engine.answer("nopid", 200, {"State": {"Status": "running", "Running": True, "Pid": 0}})
    with pytest.raises(RuntimeLookupError, match="gave no process id"):
        docker.resolve("nopid")
    engine.answer("boom", 500, {"message": "server error: disk full"})
    with pytest.raises(RuntimeLookupError, match=r"docker API error 500 .*disk full"):
        docker.resolve("boom")
    for ref, body in (
        ("garbage", b"<html>not json"),
        ("list", b"[]"),
        ("nostate", b'{"Id": "x"}'),
        ("badstate", b'{"State": "running"}'),
    ):
        engine.answer(ref, 200, body)
        with pytest.raises(RuntimeLookupError, match="unexpected answer"):
            docker.resolve(ref)
    engine.answer("huge", 200, b"x" * (5 * 1024 * 1024))
    with pytest.raises(RuntimeLookupError, match="answer too large"):
        docker.resolve("huge")


def test_stored_junk_ref_never_reaches_the_api(engine: FakeEngine) -> None:
    with pytest.raises(RuntimeLookupError, match="Invalid ref for runtime 'docker'"):
        _docker(engine).resolve("../../version")
    assert engine.paths == []


def test_missing_socket_and_dead_socket(tmp_path: Path) -> None:
    missing = EngineApiRuntime("podman", socket_path=str(tmp_path / "none.sock"), timeout=1)
    assert not missing.is_supported()
    with pytest.raises(RuntimeLookupError, match=r"podman API socket .* not found") as err:
        missing.resolve("web")
    assert "EGRESSD_PODMAN_SOCKET" in str(err.value)

    dead_path = tmp_path / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dead_path))  # the file stays, nobody listens: ECONNREFUSED
    dead = EngineApiRuntime("docker", socket_path=str(dead_path), timeout=1)
    assert dead.is_supported()
    with pytest.raises(RuntimeLookupError, match="cannot reach the docker API"):
        dead.resolve("web")

    plain = tmp_path / "plain"
    plain.write_text("")
    assert not EngineApiRuntime("docker", socket_path=str(plain), timeout=1).is_supported()


def test_stalled_api_times_out(engine: FakeEngine) -> None:
    engine.answer("slow", 200, b"{}", stall=True)
    started = time.monotonic()
    with pytest.raises(RuntimeLookupError, match=r"cannot reach the docker API.*timed out"):
        _docker(engine, timeout=0.3).resolve("slow")
    assert time.monotonic() - started < 3


def test_a_container_pid_that_is_gone(engine: FakeEngine) -> None:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=5)
    engine.running("racy", proc.pid)  # exited between the API answer and our look
    with pytest.raises(RuntimeLookupError, match="not found"):
        _docker(engine).resolve("racy")
    assert os.path.exists(engine.socket_path)
