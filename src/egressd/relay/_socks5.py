"""SOCKS5 client handshake (RFC 1928 + RFC 1929 username/password), sans-IO.

Byte layouts (all multi-byte integers big endian):

    greeting      VER=5 NMETHODS METHODS...
    method reply  VER=5 METHOD              (0xFF: none acceptable)
    auth request  VER=1 ULEN UNAME PLEN PASSWD                  (RFC 1929)
    auth reply    VER=1 STATUS              (0 = success)
    request       VER=5 CMD=1 RSV=0 ATYP DST.ADDR DST.PORT
    reply         VER=5 REP RSV ATYP BND.ADDR BND.PORT
                  ATYP 1: 4 bytes, 3: 1 length byte + name, 4: 16 bytes

Feed every byte read from the proxy to :meth:`Socks5Handshake.receive_data`;
replies may be split across reads or arrive with destination bytes behind
them (returned as ``TunnelReady.early_payload``). With ``destination=None``
the handshake stops once authenticated (used by the health probe).

Pipelining (``pipeline=True``): the CONNECT request goes out together with
the message before it whenever the server's answer to that message cannot
change what we send next, saving a round trip and a wake-up on both ends:

    no credentials    greeting offering only 0x00 + request   (the reply is 0x00 or 0xff)
    with credentials  greeting offering 0x02, 0x00; then, if 0x02 was chosen,
                      auth request + request (RFC 1929: a failed auth closes)

A server that answers otherwise is still handled: 0xff and a failed auth
fail as usual (the request is discarded with the connection). A server that
drops bytes sent ahead of its reply is non-conforming (RFC 1928 is a byte
stream); with it the handshake runs into the caller's timeout, fail closed.

No concurrency: one object per connection, driven by that connection alone.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import socket

from egressd.errors import UpstreamAuthFailed, UpstreamProtocolError
from egressd.relay._errors import UpstreamConnectRejected
from egressd.relay._events import (
    Authenticated,
    Event,
    SendBytes,
    TunnelReady,
    format_endpoint,
    pack_ip,
    parse_ip,
)

SOCKS_VERSION = 0x05
AUTH_VERSION = 0x01
METHOD_NO_AUTH = 0x00
METHOD_USERNAME_PASSWORD = 0x02
METHOD_NONE_ACCEPTABLE = 0xFF
CMD_CONNECT = 0x01
ATYP_IPV4 = 0x01
ATYP_DOMAIN = 0x03
ATYP_IPV6 = 0x04

REPLY_MEANINGS: dict[int, str] = {
    0x01: "general SOCKS server failure",
    0x02: "connection not allowed by ruleset",
    0x03: "network unreachable",
    0x04: "host unreachable",
    0x05: "connection refused by destination",
    0x06: "TTL expired",
    0x07: "command not supported",
    0x08: "address type not supported",
}


@functools.lru_cache(maxsize=4096)
def connect_request(host: str, port: int) -> bytes:
    """The CONNECT request for an IP literal (cached: one per connection otherwise)."""
    if not 0 < port <= 65535:
        raise ValueError(f"destination port out of range: {port}")
    version, packed = pack_ip(host)
    atyp = ATYP_IPV4 if version == 4 else ATYP_IPV6
    return bytes((SOCKS_VERSION, CMD_CONNECT, 0x00, atyp)) + packed + port.to_bytes(2, "big")


# What a pipelined handshake without credentials sends first, and the two replies
# that say yes to it: method 0x00, then CONNECT succeeded (VER REP RSV ATYP=IPv4,
# 4 address and 2 port bytes: what dante and most servers answer to an IPv4 request).
_GREETING_NO_AUTH = bytes((SOCKS_VERSION, 1, METHOD_NO_AUTH))
_QUICK_REPLY_HEAD = bytes((SOCKS_VERSION, METHOD_NO_AUTH, SOCKS_VERSION, 0x00, 0x00, ATYP_IPV4))
_QUICK_REPLY_LEN = len(_QUICK_REPLY_HEAD) + 4 + 2


@functools.lru_cache(maxsize=4096)
def quick_opening_bytes(host: str, port: int) -> bytes:
    """The greeting offering only 0x00, then the CONNECT request (cached per destination)."""
    return _GREETING_NO_AUTH + connect_request(host, port)


def quick_reply(data: bytes) -> bytes | None:
    """The bytes behind both replies when ``data`` starts with a yes to both, else None.

    The relay sends :func:`quick_opening_bytes` and makes a :class:`Socks5Handshake`
    only when the proxy's first answer is anything else (see ``_spliced``); a
    handshake made with ``pipeline=True`` and no credentials sends the same bytes.
    """
    if len(data) >= _QUICK_REPLY_LEN and data.startswith(_QUICK_REPLY_HEAD):
        return data[_QUICK_REPLY_LEN:]
    return None


def reply_meaning(code: int) -> str:
    return REPLY_MEANINGS.get(code, "unassigned reply code")


class Socks5State(enum.Enum):
    IDLE = "idle"
    AWAIT_METHOD = "await-method"
    AWAIT_AUTH = "await-auth"
    AWAIT_REPLY = "await-reply"
    DONE = "done"
    FAILED = "failed"


class Socks5Handshake:
    """One SOCKS5 client handshake towards ``proxy_label``."""

    def __init__(
        self,
        *,
        destination: tuple[str, int] | None,
        username: str | None = None,
        password: str | None = None,
        proxy_label: str = "upstream proxy",
        pipeline: bool = False,
    ) -> None:
        self._destination = destination
        self._pipeline = pipeline and destination is not None
        self._request_sent = False
        self._request = b""
        if destination is not None:
            self._request = connect_request(*destination)
        self._auth_request: bytes | None = None
        if username is not None:
            user = username.encode()
            secret = (password or "").encode()
            if not 0 < len(user) <= 255 or len(secret) > 255:
                raise ValueError("RFC 1929 username must be 1-255 bytes, password 0-255 bytes")
            self._auth_request = (
                bytes((AUTH_VERSION, len(user))) + user + bytes((len(secret),)) + secret
            )
        self._proxy_label = proxy_label
        self._buffer = bytearray()
        self.state = Socks5State.IDLE
        self.bound_address: tuple[str, int] | None = None

    @property
    def is_done(self) -> bool:
        return self.state is Socks5State.DONE

    @property
    def _target(self) -> str:
        """The destination as messages name it (only needed when something fails)."""
        if self._destination is None:
            return ""
        host, port = self._destination
        return format_endpoint(str(parse_ip(host)), port)

    def initiate(self) -> list[Event]:
        """The greeting: offer 0x00 only without credentials, 0x02 and 0x00 with."""
        if self.state is not Socks5State.IDLE:
            raise RuntimeError("handshake already started")
        if self._auth_request is None:
            methods = bytes((METHOD_NO_AUTH,))
        else:
            methods = bytes((METHOD_USERNAME_PASSWORD, METHOD_NO_AUTH))
        self.state = Socks5State.AWAIT_METHOD
        greeting = bytes((SOCKS_VERSION, len(methods))) + methods
        if self._pipeline and self._auth_request is None:
            self._request_sent = True
            return [SendBytes(greeting + self._request)]
        return [SendBytes(greeting)]

    def receive_data(self, data: bytes) -> list[Event]:
        if self.state in (Socks5State.IDLE, Socks5State.DONE, Socks5State.FAILED):
            raise RuntimeError(f"receive_data() in state {self.state.value}")
        self._buffer += data
        events: list[Event] = []
        try:
            while not self.is_done:
                step = self._step()
                if step is None:
                    break
                events += step
        except Exception:
            self.state = Socks5State.FAILED
            raise
        return events

    def receive_eof(self) -> None:
        """The proxy closed the connection before the handshake finished."""
        if self.is_done:
            return
        phase = {
            Socks5State.AWAIT_METHOD: "method selection",
            Socks5State.AWAIT_AUTH: "username/password authentication",
            Socks5State.AWAIT_REPLY: "the CONNECT reply",
        }.get(self.state, "the handshake")
        self.state = Socks5State.FAILED
        raise UpstreamProtocolError(
            f"{self._proxy_label} closed the connection during {phase} "
            f"({len(self._buffer)} bytes of reply received)"
        )

    def _step(self) -> list[Event] | None:
        if self.state is Socks5State.AWAIT_METHOD:
            return self._on_method()
        if self.state is Socks5State.AWAIT_AUTH:
            return self._on_auth()
        if self.state is Socks5State.AWAIT_REPLY:
            return self._on_reply()
        raise RuntimeError(f"unexpected state {self.state.value}")  # pragma: no cover

    def _after_auth(self) -> list[Event]:
        if self._destination is None:
            self.state = Socks5State.DONE
            return [Authenticated()]
        self.state = Socks5State.AWAIT_REPLY
        if self._request_sent:
            return [Authenticated()]
        self._request_sent = True
        return [Authenticated(), SendBytes(self._request)]

    def _on_method(self) -> list[Event] | None:
        if len(self._buffer) < 2:
            return None
        version, method = self._buffer[0], self._buffer[1]
        del self._buffer[:2]
        if version != SOCKS_VERSION:
            raise UpstreamProtocolError(
                f"{self._proxy_label} is not a SOCKS5 proxy "
                f"(method reply version 0x{version:02x}, expected 0x05)"
            )
        if method == METHOD_NONE_ACCEPTABLE:
            if self._auth_request is None:
                raise UpstreamAuthFailed(
                    f"{self._proxy_label} requires authentication but no credentials "
                    "are configured (no acceptable methods, 0xff)"
                )
            raise UpstreamAuthFailed(
                f"{self._proxy_label} accepts neither username/password nor "
                "no-authentication (no acceptable methods, 0xff)"
            )
        if method == METHOD_NO_AUTH:
            return self._after_auth()
        if method == METHOD_USERNAME_PASSWORD and self._auth_request is not None:
            self.state = Socks5State.AWAIT_AUTH
            if self._pipeline:
                self._request_sent = True
                return [SendBytes(self._auth_request + self._request)]
            return [SendBytes(self._auth_request)]
        raise UpstreamProtocolError(
            f"{self._proxy_label} selected authentication method 0x{method:02x}, "
            "which we did not offer"
        )

    def _on_auth(self) -> list[Event] | None:
        if len(self._buffer) < 2:
            return None
        version, status = self._buffer[0], self._buffer[1]
        del self._buffer[:2]
        # RFC 1929 says VER=1; some servers echo 5. Accept both, reject anything else.
        if version not in (AUTH_VERSION, SOCKS_VERSION):
            raise UpstreamProtocolError(
                f"{self._proxy_label} sent a malformed username/password reply "
                f"(version 0x{version:02x})"
            )
        if status != 0x00:
            raise UpstreamAuthFailed(
                f"{self._proxy_label} rejected the username/password "
                f"(RFC 1929 status 0x{status:02x})"
            )
        return self._after_auth()

    def _on_reply(self) -> list[Event] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        if buf[0] != SOCKS_VERSION:
            raise UpstreamProtocolError(
                f"{self._proxy_label} sent a malformed CONNECT reply "
                f"(version 0x{buf[0]:02x}, expected 0x05)"
            )
        code = buf[1]
        if code != 0x00:
            # Fail as soon as the code is known: servers often close without the rest.
            raise UpstreamConnectRejected(
                f"socks5 CONNECT to {self._target} failed: {reply_meaning(code)} "
                f"(reply 0x{code:02x})",
                code=code,
            )
        if len(buf) < 5:
            return None
        atyp = buf[3]
        if atyp == ATYP_IPV4:
            addr_len, addr_start = 4, 4
        elif atyp == ATYP_IPV6:
            addr_len, addr_start = 16, 4
        elif atyp == ATYP_DOMAIN:
            addr_len, addr_start = buf[4], 5
        else:
            raise UpstreamProtocolError(
                f"{self._proxy_label} sent a malformed CONNECT reply (address type 0x{atyp:02x})"
            )
        end = addr_start + addr_len + 2
        if len(buf) < end:
            return None
        raw_addr = bytes(buf[addr_start : addr_start + addr_len])
        port = int.from_bytes(buf[end - 2 : end], "big")
        if atyp == ATYP_DOMAIN:
            host = raw_addr.decode("ascii", errors="replace")
        elif atyp == ATYP_IPV4:
            host = socket.inet_ntop(socket.AF_INET, raw_addr)  # same text as ipaddress, faster
        else:
            host = str(ipaddress.ip_address(raw_addr))
        self.bound_address = (host, port)
        early = bytes(buf[end:])
        buf.clear()
        self.state = Socks5State.DONE
        return [TunnelReady(early_payload=early)]
