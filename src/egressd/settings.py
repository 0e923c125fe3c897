"""Runtime settings (pydantic-settings, env prefix ``EGRESSD_``).

A ``Settings`` object is built once by the CLI and passed down; nothing
imports a global settings instance.

Multi-host: every process names the ``node`` it runs for. An agent reconciles
only its node's containers and sends a heartbeat every ``heartbeat_interval``
seconds; the API treats a node not heard from for ``node_timeout`` seconds
(default three heartbeats) as having no live agent.
"""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# A node (host) name: also the payload of the agents' wake-up NOTIFY, so never "*".
NODE_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EGRESSD_", extra="ignore")

    data_dir: Path = Path("./var")
    database_url: str | None = None  # default: sqlite file under data_dir
    node: str = Field(default="local", pattern=NODE_NAME_PATTERN)
    pool: ipaddress.IPv4Network = ipaddress.IPv4Network("10.20.0.0/16")
    subnet_prefix: int = Field(default=29, ge=16, le=29)
    relay_port: int = Field(default=1080, ge=1, le=65535)
    nft_table: str = Field(default="egressd", pattern=r"^[A-Za-z][A-Za-z0-9_]{0,30}$")
    # How long start/stop/DELETE wait for the agent to report (seconds).
    apply_timeout: float = 15.0
    # Periodic resync of the reconciler, even without wake-ups (seconds).
    resync_interval: float = 30.0
    # Health probe of each running container's upstream proxy (seconds).
    probe_interval: float = 10.0
    upstream_timeout: float = 5.0
    # Send the SOCKS5 CONNECT with the greeting (and credentials) in one write instead of
    # waiting for each reply: one round trip less per connection. dante accepts it; a
    # server that drops bytes sent ahead of its reply (microsocks) needs this off.
    socks5_pipelining: bool = True
    # Extra CA certificates (PEM) trusted for `https` proxies, on top of the system store.
    upstream_ca_file: Path | None = None
    max_body_bytes: int = 16 * 1024
    # Agents record that they are alive this often (seconds).
    heartbeat_interval: float = Field(default=5.0, gt=0)
    # No heartbeat for this long: the node's agent is not alive (default 3 x heartbeat).
    node_timeout: float | None = Field(default=None, gt=0)

    @field_validator("pool", mode="before")
    @classmethod
    def _pool(cls, value: object) -> object:
        return ipaddress.IPv4Network(str(value), strict=True)

    def upstream_ssl_context(self) -> ssl.SSLContext:
        """TLS to `https` proxies: always verified (system store + ``upstream_ca_file``)."""
        context = ssl.create_default_context()
        if self.upstream_ca_file is not None:
            context.load_verify_locations(cafile=str(self.upstream_ca_file))
        return context

    @property
    def effective_node_timeout(self) -> float:
        return self.node_timeout or 3 * self.heartbeat_interval

    @property
    def uses_postgresql(self) -> bool:
        return self.effective_database_url.startswith("postgresql")

    @property
    def effective_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'egressd.db').resolve()}"
