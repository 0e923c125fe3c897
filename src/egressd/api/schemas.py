"""Request bodies. Strict: unknown fields and wrong JSON types are 400s."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from egressd.model import (
    MAX_COMMENT_LEN,
    MAX_DNS_SERVERS,
    MAX_LOCATION_LEN,
    MAX_PROXY_URL_LEN,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class NetworkConfigUpdate(_Strict):
    """PATCH body. Optional fields left out keep their stored value; ``null`` clears."""

    type: Literal["socks5", "http", "https", "block"]
    proxy: str | None = Field(
        default=None,
        max_length=MAX_PROXY_URL_LEN,
        examples=["socks5://user:pass@proxy.example.com:1080"],
    )
    country: str | None = Field(default=None, max_length=MAX_LOCATION_LEN)
    city: str | None = Field(default=None, max_length=MAX_LOCATION_LEN)
    region: str | None = Field(default=None, max_length=MAX_LOCATION_LEN)
    comment: str | None = Field(default=None, max_length=MAX_COMMENT_LEN)
    dns_servers: list[str] | None = Field(default=None, max_length=MAX_DNS_SERVERS)


class ContainerCreate(_Strict):
    id: str | None = Field(default=None, description="24 hex; generated when absent")
    name: str | None = Field(default=None, max_length=128)
    owner: str | None = Field(default=None, max_length=64, description="principal name")
    runtime: Literal["netns", "pid", "path", "docker", "podman"] = "netns"
    ref: str = Field(
        min_length=1,
        max_length=256,
        description=(
            "netns: namespace name (/run/netns/<ref>); pid: process id; "
            "path: absolute netns file path (CNI); docker/podman: container name or id"
        ),
        examples=["web-1"],
    )
    node: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",  # settings.NODE_NAME_PATTERN
        description="node (host) the container lives on; default: the API server's node",
    )


class TokenCreate(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    admin: bool = False
