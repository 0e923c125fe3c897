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
    runtime: Literal["netns"] = "netns"
    ref: str = Field(min_length=1, max_length=256, description="network namespace name")


class TokenCreate(_Strict):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.@-]+$")
    admin: bool = False
