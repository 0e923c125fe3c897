"""The one exception tree of egressd.

    EgressdError                      base of everything we raise on purpose
    ├── InvalidInput                  a user string or body failed validation (API: 400)
    ├── NotFound                      a container / config does not exist (API: 404)
    ├── Conflict                      request clashes with current state (API: 409)
    ├── AllocationExhausted           the subnet pool has no free block
    ├── KernelError                   a netlink / nftables operation failed; keeps errno
    ├── RuntimeLookupError            a container's netns could not be resolved
    └── UpstreamError                 talking to the upstream proxy failed
        ├── UpstreamUnreachable       TCP connect / TLS to the proxy failed
        ├── UpstreamAuthFailed        the proxy rejected our credentials
        └── UpstreamProtocolError     the proxy answered something we cannot use

The API maps this tree to its envelopes in ``egressd.api.envelopes`` (and,
where the spec wants an endpoint's own message, in the route). The agent
retries every failure at its next pass; no error class decides that.
"""

from __future__ import annotations


class EgressdError(Exception):
    """Base class."""


class InvalidInput(EgressdError):
    pass


class NotFound(EgressdError):
    pass


class Conflict(EgressdError):
    pass


class AllocationExhausted(EgressdError):
    pass


class KernelError(EgressdError):
    """A kernel operation failed. ``errno`` is kept when the kernel gave one."""

    def __init__(self, message: str, *, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class RuntimeLookupError(EgressdError):
    pass


class UpstreamError(EgressdError):
    pass


class UpstreamUnreachable(UpstreamError):
    pass


class UpstreamAuthFailed(UpstreamError):
    pass


class UpstreamProtocolError(UpstreamError):
    pass
