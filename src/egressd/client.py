"""Typed Python client of the egressd API.

Calls mirror the spec's client (``client.api.containers.getNetworkConfig``)::

    from egressd.client import Client
    with Client("http://127.0.0.1:8080", token="egd_...") as client:
        client.containers.update_network_config(
            id="507f1f77bcf86cd799439012",
            data={"type": "socks5", "proxy": "socks5://user:pass@10.0.0.5:1080"},
        )
        client.containers.start_network(id="507f1f77bcf86cd799439012")

Every call returns the envelope's ``data`` (or ``None``) and raises
:class:`ApiError` for an error envelope. ``transport`` is httpx's seam: tests
pass an ``httpx.ASGITransport`` or ``httpx.MockTransport``.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import httpx


class ApiError(Exception):
    def __init__(
        self, status_code: int, error: str, message: str, reason: str | None = None
    ) -> None:
        super().__init__(f"{status_code} {error}: {message}" + (f" ({reason})" if reason else ""))
        self.status_code = status_code
        self.error = error
        self.message = message
        self.reason = reason


class _Containers:
    def __init__(self, client: Client) -> None:
        self._c = client

    def get_network_config(self, *, id: str) -> dict[str, Any]:
        return self._c.request("GET", f"/api/v1/containers/{id}/network")  # type: ignore[no-any-return]

    def update_network_config(self, *, id: str, data: dict[str, Any]) -> dict[str, Any]:
        return self._c.request("PATCH", f"/api/v1/containers/{id}/network", json=data)  # type: ignore[no-any-return]

    def start_network(self, *, id: str) -> dict[str, Any]:
        return self._c.request("POST", f"/api/v1/containers/{id}/network/start")  # type: ignore[no-any-return]

    def stop_network(self, *, id: str) -> dict[str, Any]:
        return self._c.request("POST", f"/api/v1/containers/{id}/network/stop")  # type: ignore[no-any-return]

    def remove_network_config(self, *, id: str) -> None:
        self._c.request("DELETE", f"/api/v1/containers/{id}/network")

    # Around the contract
    def create(
        self,
        *,
        ref: str,
        runtime: str = "netns",
        id: str | None = None,
        name: str | None = None,
        owner: str | None = None,
        node: str | None = None,
    ) -> dict[str, Any]:
        body = {
            "ref": ref,
            "runtime": runtime,
            "id": id,
            "name": name,
            "owner": owner,
            "node": node,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return self._c.request("POST", "/api/v1/containers", json=body)  # type: ignore[no-any-return]

    def list(self) -> list[dict[str, Any]]:
        return self._c.request("GET", "/api/v1/containers")  # type: ignore[no-any-return]

    def get(self, *, id: str) -> dict[str, Any]:
        return self._c.request("GET", f"/api/v1/containers/{id}")  # type: ignore[no-any-return]

    def delete(self, *, id: str) -> None:
        self._c.request("DELETE", f"/api/v1/containers/{id}")


class _Tokens:
    def __init__(self, client: Client) -> None:
        self._c = client

    def create(self, *, name: str, admin: bool = False) -> dict[str, Any]:
        body = {"name": name, "admin": admin}
        return self._c.request("POST", "/api/v1/auth/tokens", json=body)  # type: ignore[no-any-return]


class Client:
    def __init__(
        self,
        base_url: str,
        *,
        token: str | None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=base_url, headers=headers, timeout=timeout, transport=transport
        )
        self.containers = _Containers(self)
        self.tokens = _Tokens(self)

    def request(self, method: str, path: str, *, json: Any = None) -> Any:
        response = self._http.request(method, path, json=json)
        try:
            body = response.json()
        except ValueError:
            raise ApiError(response.status_code, response.reason_phrase, response.text) from None
        if response.status_code >= 400:
            raise ApiError(
                response.status_code,
                str(body.get("error", response.reason_phrase)),
                str(body.get("message", "")),
                body.get("reason"),
            )
        return body.get("data")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
