"""Where the container engines' APIs are, from the environment or passed in.

    EGRESSD_DOCKER_SOCKET        Docker Engine API socket     (default /run/docker.sock)
    EGRESSD_PODMAN_SOCKET        Podman's Docker-compatible API socket
                                 (default /run/podman/podman.sock; serve it with
                                 ``podman system service --time=0 unix:///run/podman/podman.sock``)
    EGRESSD_RUNTIME_API_TIMEOUT  seconds for one engine API request (default 5)

A frozen value, read when a lookup needs it: the agent calls
``resolve_netns(runtime, ref)`` and the environment of the daemon applies;
tests and embedders pass their own :class:`RuntimeSettings` instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_DOCKER_SOCKET = "/run/docker.sock"
DEFAULT_PODMAN_SOCKET = "/run/podman/podman.sock"
DEFAULT_API_TIMEOUT = 5.0


@dataclass(frozen=True)
class RuntimeSettings:
    docker_socket: str = DEFAULT_DOCKER_SOCKET
    podman_socket: str = DEFAULT_PODMAN_SOCKET
    api_timeout: float = DEFAULT_API_TIMEOUT

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RuntimeSettings:
        env = os.environ if environ is None else environ
        timeout = env.get("EGRESSD_RUNTIME_API_TIMEOUT", "")
        try:
            api_timeout = float(timeout) if timeout else DEFAULT_API_TIMEOUT
        except ValueError:
            api_timeout = DEFAULT_API_TIMEOUT
        return cls(
            docker_socket=env.get("EGRESSD_DOCKER_SOCKET") or DEFAULT_DOCKER_SOCKET,
            podman_socket=env.get("EGRESSD_PODMAN_SOCKET") or DEFAULT_PODMAN_SOCKET,
            api_timeout=api_timeout if api_timeout > 0 else DEFAULT_API_TIMEOUT,
        )
