"""Relay-specific refinements of :class:`egressd.errors.UpstreamError`.

    UpstreamProtocolError                 (egressd.errors)
    └── UpstreamConnectRejected           the proxy accepted us but refused or failed
                                          the CONNECT to this destination; ``code`` is
                                          the SOCKS5 reply code or the HTTP status

A rejected CONNECT proves the proxy is reachable and took our credentials;
the probe relies on that distinction. No concurrency here.
"""

from __future__ import annotations

from egressd.errors import UpstreamProtocolError


class UpstreamConnectRejected(UpstreamProtocolError):
    """The proxy would not (or could not) connect us to the destination."""

    def __init__(self, message: str, *, code: int) -> None:
        super().__init__(message)
        self.code = code
