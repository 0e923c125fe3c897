"""Frozen domain values, parsed once at the edge.

User strings (container ids, proxy URLs, DNS server lists) become these
values through ``parse()`` functions that raise :class:`InvalidInput` with a
message fit for an API client. Everything past the edge works with the
values only.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from urllib.parse import unquote, urlsplit

from egressd.errors import InvalidInput

CONTAINER_ID_RE = re.compile(r"^[0-9a-f]{24}$")
HOSTNAME_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

MAX_DNS_SERVERS = 4
DEFAULT_DNS_SERVERS: tuple[str, ...] = ("1.1.1.1", "8.8.8.8")
MAX_PROXY_URL_LEN = 2048
MAX_CREDENTIAL_LEN = 255  # RFC 1929: one length byte each
MAX_LOCATION_LEN = 64
MAX_COMMENT_LEN = 500


class NetworkType(enum.StrEnum):
    SOCKS5 = "socks5"
    HTTP = "http"
    HTTPS = "https"
    BLOCK = "block"

    @property
    def is_proxy(self) -> bool:
        return self is not NetworkType.BLOCK


class Status(enum.StrEnum):
    CONFIGURED = "configured"
    RUNNING = "running"
    STOPPED = "stopped"
    ERROR = "error"


class DesiredState(enum.StrEnum):
    """What the operator asked for; the agent converges towards it."""

    CONFIGURED = "configured"  # configured, never started: no enforcement
    STOPPED = "stopped"  # stopped by the operator: no enforcement
    RUNNING = "running"  # enforcement in place
    ABSENT = "absent"  # DELETE in progress: tear down, then forget


def parse_container_id(value: str) -> str:
    """A container id is 24 lower-case hex characters (a Mongo ObjectId)."""
    if not isinstance(value, str) or not CONTAINER_ID_RE.match(value):
        raise InvalidInput("Invalid container ID format")
    return value


def _valid_hostname(host: str) -> bool:
    if len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(HOSTNAME_LABEL_RE.match(label) for label in labels) and not labels[-1].isdigit()


@dataclass(frozen=True)
class ProxySpec:
    """An upstream proxy endpoint with optional credentials.

    ``repr`` never shows the password: these values end up in logs.
    """

    scheme: NetworkType
    host: str
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str, *, expected: NetworkType) -> ProxySpec:
        if not isinstance(url, str) or not url:
            raise InvalidInput("Proxy URL required for non-block type")
        if len(url) > MAX_PROXY_URL_LEN:
            raise InvalidInput(f"Proxy URL longer than {MAX_PROXY_URL_LEN} characters")
        if any(c.isspace() or ord(c) < 0x20 for c in url):
            raise InvalidInput("Proxy URL must not contain whitespace or control characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise InvalidInput(f"Invalid proxy URL: {exc}") from None
        if parts.scheme.lower() != expected.value:
            raise InvalidInput(
                f"Proxy URL scheme must be '{expected.value}' for type '{expected.value}'"
            )
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise InvalidInput("Proxy URL must not have a path, query or fragment")
        host = parts.hostname
        if not host:
            raise InvalidInput("Proxy URL must include a host")
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            if "[" in parts.netloc or not _valid_hostname(host):
                raise InvalidInput(f"Invalid proxy host '{host}'") from None
            host = host.lower()
        if port is None:
            raise InvalidInput("Proxy URL must include a port")
        if not 1 <= port <= 65535:
            raise InvalidInput("Proxy port must be between 1 and 65535")
        username = unquote(parts.username) if parts.username is not None else None
        password = unquote(parts.password) if parts.password is not None else None
        if username == "":
            username = None
        if password and username is None:
            raise InvalidInput("Proxy URL has a password but no username")
        if username is None:
            password = None
        for label, value in (("username", username), ("password", password)):
            if value is not None and len(value.encode()) > MAX_CREDENTIAL_LEN:
                raise InvalidInput(f"Proxy {label} longer than {MAX_CREDENTIAL_LEN} bytes")
        return cls(scheme=expected, host=host, port=port, username=username, password=password)

    @property
    def has_credentials(self) -> bool:
        return self.username is not None

    @property
    def endpoint_url(self) -> str:
        """The URL without userinfo: safe to show and to log."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme.value}://{host}:{self.port}"

    def same_endpoint(self, other: ProxySpec) -> bool:
        return (self.scheme, self.host, self.port) == (other.scheme, other.host, other.port)

    def keeping_credentials_of(self, stored: ProxySpec | None) -> ProxySpec:
        """A PATCH with the same endpoint and no userinfo keeps what was stored."""
        if stored is not None and not self.has_credentials and self.same_endpoint(stored):
            return replace(self, username=stored.username, password=stored.password)
        return self


def parse_dns_servers(values: list[str] | None) -> tuple[str, ...]:
    if values is None:
        return DEFAULT_DNS_SERVERS
    if not isinstance(values, list):
        raise InvalidInput("dns_servers must be an array of IP addresses")
    if len(values) > MAX_DNS_SERVERS:
        raise InvalidInput(f"dns_servers accepts at most {MAX_DNS_SERVERS} addresses")
    out: list[str] = []
    for value in values:
        try:
            out.append(str(ipaddress.ip_address(value)))
        except (ValueError, TypeError):
            raise InvalidInput(f"Invalid DNS server address '{value}'") from None
    return tuple(out)


@dataclass(frozen=True)
class NetworkConfig:
    """The desired network policy of one container (what PATCH stores)."""

    type: NetworkType
    proxy: ProxySpec | None
    dns_servers: tuple[str, ...] = DEFAULT_DNS_SERVERS
    country: str | None = None
    city: str | None = None
    region: str | None = None
    comment: str | None = None

    def __post_init__(self) -> None:
        if self.type.is_proxy and self.proxy is None:
            raise InvalidInput("Proxy URL required for non-block type")
        if not self.type.is_proxy and self.proxy is not None:
            raise InvalidInput("Proxy URL must be empty for type 'block'")


@dataclass(frozen=True)
class Allocation:
    """Host-side resources reserved for one container's proxy enforcement.

    In the subnet: ``.1`` is the bridge, ``.2`` the relay listener, ``.3``
    the container's ``egress0``.
    """

    subnet: ipaddress.IPv4Network
    bridge_name: str
    port: int

    @property
    def bridge_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 1

    @property
    def listener_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 2

    @property
    def container_ip(self) -> ipaddress.IPv4Address:
        return self.subnet.network_address + 3

    @property
    def prefixlen(self) -> int:
        return self.subnet.prefixlen


def bridge_name_for(container_id: str) -> str:
    """``br-`` + 12 hex of the id: 15 characters, the IFNAMSIZ limit."""
    return f"br-{container_id[:12]}"


def host_veth_name_for(container_id: str) -> str:
    return f"ve-{container_id[:12]}"


def format_timestamp(ts: datetime) -> str:
    """``2025-01-15T10:00:00.000Z``, the spec's timestamp format."""
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"
