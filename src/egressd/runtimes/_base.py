"""The one small interface every runtime backend implements (sshuttle ``methods`` style)."""

from __future__ import annotations

from typing import Protocol


class RuntimeBackend(Protocol):
    """Finds the network namespace of a container known by ``ref``.

    ``resolve`` returns a path that opens to the container's network namespace
    (checked: a live netns, not the host's) or raises ``RuntimeLookupError``.
    ``is_supported`` says whether this host can serve the runtime at all
    (e.g. the engine's API socket exists), without looking up any container.
    """

    name: str

    def is_supported(self) -> bool: ...

    def resolve(self, ref: str) -> str: ...
