"""Backends that need no engine: a named netns, a PID, a netns file path."""

from __future__ import annotations

import os

from egressd.errors import InvalidInput, RuntimeLookupError
from egressd.runtimes._nsfs import HOST_NETNS_PATHS, check_netns_handle
from egressd.runtimes.refs import validate_ref

NETNS_DIR = "/run/netns"


def _checked_ref(runtime: str, ref: str) -> str:
    # Stored refs are checked again: one written by an older version must not reach a path.
    try:
        return validate_ref(runtime, ref)
    except InvalidInput as exc:
        raise RuntimeLookupError(str(exc)) from None


def _have_proc() -> bool:
    return os.path.exists(HOST_NETNS_PATHS[0])


class NamedNetnsRuntime:
    """``ip netns add NAME``: the namespace is bind-mounted at ``/run/netns/NAME``."""

    name = "netns"

    def is_supported(self) -> bool:
        return _have_proc()

    def resolve(self, ref: str) -> str:
        path = os.path.join(NETNS_DIR, _checked_ref(self.name, ref))
        if not os.path.exists(path):
            raise RuntimeLookupError(f"network namespace '{ref}' not found ({path})")
        return check_netns_handle(path, what=f"network namespace '{ref}'")


class PidRuntime:
    """A process id: the namespace is ``/proc/PID/ns/net``, for as long as the process lives."""

    name = "pid"

    def is_supported(self) -> bool:
        return _have_proc()

    def resolve(self, ref: str) -> str:
        pid = int(_checked_ref(self.name, ref))
        if not os.path.isdir(f"/proc/{pid}"):
            raise RuntimeLookupError(f"process {pid} not found")
        return check_netns_handle(f"/proc/{pid}/ns/net", what=f"process {pid}")


class PathRuntime:
    """A netns file path as CNI passes it (``/var/run/netns/x``, ``/proc/123/ns/net``)."""

    name = "path"

    def is_supported(self) -> bool:
        return _have_proc()

    def resolve(self, ref: str) -> str:
        path = _checked_ref(self.name, ref)
        return check_netns_handle(path, what=f"netns path {path}")
