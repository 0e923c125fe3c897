"""Find a container's network namespace. The dataplane only sees the path.

One small backend per runtime behind :class:`RuntimeBackend`
(``is_supported()``, ``resolve(ref)``); the agent calls
:func:`resolve_netns` and never learns which runtime it was:

    runtime   ref                          netns handle
    netns     name (``ip netns add``)      /run/netns/<name>
    pid       process id                   /proc/<pid>/ns/net
    path      netns file path (CNI)        the path itself
    docker    container name or id         /proc/<State.Pid>/ns/net  (Engine API)
    podman    container name or id         /proc/<State.Pid>/ns/net  (Docker-compatible API)

Every handle is checked before it is returned: a live *network* namespace
on nsfs, and not the host's own (ours or PID 1's) -- enforcing there would
cut the host. Refs are validated by :func:`validate_ref` (``refs.py``) at
the edge and again here. Engine sockets come from :class:`RuntimeSettings`,
by default read from ``EGRESSD_DOCKER_SOCKET`` / ``EGRESSD_PODMAN_SOCKET``
(see ``_settings.py``). Failures are :class:`RuntimeLookupError`.
"""

from __future__ import annotations

from egressd.errors import RuntimeLookupError
from egressd.runtimes._base import RuntimeBackend
from egressd.runtimes._engine import EngineApiRuntime
from egressd.runtimes._local import NETNS_DIR, NamedNetnsRuntime, PathRuntime, PidRuntime
from egressd.runtimes._nsfs import check_netns_handle
from egressd.runtimes._settings import RuntimeSettings
from egressd.runtimes.refs import NETNS_NAME_RE, SUPPORTED_RUNTIMES, ref_problem, validate_ref


def backend_for(runtime: str, settings: RuntimeSettings | None = None) -> RuntimeBackend:
    """The backend of ``runtime`` (RuntimeLookupError when there is none)."""
    if runtime == "netns":
        return NamedNetnsRuntime()
    if runtime == "pid":
        return PidRuntime()
    if runtime == "path":
        return PathRuntime()
    if runtime in ("docker", "podman"):
        s = settings if settings is not None else RuntimeSettings.from_env()
        socket_path = s.docker_socket if runtime == "docker" else s.podman_socket
        return EngineApiRuntime(runtime, socket_path=socket_path, timeout=s.api_timeout)
    raise RuntimeLookupError(f"unsupported container runtime '{runtime}'")


def resolve_netns(runtime: str, ref: str, settings: RuntimeSettings | None = None) -> str:
    """The netns path of a container, or :class:`RuntimeLookupError`.

    ``settings`` defaults to :meth:`RuntimeSettings.from_env`, read at each call.
    """
    return backend_for(runtime, settings).resolve(ref)


__all__ = [
    "NETNS_DIR",
    "NETNS_NAME_RE",
    "SUPPORTED_RUNTIMES",
    "EngineApiRuntime",
    "NamedNetnsRuntime",
    "PathRuntime",
    "PidRuntime",
    "RuntimeBackend",
    "RuntimeSettings",
    "backend_for",
    "check_netns_handle",
    "ref_problem",
    "resolve_netns",
    "validate_ref",
]
