"""Relay-specific refinements of :class:`egressd.errors.UpstreamError`.

    UpstreamProtocolError                 (egressd.errors)
    └── UpstreamConnectRejected           the proxy accepted us but refused or failed
                                          the CONNECT to this destination; ``code`` is
                                          the SOCKS5 reply code or the HTTP status

A rejected CONNECT proves the proxy is reachable and took our credentials;
the probe relies on that distinction.

Also here: the messages of the failures both dialling paths (the spliced
state machine and the coroutine :func:`egressd.relay._upstream.dial`) report,
so a container's status reads the same whichever path failed. They name the
proxy by its label (scheme and endpoint), never by credentials.

No concurrency here.
"""

from __future__ import annotations

from egressd.errors import UpstreamProtocolError, UpstreamUnreachable
from egressd.relay._events import errno_reason

CLOSED_DURING_HANDSHAKE = "proxy closed the connection during the handshake"


def cannot_connect(label: str, error: OSError | None) -> UpstreamUnreachable:
    """No address of the proxy took the connection (``error``: the last refusal)."""
    reason = errno_reason(error) if error is not None else "no address to connect to"
    return UpstreamUnreachable(f"cannot connect to {label}: {reason}")


def connect_timed_out(label: str, timeout: float) -> UpstreamUnreachable:
    return UpstreamUnreachable(f"cannot connect to {label}: no answer within {timeout:g}s")


def cannot_resolve(label: str, reason: str) -> UpstreamUnreachable:
    return UpstreamUnreachable(f"cannot resolve {label}: {reason}")


def handshake_timed_out(label: str, timeout: float) -> UpstreamUnreachable:
    return UpstreamUnreachable(f"{label} did not complete the handshake within {timeout:g}s")


def connection_broke(label: str, error: OSError) -> UpstreamUnreachable:
    """The connection to the proxy failed once established (reset, timed out...)."""
    return UpstreamUnreachable(f"connection to {label} failed: {errno_reason(error)}")


class UpstreamConnectRejected(UpstreamProtocolError):
    """The proxy would not (or could not) connect us to the destination."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code
