"""HTTP CONNECT client handshake (RFC 9110 §9.3.6, Basic proxy auth), sans-IO.

Request, sent at once by :meth:`HttpConnectHandshake.initiate`:

    CONNECT 198.18.2.2:80 HTTP/1.1
    Host: 198.18.2.2:80                 (IPv6 literals in brackets)
    Proxy-Authorization: Basic <b64>    (only with credentials)

The response head is read up to the blank line, bounded by
``max_head_bytes``; a 2xx opens the tunnel and any bytes after the head are
the destination's (``TunnelReady.early_payload``). 407 (or 401, which
tinyproxy sends for wrong credentials) means our credentials, or their
absence, were refused; any other status is a rejected CONNECT.

No concurrency: one object per connection, driven by that connection alone.
"""

from __future__ import annotations

import base64
import enum
import functools
import re

from egressd.errors import UpstreamAuthFailed, UpstreamProtocolError
from egressd.relay._errors import UpstreamConnectRejected
from egressd.relay._events import (
    Authenticated,
    Event,
    SendBytes,
    TunnelReady,
    format_endpoint,
    parse_ip,
)

DEFAULT_MAX_HEAD_BYTES = 16 * 1024
# Tolerate bare LF line endings, as many HTTP parsers do.
_HEAD_END = re.compile(rb"\r?\n\r?\n")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: ([^\r\n]*))?")


class HttpConnectState(enum.Enum):
    IDLE = "idle"
    AWAIT_RESPONSE = "await-response"
    DONE = "done"
    FAILED = "failed"


def basic_credentials(username: str, password: str | None) -> str:
    """The ``Proxy-Authorization`` value: ``Basic base64(user:password)`` in UTF-8."""
    token = base64.b64encode(f"{username}:{password or ''}".encode()).decode("ascii")
    return f"Basic {token}"


@functools.lru_cache(maxsize=4096)
def _request_head(host: str, port: int) -> tuple[str, bytes]:
    """The target as the request names it and the request's first two lines (cached per
    destination, never with credentials: those are added per request)."""
    if not 0 < port <= 65535:
        raise ValueError(f"destination port out of range: {port}")
    target = format_endpoint(str(parse_ip(host)), port)
    return target, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n".encode()


class HttpConnectHandshake:
    """One HTTP CONNECT handshake towards ``proxy_label``."""

    def __init__(
        self,
        *,
        destination: tuple[str, int],
        username: str | None = None,
        password: str | None = None,
        proxy_label: str = "http proxy",
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
    ) -> None:
        self._target, head = _request_head(*destination)
        if username is not None:
            head += f"Proxy-Authorization: {basic_credentials(username, password)}\r\n".encode()
        self._request = head + b"\r\n"
        self._sent_credentials = username is not None
        self._proxy_label = proxy_label
        self._max_head_bytes = max_head_bytes
        self._buffer = bytearray()
        self.state = HttpConnectState.IDLE
        self.status: int | None = None
        self.reason: str = ""
        self.headers: list[tuple[str, str]] = []

    @property
    def is_done(self) -> bool:
        return self.state is HttpConnectState.DONE

    def initiate(self) -> list[Event]:
        if self.state is not HttpConnectState.IDLE:
            raise RuntimeError("handshake already started")
        self.state = HttpConnectState.AWAIT_RESPONSE
        return [SendBytes(self._request)]

    def receive_data(self, data: bytes) -> list[Event]:
        if self.state is not HttpConnectState.AWAIT_RESPONSE:
            raise RuntimeError(f"receive_data() in state {self.state.value}")
        self._buffer += data
        try:
            return self._parse()
        except Exception:
            self.state = HttpConnectState.FAILED
            raise

    def receive_eof(self) -> None:
        if self.is_done:
            return
        self.state = HttpConnectState.FAILED
        raise UpstreamProtocolError(
            f"{self._proxy_label} closed the connection before answering CONNECT "
            f"({len(self._buffer)} bytes of response received)"
        )

    def _parse(self) -> list[Event]:
        match = _HEAD_END.search(self._buffer)
        if match is None:
            if len(self._buffer) > self._max_head_bytes:
                raise UpstreamProtocolError(
                    f"{self._proxy_label} sent a CONNECT response head longer than "
                    f"{self._max_head_bytes} bytes"
                )
            if len(self._buffer) >= 5 and not self._buffer.startswith(b"HTTP/"):
                raise UpstreamProtocolError(
                    f"{self._proxy_label} did not answer with HTTP "
                    f"(got {bytes(self._buffer[:16])!r})"
                )
            return []
        if match.end() > self._max_head_bytes:
            raise UpstreamProtocolError(
                f"{self._proxy_label} sent a CONNECT response head longer than "
                f"{self._max_head_bytes} bytes"
            )
        head = bytes(self._buffer[: match.start()])
        early = bytes(self._buffer[match.end() :])
        self._buffer.clear()
        status_line, *header_lines = re.split(rb"\r?\n", head)
        status_match = _STATUS_LINE.fullmatch(status_line)
        if status_match is None:
            raise UpstreamProtocolError(
                f"{self._proxy_label} sent a malformed status line {status_line[:80]!r}"
            )
        self.status = int(status_match.group(1))
        reason = (status_match.group(2) or b"").decode("latin-1")
        # The reason phrase ends up in logs and API status: keep it printable.
        self.reason = "".join(c if c.isprintable() else "?" for c in reason).strip()[:120]
        for line in header_lines:
            name, sep, value = line.partition(b":")
            if not sep or not name or name != name.strip():
                raise UpstreamProtocolError(
                    f"{self._proxy_label} sent a malformed header line {line[:80]!r}"
                )
            self.headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        return self._conclude(early)

    def _conclude(self, early: bytes) -> list[Event]:
        status = self.status
        assert status is not None
        described = f"{status} {self.reason}".rstrip()
        if 200 <= status < 300:
            self.state = HttpConnectState.DONE
            return [Authenticated(), TunnelReady(early_payload=early)]
        # 407 is the standard answer; tinyproxy answers 401 when credentials were sent but
        # wrong. A proxy answers CONNECT itself, so either one means "not with these".
        if status in (401, 407):
            hint = (
                "credentials were sent" if self._sent_credentials else "no credentials configured"
            )
            raise UpstreamAuthFailed(f"{self._proxy_label} answered {described} ({hint})")
        raise UpstreamConnectRejected(
            f"http CONNECT to {self._target} failed: proxy answered {described}", code=status
        )
