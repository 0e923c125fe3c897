"""Find a container's network namespace. The dataplane only sees the path.

Runtime ``netns``: the container is a named namespace, ``/run/netns/<ref>``
(what ``ip netns add`` creates). Other runtimes (pid, path, docker, podman)
plug in here later.
"""

from __future__ import annotations

import os
import re

from egressd.errors import RuntimeLookupError

NETNS_DIR = "/run/netns"
NETNS_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
SUPPORTED_RUNTIMES = ("netns",)


def resolve_netns(runtime: str, ref: str) -> str:
    """The netns path of a container, or :class:`RuntimeLookupError`."""
    if runtime != "netns":
        raise RuntimeLookupError(f"unsupported container runtime '{runtime}'")
    if not NETNS_NAME_RE.match(ref) or ref in (".", ".."):
        raise RuntimeLookupError(f"invalid network namespace name '{ref}'")
    path = os.path.join(NETNS_DIR, ref)
    if not os.path.exists(path):
        raise RuntimeLookupError(f"network namespace '{ref}' not found ({path})")
    return path


__all__ = ["NETNS_NAME_RE", "SUPPORTED_RUNTIMES", "resolve_netns"]
