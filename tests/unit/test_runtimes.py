"""Runtimes: ref validation at the edge (API, CLI) and the netns / pid / path backends.

The backends run against real ``/proc`` entries of this test's own children:
a ``sleep`` in our network namespace (must be refused as the host's) and a
``sleep`` in a namespace of its own (``unshare``; as root, or through a user
namespace without root). Every child is killed by PID at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from egressd.cli import app
from egressd.errors import InvalidInput, RuntimeLookupError
from egressd.runtimes import (
    SUPPORTED_RUNTIMES,
    NamedNetnsRuntime,
    PathRuntime,
    PidRuntime,
    RuntimeSettings,
    backend_for,
    ref_problem,
    resolve_netns,
    validate_ref,
)
from tests.unit.conftest import Api

HEX64 = "a" * 64

VALID = [
    ("netns", "ns1"),
    ("netns", "_a.b-c"),
    ("netns", "x" * 64),
    ("pid", "2"),
    ("pid", "4194304"),
    ("path", "/var/run/netns/cni-1234"),
    ("path", "/proc/123/ns/net"),
    ("path", "/" + "a" * 255),
    ("docker", "web-1"),
    ("docker", "a"),
    ("docker", "My_app.2"),
    ("docker", "x" * 128),
    ("docker", "0123456789ab"),
    ("docker", HEX64),
    ("podman", "egt-pod"),
]

INVALID = [
    ("netns", "../etc", "network namespace name"),
    ("netns", "..", "network namespace name"),
    ("netns", "a/b", "network namespace name"),
    ("netns", "x" * 65, "network namespace name"),
    ("netns", "-a", "network namespace name"),
    ("netns", "ns1\n", "network namespace name"),
    ("pid", "1", "between 2 and 4194304"),
    ("pid", "0", "between 2 and 4194304"),
    ("pid", "4194305", "between 2 and 4194304"),
    ("pid", "012", "between 2 and 4194304"),
    ("pid", "-5", "between 2 and 4194304"),
    ("pid", "12a", "between 2 and 4194304"),
    ("pid", " 12", "between 2 and 4194304"),
    ("pid", "12\n", "between 2 and 4194304"),
    ("path", "run/netns/x", "absolute"),
    ("path", "/run/netns/../../etc/x", "'..'"),
    ("path", "/run/./netns/x", "normalized"),
    ("path", "//run/netns/x", "normalized"),
    ("path", "/run//netns/x", "normalized"),
    ("path", "/run/netns/", "normalized"),
    ("path", "/", "normalized"),
    ("path", "/run/netns/a b", "only letters"),
    ("path", "/run/netns/x\n", "only letters"),
    ("path", "/" + "a" * 256, "at most 256"),
    ("docker", "-web", "container name"),
    ("docker", "web/1", "container name"),
    ("docker", "x" * 129, "container name"),
    ("docker", "a b", "container name"),
    ("podman", "../x", "container name"),
    ("podman", "web?all=1", "container name"),
    ("podman", "web\n", "container name"),
]


@pytest.mark.parametrize(("runtime", "ref"), VALID)
def test_valid_refs(runtime: str, ref: str) -> None:
    assert ref_problem(runtime, ref) is None
    assert validate_ref(runtime, ref) == ref


@pytest.mark.parametrize(("runtime", "ref", "needle"), INVALID)
def test_invalid_refs(runtime: str, ref: str, needle: str) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_ref(runtime, ref)
    assert str(err.value).startswith(f"Invalid ref for runtime '{runtime}': ")
    assert needle in str(err.value)


def test_unknown_runtime() -> None:
    with pytest.raises(InvalidInput, match="Unsupported runtime 'lxc'"):
        validate_ref("lxc", "x")
    with pytest.raises(RuntimeLookupError, match="unsupported container runtime 'lxc'"):
        resolve_netns("lxc", "x")
    assert set(SUPPORTED_RUNTIMES) == {"netns", "pid", "path", "docker", "podman"}


# --------------------------------------------------------------------------- API and CLI edge


@pytest.mark.parametrize(("runtime", "ref"), [v for v in VALID if len(v[1]) <= 256])
def test_api_registers_each_runtime(api_no_agent: Api, runtime: str, ref: str) -> None:
    api = api_no_agent
    body = {"runtime": runtime, "ref": ref}
    r = api.client.post("/api/v1/containers", json=body, headers=api.h(api.admin))
    assert r.status_code == 201, r.text
    got = r.json()["data"]
    assert got["runtime"] == runtime and got["ref"] == ref


@pytest.mark.parametrize(("runtime", "ref", "needle"), [i for i in INVALID if len(i[1]) <= 256])
def test_api_refuses_bad_refs(api_no_agent: Api, runtime: str, ref: str, needle: str) -> None:
    api = api_no_agent
    body = {"runtime": runtime, "ref": ref}
    r = api.client.post("/api/v1/containers", json=body, headers=api.h(api.admin))
    assert r.status_code == 400, r.text
    envelope = r.json()
    assert envelope["statusCode"] == 400 and envelope["error"] == "Bad Request"
    assert envelope["message"].startswith(f"Invalid ref for runtime '{runtime}': ")
    assert needle in envelope["message"]


def test_api_refuses_unknown_runtime(api_no_agent: Api) -> None:
    api = api_no_agent
    body = {"runtime": "lxc", "ref": "x"}
    r = api.client.post("/api/v1/containers", json=body, headers=api.h(api.admin))
    assert r.status_code == 400
    assert r.json()["message"].startswith("Field 'runtime'")


def _cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["container", "create", *args])
    return result.exit_code, result.output


def test_cli_store_path_validates_per_runtime(tmp_path: Path) -> None:
    data = ["--data-dir", str(tmp_path), "--json"]
    code, out = _cli("--runtime", "pid", "--ref", "1", *data)
    assert code == 1 and "Invalid ref for runtime 'pid': " in out
    code, out = _cli("--runtime", "path", "--ref", "/run/../x", *data)
    assert code == 1 and "Invalid ref for runtime 'path': " in out
    code, out = _cli("--runtime", "lxc", "--ref", "x", *data)
    assert code == 1 and "Unsupported runtime 'lxc'" in out
    for runtime, ref in (("pid", "4242"), ("podman", "web-1"), ("path", "/proc/7/ns/net")):
        code, out = _cli("--runtime", runtime, "--ref", ref, *data)
        assert code == 0, out
        assert json.loads(out)["ref"] == ref


def test_cli_url_path_validates_before_calling(tmp_path: Path) -> None:
    # Nothing listens on the discard port: exit 1 (validation), not 2 (unreachable).
    url = ["--url", "http://127.0.0.1:9", "--token", "t"]
    code, out = _cli("--runtime", "docker", "--ref", "web/../x", *url)
    assert code == 1 and "Invalid ref for runtime 'docker': " in out
    code, _ = _cli("--runtime", "docker", "--ref", "web", *url)
    assert code == 2


# --------------------------------------------------------------------------- local backends


def _netns_inode(pid: int) -> int:
    return os.stat(f"/proc/{pid}/ns/net").st_ino


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=5)


@pytest.fixture
def host_sleeper() -> Iterator[int]:
    """A child in our own network namespace (the host's, as far as egressd is concerned)."""
    proc = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        yield proc.pid
    finally:
        _kill(proc)


@pytest.fixture
def netns_sleeper() -> Iterator[int]:
    """A child in a network namespace of its own: ``unshare -n`` (root) or ``-rn`` (userns)."""
    flags = "-n" if os.geteuid() == 0 else "-rn"
    proc = subprocess.Popen(
        ["unshare", flags, "sleep", "60"], stdin=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        ours = _netns_inode(os.getpid())
        for _ in range(200):  # until unshare(2) has run and exec'd sleep
            if proc.poll() is not None:
                assert proc.stderr is not None
                pytest.skip(f"unshare {flags} failed: {proc.stderr.read().decode().strip()}")
            try:
                if _netns_inode(proc.pid) != ours:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        else:
            pytest.fail("the unshared child never left our network namespace")
        yield proc.pid
    finally:
        _kill(proc)
        if proc.stderr is not None:
            proc.stderr.close()


def _gone_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=5)
    return proc.pid


def test_pid_runtime_resolves_a_process_in_its_own_netns(netns_sleeper: int) -> None:
    path = PidRuntime().resolve(str(netns_sleeper))
    assert path == f"/proc/{netns_sleeper}/ns/net"
    assert resolve_netns("pid", str(netns_sleeper)) == path


def test_pid_runtime_refuses_the_host_netns(host_sleeper: int) -> None:
    with pytest.raises(RuntimeLookupError, match="host's network namespace") as err:
        resolve_netns("pid", str(host_sleeper))
    assert f"process {host_sleeper}" in str(err.value)


def test_pid_runtime_missing_process_and_bad_refs() -> None:
    pid = _gone_pid()
    with pytest.raises(RuntimeLookupError, match=f"process {pid} not found"):
        resolve_netns("pid", str(pid))
    with pytest.raises(RuntimeLookupError, match="Invalid ref for runtime 'pid'"):
        resolve_netns("pid", "1")


def test_path_runtime_accepts_a_proc_netns_path(netns_sleeper: int) -> None:
    path = f"/proc/{netns_sleeper}/ns/net"
    assert PathRuntime().resolve(path) == path


def test_path_runtime_refuses_host_and_non_netns_files(
    host_sleeper: int, netns_sleeper: int, tmp_path: Path
) -> None:
    for host in (f"/proc/{host_sleeper}/ns/net", "/proc/self/ns/net"):
        with pytest.raises(RuntimeLookupError, match="host's network namespace"):
            resolve_netns("path", host)
    # PID 1 may be out of reach (a sandbox's init); refused either way.
    with pytest.raises(RuntimeLookupError, match=r"host's network namespace|no permission"):
        resolve_netns("path", "/proc/1/ns/net")
    with pytest.raises(RuntimeLookupError, match="is not a network namespace"):
        resolve_netns("path", f"/proc/{netns_sleeper}/ns/mnt")
    plain = tmp_path / "leftover"
    plain.write_text("")  # what an unmounted /run/netns entry looks like
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # must not be opened (it would block)
    for path in (plain, fifo, Path("/dev/null")):
        with pytest.raises(RuntimeLookupError, match="is not a namespace file"):
            resolve_netns("path", str(path))
    with pytest.raises(RuntimeLookupError, match="not found"):
        resolve_netns("path", str(tmp_path / "missing"))
    with pytest.raises(RuntimeLookupError, match="not found"):
        resolve_netns("path", f"/proc/{_gone_pid()}/ns/net")
    with pytest.raises(RuntimeLookupError, match="Invalid ref for runtime 'path'"):
        resolve_netns("path", "/proc/1/../1/ns/net")


def test_netns_runtime_missing_and_invalid() -> None:
    with pytest.raises(RuntimeLookupError, match="network namespace 'egt-none-000' not found"):
        resolve_netns("netns", "egt-none-000")
    with pytest.raises(RuntimeLookupError, match="Invalid ref for runtime 'netns'"):
        resolve_netns("netns", "../x")


@pytest.mark.root
def test_netns_runtime_resolves_a_named_netns() -> None:
    name = f"egt-rt-{os.urandom(3).hex()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        assert NamedNetnsRuntime().resolve(name) == f"/run/netns/{name}"
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=True)


def test_backends_and_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for runtime in ("netns", "pid", "path"):
        backend = backend_for(runtime)
        assert backend.name == runtime and backend.is_supported()
    monkeypatch.setenv("EGRESSD_DOCKER_SOCKET", str(tmp_path / "d.sock"))
    monkeypatch.setenv("EGRESSD_PODMAN_SOCKET", str(tmp_path / "p.sock"))
    monkeypatch.setenv("EGRESSD_RUNTIME_API_TIMEOUT", "2.5")
    assert RuntimeSettings.from_env() == RuntimeSettings(
        docker_socket=str(tmp_path / "d.sock"),
        podman_socket=str(tmp_path / "p.sock"),
        api_timeout=2.5,
    )
    assert not backend_for("docker").is_supported()  # no socket there
    assert RuntimeSettings.from_env({}) == RuntimeSettings(
        docker_socket="/run/docker.sock", podman_socket="/run/podman/podman.sock", api_timeout=5.0
    )
    assert RuntimeSettings.from_env({"EGRESSD_RUNTIME_API_TIMEOUT": "soon"}).api_timeout == 5.0
