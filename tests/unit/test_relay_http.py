"""HTTP CONNECT client handshake, step by step, without sockets."""

from __future__ import annotations

import base64

import pytest

from egressd.errors import UpstreamAuthFailed, UpstreamProtocolError
from egressd.relay import (
    Authenticated,
    HttpConnectHandshake,
    SendBytes,
    TunnelReady,
    UpstreamConnectRejected,
)
from egressd.relay._http_connect import HttpConnectState, basic_credentials

DEST = ("198.18.2.2", 80)
LABEL = "http proxy 198.18.1.2:3128"
OK = b"HTTP/1.1 200 Connection established\r\n\r\n"


def started(**kwargs: object) -> HttpConnectHandshake:
    hs = HttpConnectHandshake(destination=DEST, proxy_label=LABEL, **kwargs)  # type: ignore[arg-type]
    hs.initiate()
    return hs


def test_request_without_credentials() -> None:
    hs = HttpConnectHandshake(destination=DEST)
    assert hs.initiate() == [
        SendBytes(b"CONNECT 198.18.2.2:80 HTTP/1.1\r\nHost: 198.18.2.2:80\r\n\r\n")
    ]
    assert hs.state is HttpConnectState.AWAIT_RESPONSE


def test_request_with_credentials() -> None:
    hs = HttpConnectHandshake(destination=DEST, username="alice", password="pä:ss")
    [event] = hs.initiate()
    assert isinstance(event, SendBytes)
    token = base64.b64encode("alice:pä:ss".encode()).decode()
    assert event.data == (
        b"CONNECT 198.18.2.2:80 HTTP/1.1\r\nHost: 198.18.2.2:80\r\n"
        b"Proxy-Authorization: Basic " + token.encode() + b"\r\n\r\n"
    )


def test_basic_credentials_without_password() -> None:
    assert basic_credentials("bob", None) == "Basic " + base64.b64encode(b"bob:").decode()


def test_ipv6_destination_in_brackets() -> None:
    hs = HttpConnectHandshake(destination=("2001:db8::1", 443))
    [event] = hs.initiate()
    assert isinstance(event, SendBytes)
    assert event.data.startswith(
        b"CONNECT [2001:db8::1]:443 HTTP/1.1\r\nHost: [2001:db8::1]:443\r\n"
    )


def test_destination_must_be_an_ip() -> None:
    with pytest.raises(ValueError):
        HttpConnectHandshake(destination=("example.com", 443))


def test_200_split_byte_by_byte() -> None:
    hs = started()
    events: list[object] = []
    for byte in OK:
        assert not hs.is_done
        events += hs.receive_data(bytes([byte]))
    assert events == [Authenticated(), TunnelReady(early_payload=b"")]
    assert hs.is_done
    assert hs.status == 200
    assert hs.reason == "Connection established"


def test_headers_parsed_and_early_payload_kept() -> None:
    hs = started()
    events = hs.receive_data(
        b"HTTP/1.0 200 OK\r\nVia: 1.1 squid\r\nProxy-Agent: test\r\n\r\nSSH-2.0-OpenSSH\r\n"
    )
    assert events == [Authenticated(), TunnelReady(early_payload=b"SSH-2.0-OpenSSH\r\n")]
    assert hs.headers == [("Via", "1.1 squid"), ("Proxy-Agent", "test")]


def test_any_2xx_opens_the_tunnel() -> None:
    hs = started()
    assert hs.receive_data(b"HTTP/1.1 204\r\n\r\n")[-1] == TunnelReady(early_payload=b"")


def test_bare_lf_line_endings_tolerated() -> None:
    hs = started()
    assert hs.receive_data(b"HTTP/1.1 200 OK\nX: y\n\nabc")[-1] == TunnelReady(early_payload=b"abc")


def test_407_with_credentials() -> None:
    hs = started(username="alice", password="wrong")
    with pytest.raises(UpstreamAuthFailed) as info:
        hs.receive_data(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="x"\r\nContent-Length: 0\r\n\r\n'
        )
    assert str(info.value) == (
        "http proxy 198.18.1.2:3128 answered 407 Proxy Authentication Required "
        "(credentials were sent)"
    )
    assert "wrong" not in str(info.value)
    assert hs.state is HttpConnectState.FAILED


def test_401_counts_as_auth_failure_like_tinyproxy_sends() -> None:
    hs = started(username="alice", password="wrong")
    with pytest.raises(UpstreamAuthFailed, match="answered 401 Unauthorized"):
        hs.receive_data(b"HTTP/1.0 401 Unauthorized\r\n\r\n")


def test_407_without_credentials() -> None:
    hs = started()
    with pytest.raises(UpstreamAuthFailed, match="no credentials configured"):
        hs.receive_data(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")


@pytest.mark.parametrize(
    ("status", "reason"),
    [(403, "Forbidden"), (502, "Bad Gateway"), (503, "Service Unavailable"), (504, "")],
)
def test_other_status_is_a_rejected_connect(status: int, reason: str) -> None:
    hs = started()
    with pytest.raises(UpstreamConnectRejected) as info:
        hs.receive_data(f"HTTP/1.1 {status} {reason}\r\nContent-Length: 3\r\n\r\nbad".encode())
    assert info.value.code == status
    assert str(info.value) == (
        f"http CONNECT to 198.18.2.2:80 failed: proxy answered {status} {reason}".rstrip()
    )


def test_reason_phrase_is_sanitized() -> None:
    hs = started()
    with pytest.raises(UpstreamConnectRejected) as info:
        hs.receive_data(b"HTTP/1.1 502 bad\x1b[31m gateway\r\n\r\n")
    assert "\x1b" not in str(info.value)


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 abc OK", b"HTTP/1.1200 OK", b"HTTP/1.1"],
)
def test_malformed_status_line(status_line: bytes) -> None:
    hs = started()
    with pytest.raises(UpstreamProtocolError, match="malformed status line"):
        hs.receive_data(status_line + b"\r\n\r\n")


def test_malformed_header_line() -> None:
    hs = started()
    with pytest.raises(UpstreamProtocolError, match="malformed header line"):
        hs.receive_data(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n")


def test_not_http_detected_early() -> None:
    hs = started()
    with pytest.raises(UpstreamProtocolError, match="did not answer with HTTP"):
        hs.receive_data(b"\x05\x00\x00\x01\x00")


def test_head_too_long() -> None:
    hs = started(max_head_bytes=64)
    hs.receive_data(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(UpstreamProtocolError, match="longer than 64 bytes"):
        hs.receive_data(b"X-Filler: " + b"a" * 100)


def test_head_too_long_even_when_complete() -> None:
    hs = started(max_head_bytes=32)
    with pytest.raises(UpstreamProtocolError, match="longer than 32 bytes"):
        hs.receive_data(b"HTTP/1.1 200 OK\r\nX-Filler: " + b"a" * 40 + b"\r\n\r\n")


def test_default_bound_is_16_kib() -> None:
    hs = started()
    hs.receive_data(b"HTTP/1.1 200 OK\r\n")
    hs.receive_data(b"X: " + b"a" * 16000 + b"\r\n")
    with pytest.raises(UpstreamProtocolError, match="longer than 16384"):
        hs.receive_data(b"Y: " + b"b" * 1000)


def test_eof_before_answer() -> None:
    hs = started()
    hs.receive_data(b"HTTP/1.1 200")
    with pytest.raises(UpstreamProtocolError, match="closed the connection before answering"):
        hs.receive_eof()


def test_eof_after_done_is_fine() -> None:
    hs = started()
    hs.receive_data(OK)
    hs.receive_eof()


def test_receive_before_initiate_is_an_error() -> None:
    hs = HttpConnectHandshake(destination=DEST)
    with pytest.raises(RuntimeError):
        hs.receive_data(OK)
