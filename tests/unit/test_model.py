from __future__ import annotations

import pytest

from egressd.errors import InvalidInput
from egressd.model import (
    DEFAULT_DNS_SERVERS,
    NetworkType,
    ProxySpec,
    parse_container_id,
    parse_dns_servers,
)

S5 = NetworkType.SOCKS5


def test_container_id() -> None:
    assert parse_container_id("507f1f77bcf86cd799439012") == "507f1f77bcf86cd799439012"
    for bad in [
        "",
        "507f1f77bcf86cd79943901",
        "507f1f77bcf86cd7994390123",
        "507F1F77BCF86CD799439012",
        "507f1f77bcf86cd79943901g",
        " 507f1f77bcf86cd79943901",
    ]:
        with pytest.raises(InvalidInput, match="Invalid container ID format"):
            parse_container_id(bad)


def test_proxy_parse_with_credentials_percent_encoded() -> None:
    spec = ProxySpec.parse("socks5://us%40er:p%3Ass@Proxy.Example.com:1080", expected=S5)
    assert (spec.host, spec.port, spec.username, spec.password) == (
        "proxy.example.com",
        1080,
        "us@er",
        "p:ss",
    )
    assert spec.endpoint_url == "socks5://proxy.example.com:1080"
    assert spec.has_credentials
    assert "p:ss" not in repr(spec)


def test_proxy_parse_ipv6_and_no_credentials() -> None:
    spec = ProxySpec.parse("http://[2001:db8::1]:3128", expected=NetworkType.HTTP)
    assert spec.host == "2001:db8::1" and not spec.has_credentials
    assert spec.endpoint_url == "http://[2001:db8::1]:3128"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "Proxy URL required"),
        ("http://h:1", "scheme must be 'socks5'"),
        ("socks5://h", "must include a port"),
        ("socks5://:1080", "must include a host"),
        ("socks5://h:1/x", "must not have a path"),
        ("socks5://h:1?x=1", "must not have a path"),
        ("socks5://h h:1", "whitespace"),
        ("socks5://-bad-:1", "Invalid proxy host"),
        ("socks5://1.2.3:1", "Invalid proxy host"),
        ("socks5://:pw@h:1", "password but no username"),
        ("socks5://" + "u" * 256 + ":p@h:1", "username longer than 255"),
        ("socks5://[::1:1", "Invalid proxy URL"),
    ],
)
def test_proxy_parse_rejects(url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        ProxySpec.parse(url, expected=S5)


def test_keeping_credentials_only_for_same_endpoint() -> None:
    stored = ProxySpec.parse("socks5://u:p@h:1", expected=S5)
    same = ProxySpec.parse("socks5://h:1", expected=S5).keeping_credentials_of(stored)
    assert (same.username, same.password) == ("u", "p")
    other = ProxySpec.parse("socks5://h:2", expected=S5).keeping_credentials_of(stored)
    assert not other.has_credentials
    new = ProxySpec.parse("socks5://v:q@h:1", expected=S5).keeping_credentials_of(stored)
    assert (new.username, new.password) == ("v", "q")


def test_dns_servers() -> None:
    assert parse_dns_servers(None) == DEFAULT_DNS_SERVERS
    assert parse_dns_servers(["198.18.0.1", "2001:db8::53"]) == ("198.18.0.1", "2001:db8::53")
    with pytest.raises(InvalidInput, match="at most 4"):
        parse_dns_servers(["1.1.1.1"] * 5)
    with pytest.raises(InvalidInput, match="Invalid DNS server address"):
        parse_dns_servers(["example.com"])
