"""Validation of a container's ``ref`` for its runtime, at the edge (pure).

The API (``POST /api/v1/containers``), the CLI (``container create``) and the
runtime backends themselves all use :func:`validate_ref`, so a ref that was
accepted at registration is one a backend knows how to look up, and a stored
ref is checked again before it goes near the kernel or a URL.

    runtime   ref
    netns     a name under /run/netns: [A-Za-z0-9_][A-Za-z0-9_.-]{0,63}, not "." or ".."
    pid       a process id, decimal 2..4194304 (PID 1 is the host's init)
    path      an absolute, normalized netns file path (CNI style), at most 256 chars
    docker    a container name [a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}, or a 12..64 hex id
    podman    the same as docker
"""

from __future__ import annotations

import posixpath
import re

from egressd.errors import InvalidInput

# Used with ``fullmatch`` only: ``match`` and ``$`` would let a trailing newline through.
NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
PID_RE = re.compile(r"^[1-9][0-9]{0,6}$")
MIN_PID, MAX_PID = 2, 4194304  # PID_MAX_LIMIT on 64-bit kernels
# The characters the dataplane accepts in a netns path (see dataplane.names).
NETNS_PATH_RE = re.compile(r"^/[A-Za-z0-9_.:@+/-]*$")
MAX_PATH_LEN = 256
ENGINE_NAME_RE = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,127}$")
ENGINE_ID_RE = re.compile(r"^[0-9a-f]{12,64}$")

SUPPORTED_RUNTIMES: tuple[str, ...] = ("netns", "pid", "path", "docker", "podman")


def _netns_problem(ref: str) -> str | None:
    if not NETNS_NAME_RE.fullmatch(ref) or ref in (".", ".."):
        return "must be a network namespace name ([A-Za-z0-9_.-], at most 64 characters)"
    return None


def _pid_problem(ref: str) -> str | None:
    if not PID_RE.fullmatch(ref) or not MIN_PID <= int(ref) <= MAX_PID:
        return f"must be a process id between {MIN_PID} and {MAX_PID}"
    return None


def _path_problem(ref: str) -> str | None:
    if len(ref) > MAX_PATH_LEN:
        return f"must be at most {MAX_PATH_LEN} characters"
    if not ref.startswith("/"):
        return "must be an absolute path"
    if not NETNS_PATH_RE.fullmatch(ref):
        return "may contain only letters, digits and _ . : @ + / -"
    if ".." in ref.split("/"):
        return "must not contain '..'"
    # normpath keeps a leading "//" (POSIX leaves it implementation-defined).
    if posixpath.normpath(ref) != ref or ref.startswith("//") or ref == "/":
        return "must be a normalized path to a file (no '.', '//' or trailing '/')"
    return None


def _engine_problem(ref: str) -> str | None:
    if not (ENGINE_NAME_RE.fullmatch(ref) or ENGINE_ID_RE.fullmatch(ref)):
        return "must be a container name ([a-zA-Z0-9][a-zA-Z0-9_.-], at most 128) or id (hex)"
    return None


_CHECKS = {
    "netns": _netns_problem,
    "pid": _pid_problem,
    "path": _path_problem,
    "docker": _engine_problem,
    "podman": _engine_problem,
}


def ref_problem(runtime: str, ref: str) -> str | None:
    """Why ``ref`` is not valid for ``runtime``, or ``None`` when it is."""
    check = _CHECKS.get(runtime)
    if check is None:
        return f"unsupported runtime (one of: {', '.join(SUPPORTED_RUNTIMES)})"
    if not isinstance(ref, str) or not ref:
        return "must be a non-empty string"
    return check(ref)


def validate_ref(runtime: str, ref: str) -> str:
    """``ref`` itself, or :class:`InvalidInput` ``Invalid ref for runtime 'x': ...``."""
    if runtime not in _CHECKS:
        raise InvalidInput(
            f"Unsupported runtime '{runtime}': must be one of {', '.join(SUPPORTED_RUNTIMES)}"
        )
    problem = ref_problem(runtime, ref)
    if problem is not None:
        raise InvalidInput(f"Invalid ref for runtime '{runtime}': {problem}")
    return ref
