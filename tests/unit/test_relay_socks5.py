"""SOCKS5 client handshake, step by step, without sockets."""

from __future__ import annotations

import pytest

from egressd.errors import UpstreamAuthFailed, UpstreamProtocolError
from egressd.relay import (
    Authenticated,
    SendBytes,
    Socks5Handshake,
    TunnelReady,
    UpstreamConnectRejected,
)
from egressd.relay._socks5 import (
    REPLY_MEANINGS,
    Socks5State,
    quick_opening_bytes,
    quick_reply,
)

DEST = ("198.18.2.2", 80)
LABEL = "socks5 proxy 198.18.1.2:1080"
REQUEST_V4 = b"\x05\x01\x00\x01" + bytes([198, 18, 2, 2]) + b"\x00\x50"
OK_REPLY_V4 = b"\x05\x00\x00\x01" + bytes([10, 0, 0, 1]) + b"\x1f\x90"


def connected(*, username: str | None = None, password: str | None = None) -> Socks5Handshake:
    """A handshake that already sent its CONNECT request (no-auth path)."""
    hs = Socks5Handshake(destination=DEST, username=username, password=password, proxy_label=LABEL)
    hs.initiate()
    assert hs.receive_data(b"\x05\x00") == [Authenticated(), SendBytes(REQUEST_V4)]
    return hs


def test_greeting_without_credentials_offers_no_auth_only() -> None:
    hs = Socks5Handshake(destination=DEST)
    assert hs.initiate() == [SendBytes(b"\x05\x01\x00")]
    assert hs.state is Socks5State.AWAIT_METHOD


def test_greeting_with_credentials_offers_userpass_and_no_auth() -> None:
    hs = Socks5Handshake(destination=DEST, username="alice", password="s3cret")
    assert hs.initiate() == [SendBytes(b"\x05\x02\x02\x00")]


def test_initiate_twice_is_an_error() -> None:
    hs = Socks5Handshake(destination=DEST)
    hs.initiate()
    with pytest.raises(RuntimeError):
        hs.initiate()


def test_full_handshake_with_auth_in_single_bytes() -> None:
    hs = Socks5Handshake(destination=DEST, username="alice", password="s3cret", proxy_label=LABEL)
    hs.initiate()
    assert hs.receive_data(b"\x05") == []
    assert hs.receive_data(b"\x02") == [SendBytes(b"\x01\x05alice\x06s3cret")]
    assert hs.state is Socks5State.AWAIT_AUTH
    assert hs.receive_data(b"\x01") == []
    assert hs.receive_data(b"\x00") == [Authenticated(), SendBytes(REQUEST_V4)]
    events: list[object] = []
    for byte in OK_REPLY_V4:
        assert not hs.is_done
        events += hs.receive_data(bytes([byte]))
    assert events == [TunnelReady(early_payload=b"")]
    assert hs.is_done
    assert hs.bound_address == ("10.0.0.1", 8080)


def test_password_none_sends_empty_password() -> None:
    hs = Socks5Handshake(destination=DEST, username="bob")
    hs.initiate()
    assert hs.receive_data(b"\x05\x02") == [SendBytes(b"\x01\x03bob\x00")]


def test_credentials_offered_but_proxy_picks_no_auth() -> None:
    hs = Socks5Handshake(destination=DEST, username="alice", password="x")
    hs.initiate()
    assert hs.receive_data(b"\x05\x00") == [Authenticated(), SendBytes(REQUEST_V4)]


def test_ipv6_destination_uses_atyp_4() -> None:
    hs = Socks5Handshake(destination=("2001:db8::7", 443))
    hs.initiate()
    events = hs.receive_data(b"\x05\x00")
    addr = bytes.fromhex("20010db8000000000000000000000007")
    assert events[-1] == SendBytes(b"\x05\x01\x00\x04" + addr + b"\x01\xbb")


def test_destination_must_be_an_ip() -> None:
    with pytest.raises(ValueError, match="IP address"):
        Socks5Handshake(destination=("example.com", 80))
    with pytest.raises(ValueError):
        Socks5Handshake(destination=("10.0.0.1", 0))


def test_overlong_username_rejected() -> None:
    with pytest.raises(ValueError):
        Socks5Handshake(destination=DEST, username="u" * 256)


@pytest.mark.parametrize(
    ("reply", "bound"),
    [
        (OK_REPLY_V4, ("10.0.0.1", 8080)),
        (b"\x05\x00\x00\x04" + bytes(15) + b"\x01" + b"\x00\x35", ("::1", 53)),
        (b"\x05\x00\x00\x03\x0bexample.org\x01\xbb", ("example.org", 443)),
        (b"\x05\x00\x00\x03\x00\x00\x00", ("", 0)),
    ],
)
def test_reply_any_atyp_split_everywhere(reply: bytes, bound: tuple[str, int]) -> None:
    for cut in range(1, len(reply)):
        hs = connected()
        assert hs.receive_data(reply[:cut]) == []
        assert hs.receive_data(reply[cut:]) == [TunnelReady(early_payload=b"")]
        assert hs.bound_address == bound


def test_bytes_after_reply_are_early_payload() -> None:
    hs = connected()
    events = hs.receive_data(OK_REPLY_V4 + b"220 smtp ready\r\n")
    assert events == [TunnelReady(early_payload=b"220 smtp ready\r\n")]


def test_whole_conversation_in_one_read_keeps_early_payload() -> None:
    hs = Socks5Handshake(destination=DEST, username="alice", password="pw")
    hs.initiate()
    assert hs.receive_data(b"\x05\x02") == [SendBytes(b"\x01\x05alice\x02pw")]
    events = hs.receive_data(b"\x01\x00" + OK_REPLY_V4 + b"hi")
    assert events == [Authenticated(), SendBytes(REQUEST_V4), TunnelReady(early_payload=b"hi")]


@pytest.mark.parametrize("code", sorted(REPLY_MEANINGS))
def test_every_reply_code_maps_to_a_clear_error(code: int) -> None:
    hs = connected()
    with pytest.raises(UpstreamConnectRejected) as info:
        hs.receive_data(bytes([0x05, code]))
    assert info.value.code == code
    message = str(info.value)
    assert message.startswith("socks5 CONNECT to 198.18.2.2:80 failed: ")
    assert REPLY_MEANINGS[code] in message
    assert f"(reply 0x{code:02x})" in message
    assert isinstance(info.value, UpstreamProtocolError)
    assert hs.state is Socks5State.FAILED


def test_connection_refused_message() -> None:
    hs = connected()
    with pytest.raises(UpstreamConnectRejected) as info:
        hs.receive_data(b"\x05\x05\x00\x01")
    assert str(info.value) == (
        "socks5 CONNECT to 198.18.2.2:80 failed: connection refused by destination (reply 0x05)"
    )


def test_unassigned_reply_code() -> None:
    hs = connected()
    with pytest.raises(UpstreamConnectRejected, match="unassigned reply code \\(reply 0x09\\)"):
        hs.receive_data(b"\x05\x09")


def test_auth_rejected() -> None:
    hs = Socks5Handshake(destination=DEST, username="alice", password="bad", proxy_label=LABEL)
    hs.initiate()
    hs.receive_data(b"\x05\x02")
    with pytest.raises(UpstreamAuthFailed) as info:
        hs.receive_data(b"\x01\x01")
    assert str(info.value) == (
        "socks5 proxy 198.18.1.2:1080 rejected the username/password (RFC 1929 status 0x01)"
    )
    assert "bad" not in str(info.value)


def test_auth_reply_version_5_tolerated() -> None:
    hs = Socks5Handshake(destination=DEST, username="alice", password="pw")
    hs.initiate()
    hs.receive_data(b"\x05\x02")
    assert hs.receive_data(b"\x05\x00")[0] == Authenticated()


def test_auth_reply_bad_version() -> None:
    hs = Socks5Handshake(destination=DEST, username="alice", password="pw")
    hs.initiate()
    hs.receive_data(b"\x05\x02")
    with pytest.raises(UpstreamProtocolError, match="malformed username/password reply"):
        hs.receive_data(b"\x07\x00")


def test_no_acceptable_method_without_credentials() -> None:
    hs = Socks5Handshake(destination=DEST, proxy_label=LABEL)
    hs.initiate()
    with pytest.raises(UpstreamAuthFailed, match="requires authentication but no credentials"):
        hs.receive_data(b"\x05\xff")


def test_no_acceptable_method_with_credentials() -> None:
    hs = Socks5Handshake(destination=DEST, username="a", password="b")
    hs.initiate()
    with pytest.raises(UpstreamAuthFailed, match="no acceptable methods"):
        hs.receive_data(b"\x05\xff")


@pytest.mark.parametrize("method", [b"\x02", b"\x01", b"\x80"])
def test_method_not_offered(method: bytes) -> None:
    hs = Socks5Handshake(destination=DEST)
    hs.initiate()
    with pytest.raises(UpstreamProtocolError, match="which we did not offer"):
        hs.receive_data(b"\x05" + method)


def test_not_a_socks5_server() -> None:
    hs = Socks5Handshake(destination=DEST, proxy_label=LABEL)
    hs.initiate()
    with pytest.raises(UpstreamProtocolError, match="is not a SOCKS5 proxy"):
        hs.receive_data(b"HTTP/1.1 400 Bad Request\r\n")


def test_reply_bad_version() -> None:
    hs = connected()
    with pytest.raises(UpstreamProtocolError, match="malformed CONNECT reply"):
        hs.receive_data(b"\x04\x00\x00\x01")


def test_reply_bad_address_type() -> None:
    hs = connected()
    with pytest.raises(UpstreamProtocolError, match="address type 0x02"):
        hs.receive_data(b"\x05\x00\x00\x02\x00\x00")


def test_receive_after_failure_is_an_error() -> None:
    hs = connected()
    with pytest.raises(UpstreamConnectRejected):
        hs.receive_data(b"\x05\x01")
    with pytest.raises(RuntimeError):
        hs.receive_data(b"\x00")


@pytest.mark.parametrize(
    ("feed", "phase"),
    [
        (b"", "method selection"),
        (b"\x05\x02", "username/password authentication"),
        (b"\x05\x02\x01\x00\x05\x00\x00", "the CONNECT reply"),
    ],
)
def test_eof_mid_handshake(feed: bytes, phase: str) -> None:
    hs = Socks5Handshake(destination=DEST, username="u", password="p", proxy_label=LABEL)
    hs.initiate()
    if feed:
        hs.receive_data(feed)
    with pytest.raises(UpstreamProtocolError, match=f"closed the connection during {phase}"):
        hs.receive_eof()


def test_eof_after_done_is_fine() -> None:
    hs = connected()
    hs.receive_data(OK_REPLY_V4)
    hs.receive_eof()
    assert hs.is_done


def test_auth_only_mode_stops_after_auth() -> None:
    hs = Socks5Handshake(destination=None, username="alice", password="pw")
    hs.initiate()
    hs.receive_data(b"\x05\x02")
    assert hs.receive_data(b"\x01\x00") == [Authenticated()]
    assert hs.is_done


def test_auth_only_mode_without_credentials() -> None:
    hs = Socks5Handshake(destination=None)
    hs.initiate()
    assert hs.receive_data(b"\x05\x00") == [Authenticated()]
    assert hs.is_done


# -- pipelining: the CONNECT request sent ahead of the replies --------------------------


def test_pipelined_without_credentials_sends_greeting_and_request_at_once() -> None:
    hs = Socks5Handshake(destination=DEST, proxy_label=LABEL, pipeline=True)
    assert hs.initiate() == [SendBytes(b"\x05\x01\x00" + REQUEST_V4)]
    assert hs.receive_data(b"\x05\x00") == [Authenticated()]  # nothing more to send
    assert hs.state is Socks5State.AWAIT_REPLY
    assert hs.receive_data(OK_REPLY_V4 + b"hi") == [TunnelReady(early_payload=b"hi")]


def test_pipelined_replies_in_one_read() -> None:
    hs = Socks5Handshake(destination=DEST, proxy_label=LABEL, pipeline=True)
    hs.initiate()
    events = hs.receive_data(b"\x05\x00" + OK_REPLY_V4)
    assert events == [Authenticated(), TunnelReady(early_payload=b"")]
    assert hs.is_done


def test_pipelined_with_credentials_sends_auth_and_request_together() -> None:
    # Two methods offered: the server's choice decides what follows, so no request yet.
    hs = Socks5Handshake(
        destination=DEST, username="alice", password="s3cret", proxy_label=LABEL, pipeline=True
    )
    assert hs.initiate() == [SendBytes(b"\x05\x02\x02\x00")]
    assert hs.receive_data(b"\x05\x02") == [SendBytes(b"\x01\x05alice\x06s3cret" + REQUEST_V4)]
    assert hs.receive_data(b"\x01\x00") == [Authenticated()]
    assert hs.receive_data(OK_REPLY_V4) == [TunnelReady(early_payload=b"")]


def test_pipelined_with_credentials_but_no_auth_chosen_sends_request_then() -> None:
    hs = Socks5Handshake(
        destination=DEST, username="alice", password="s3cret", proxy_label=LABEL, pipeline=True
    )
    hs.initiate()
    assert hs.receive_data(b"\x05\x00") == [Authenticated(), SendBytes(REQUEST_V4)]


def test_pipelined_request_is_dropped_with_a_refused_method_or_auth() -> None:
    hs = Socks5Handshake(destination=DEST, proxy_label=LABEL, pipeline=True)
    hs.initiate()
    with pytest.raises(UpstreamAuthFailed):
        hs.receive_data(b"\x05\xff")
    hs = Socks5Handshake(
        destination=DEST, username="alice", password="wrong", proxy_label=LABEL, pipeline=True
    )
    hs.initiate()
    hs.receive_data(b"\x05\x02")
    with pytest.raises(UpstreamAuthFailed):
        hs.receive_data(b"\x01\x01")


def test_pipelining_needs_a_destination() -> None:
    hs = Socks5Handshake(destination=None, proxy_label=LABEL, pipeline=True)  # the probe
    assert hs.initiate() == [SendBytes(b"\x05\x01\x00")]
    assert hs.receive_data(b"\x05\x00") == [Authenticated()]
    assert hs.is_done


# -- the quick opening (pipelined, no credentials) the spliced relay sends itself ---------


def test_quick_opening_is_what_a_pipelined_handshake_sends() -> None:
    """The relay's fallback relies on it: the handshake it makes late sent the same bytes."""
    hs = Socks5Handshake(destination=DEST, pipeline=True)
    assert hs.initiate() == [SendBytes(quick_opening_bytes(*DEST))]
    assert quick_opening_bytes(*DEST) == b"\x05\x01\x00" + REQUEST_V4


def test_quick_reply_takes_both_yes_replies_and_keeps_what_follows() -> None:
    assert quick_reply(b"\x05\x00" + OK_REPLY_V4) == b""
    assert quick_reply(b"\x05\x00" + OK_REPLY_V4 + b"220 ready") == b"220 ready"


@pytest.mark.parametrize(
    "data",
    [
        b"\x05\x00",  # the method reply alone
        b"\x05\x00" + OK_REPLY_V4[:-1],  # the CONNECT reply cut short
        b"\x05\xff",  # no acceptable method
        b"\x05\x00\x05\x05\x00\x01" + bytes(6),  # refused by the destination
        b"\x05\x00\x05\x00\x00\x04" + bytes(18),  # IPv6 bound address
        b"\x05\x00\x05\x00\x00\x03\x00\x00\x00",  # empty domain: the shortest pair there is
        b"",
    ],
)
def test_anything_else_is_left_to_the_handshake(data: bytes) -> None:
    assert quick_reply(data) is None


def test_pipelined_handshake_takes_both_replies_in_one_read() -> None:
    hs = Socks5Handshake(destination=DEST, pipeline=True)
    hs.initiate()
    events = hs.receive_data(b"\x05\x00" + OK_REPLY_V4 + b"hi")
    assert events == [Authenticated(), TunnelReady(early_payload=b"hi")]
    assert hs.is_done and hs.state is Socks5State.DONE
    assert hs.bound_address == ("10.0.0.1", 8080)
