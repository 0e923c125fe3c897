"""Store views to the JSON shapes of the spec. Credentials never leave here."""

from __future__ import annotations

from typing import Any

from egressd.api.envelopes import iso
from egressd.model import Status
from egressd.store import ContainerView, NetworkView


def bridge_details(view: NetworkView) -> dict[str, Any] | None:
    desired, alloc = view.desired, view.allocation
    if desired is None or alloc is None or not desired.config.type.is_proxy:
        return None
    return {
        "bridge_name": alloc.bridge_name,
        "bridge_ip": str(alloc.bridge_ip),
        "gost_listener_ip": str(alloc.listener_ip),
        "port": alloc.port,
    }


def status_of(view: NetworkView) -> Status | None:
    if view.desired is None:
        return None
    if view.observed is None:
        return Status.CONFIGURED
    return view.observed.status


def network_config(view: NetworkView) -> dict[str, Any]:
    """The body of PATCH's answer: the configuration as stored."""
    desired = view.desired
    assert desired is not None
    cfg = desired.config
    status = status_of(view)
    return {
        "container_id": view.container.id,
        "type": cfg.type.value,
        "proxy": cfg.proxy.endpoint_url if cfg.proxy else None,
        "credentials_configured": bool(cfg.proxy and cfg.proxy.has_credentials),
        "country": cfg.country,
        "city": cfg.city,
        "region": cfg.region,
        "comment": cfg.comment,
        "dns_servers": list(cfg.dns_servers),
        "status": status.value if status else None,
        "status_reason": view.observed.reason if view.observed else None,
        "configured_at": iso(desired.configured_at),
        "bridge_details": bridge_details(view),
    }


def network_status(view: NetworkView) -> dict[str, Any]:
    """The body of GET: configuration plus what the agent observed."""
    if view.desired is None:
        return {
            "container_id": view.container.id,
            "configured": False,
            "type": None,
            "proxy": None,
            "credentials_configured": False,
            "status": None,
            "remote_status": None,
        }
    data = network_config(view)
    observed = view.observed
    data["configured"] = True
    data["last_status_check"] = iso(observed.last_check) if observed else None
    data["remote_status"] = {
        "is_running": bool(observed and observed.is_running),
        "last_check": iso(observed.last_check) if observed else None,
        "bridge_details": data["bridge_details"],
        "upstream": observed.upstream if observed else None,
    }
    del data["bridge_details"]
    order = ["container_id", "configured"]
    return {k: data[k] for k in order} | {k: v for k, v in data.items() if k not in order}


def service_state(view: NetworkView) -> dict[str, Any]:
    """The body of start/stop answers."""
    status = status_of(view)
    observed = view.observed
    return {
        "container_id": view.container.id,
        "status": status.value if status else None,
        "status_reason": observed.reason if observed else None,
        "is_running": bool(observed and observed.is_running),
        "last_check": iso(observed.last_check) if observed else None,
        "bridge_details": bridge_details(view),
    }


def container(view: ContainerView) -> dict[str, Any]:
    return {
        "id": view.id,
        "name": view.name,
        "owner": view.owner,
        "runtime": view.runtime,
        "ref": view.ref,
        "node": view.node,
        "created_at": iso(view.created_at),
    }
