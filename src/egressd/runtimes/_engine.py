"""Docker and Podman: ask the engine's API for the container's PID.

Both serve the Docker Engine API on a unix socket (Podman's compatibility
layer answers the same paths). One request per lookup:
``GET /containers/{ref}/json`` -> ``State.Running`` and ``State.Pid``; the
namespace is then ``/proc/PID/ns/net``, checked like any other handle.

Concurrency model: blocking (stdlib ``http.client``), each socket operation
bounded by ``api_timeout``; called from the agent's reconciler thread, which
re-resolves on every pass, so a container that restarted (new PID) is
followed.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import stat
from typing import Any
from urllib.parse import quote

from egressd.errors import InvalidInput, RuntimeLookupError
from egressd.runtimes._nsfs import check_netns_handle
from egressd.runtimes.refs import validate_ref

MAX_ANSWER_BYTES = 4 * 1024 * 1024  # an inspect answer is a few KiB; never buffer more


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP/1.1 over a unix socket; the socket is closed on every failure path.

    (httpx's ``uds=`` transport leaks the socket when ``connect`` fails.)
    """

    def __init__(self, socket_path: str, *, timeout: float) -> None:
        super().__init__("engine", timeout=timeout)
        self.socket_path = socket_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(self.timeout)
            sock.connect(self.socket_path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


def _api_message(body: bytes) -> str:
    """The ``message`` of an engine error answer, short and printable."""
    try:
        data = json.loads(body)
        text = str(data.get("message", "")) if isinstance(data, dict) else ""
    except ValueError:
        text = ""
    text = text or body[:200].decode("utf-8", "replace")
    return "".join(ch if ch.isprintable() else "?" for ch in text)[:200]


class EngineApiRuntime:
    """A Docker Engine API speaker on a unix socket: ``docker`` or ``podman``."""

    def __init__(self, name: str, *, socket_path: str, timeout: float) -> None:
        self.name = name
        self.socket_path = socket_path
        self.timeout = timeout

    def is_supported(self) -> bool:
        try:
            return stat.S_ISSOCK(os.stat(self.socket_path).st_mode)
        except OSError:
            return False

    def resolve(self, ref: str) -> str:
        pid = self.container_pid(ref)
        return check_netns_handle(f"/proc/{pid}/ns/net", what=f"{self.name} container '{ref}'")

    def container_pid(self, ref: str) -> int:
        """The host PID of the running container ``ref``, or RuntimeLookupError."""
        try:
            validate_ref(self.name, ref)
        except InvalidInput as exc:
            raise RuntimeLookupError(str(exc)) from None
        if not self.is_supported():
            env = f"EGRESSD_{self.name.upper()}_SOCKET"
            raise RuntimeLookupError(
                f"{self.name} API socket {self.socket_path} not found "
                f"(is the {self.name} service running? set {env} to its socket)"
            )
        status, body = self._get(f"/containers/{quote(ref, safe='')}/json")
        if status == 404:
            raise RuntimeLookupError(f"{self.name} container '{ref}' not found")
        if status != 200:
            raise RuntimeLookupError(
                f"{self.name} API error {status} for container '{ref}': {_api_message(body)}"
            )
        return self._running_pid(ref, body)

    def _get(self, path: str) -> tuple[int, bytes]:
        connection = _UnixHTTPConnection(self.socket_path, timeout=self.timeout)
        try:
            connection.request(
                "GET", path, headers={"Host": "engine", "Accept": "application/json"}
            )
            answer = connection.getresponse()
            body = answer.read(MAX_ANSWER_BYTES + 1)
        except (OSError, http.client.HTTPException) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or repr(exc)
            raise RuntimeLookupError(
                f"cannot reach the {self.name} API at {self.socket_path}: {reason}"
            ) from None
        finally:
            connection.close()
        if len(body) > MAX_ANSWER_BYTES:
            raise RuntimeLookupError(f"{self.name} API answer too large")
        return answer.status, body

    def _running_pid(self, ref: str, body: bytes) -> int:
        try:
            data: Any = json.loads(body)
        except ValueError:
            data = None
        state = data.get("State") if isinstance(data, dict) else None
        if not isinstance(state, dict):
            raise RuntimeLookupError(
                f"{self.name} API returned an unexpected answer for container '{ref}'"
            )
        if state.get("Running") is not True:
            status = state.get("Status")
            shown = status if isinstance(status, str) and status.isprintable() else "unknown"
            raise RuntimeLookupError(
                f"{self.name} container '{ref}' is not running (status: {shown[:32]})"
            )
        pid = state.get("Pid")
        if type(pid) is not int or pid <= 0:
            raise RuntimeLookupError(
                f"{self.name} API gave no process id for running container '{ref}'"
            )
        return pid
