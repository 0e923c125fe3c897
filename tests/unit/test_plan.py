"""Reconcile planning: which steps for which (desired, applied) pair."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Any

from egressd.agent.plan import Step, plan
from egressd.model import Allocation, DesiredState, NetworkConfig, NetworkType, ProxySpec, Status
from egressd.store import ContainerView, DesiredView, NetworkView, ObservedView

NOW = datetime(2026, 1, 1, tzinfo=UTC)
CONTAINER = ContainerView("a" * 24, None, None, None, "netns", "ns", "local", NOW)
ALLOC = Allocation(ipaddress.IPv4Network("10.20.0.0/29"), "br-aaaaaaaaaaaa", 1080)


def view(
    state: DesiredState | None,
    ntype: NetworkType = NetworkType.SOCKS5,
    applied: dict[str, Any] | None = None,
    status: Status | None = None,
    observed_generation: int = 0,
) -> NetworkView:
    desired = None
    if state is not None:
        proxy = ProxySpec.parse(f"{ntype.value}://h:1", expected=ntype) if ntype.is_proxy else None
        desired = DesiredView(NetworkConfig(type=ntype, proxy=proxy), state, 3, NOW)
    observed = None
    if status is not None:
        observed = ObservedView(status, None, False, observed_generation, NOW, applied, None)
    return NetworkView(CONTAINER, desired, ALLOC, observed)


def test_start_proxy_opens_listener_after_walls() -> None:
    p = plan(view(DesiredState.RUNNING), netns_path="/run/netns/ns")
    assert p.steps == (Step.APPLY_PROXY, Step.OPEN_LISTENER, Step.PROBE_UPSTREAM)
    assert p.generation == 3


def test_start_block() -> None:
    steps = plan(view(DesiredState.RUNNING, NetworkType.BLOCK), netns_path="/x").steps
    assert steps == (Step.APPLY_BLOCK,)


def test_switch_block_to_proxy_tears_down_first() -> None:
    v = view(
        DesiredState.RUNNING, applied={"type": "block", "netns_path": "/x"}, status=Status.RUNNING
    )
    assert plan(v, netns_path="/x").steps[0] is Step.TEARDOWN


def test_proxy_to_proxy_swaps_without_teardown() -> None:
    v = view(
        DesiredState.RUNNING,
        NetworkType.HTTP,
        applied={"type": "socks5", "netns_path": "/x"},
        status=Status.RUNNING,
    )
    assert Step.TEARDOWN not in plan(v, netns_path="/x").steps


def test_namespace_moved_tears_down_old() -> None:
    v = view(
        DesiredState.RUNNING,
        applied={"type": "socks5", "netns_path": "/old"},
        status=Status.RUNNING,
    )
    assert plan(v, netns_path="/new").steps[0] is Step.TEARDOWN


def test_stop_tears_down_then_records() -> None:
    v = view(
        DesiredState.STOPPED, applied={"type": "socks5", "netns_path": "/x"}, status=Status.RUNNING
    )
    assert plan(v, netns_path="/x").steps == (Step.TEARDOWN, Step.RECORD_IDLE)


def test_idle_already_recorded_does_nothing() -> None:
    v = view(DesiredState.STOPPED, status=Status.STOPPED, observed_generation=3)
    assert plan(v, netns_path="/x").steps == ()


def test_delete_tears_down_then_forgets() -> None:
    v = view(
        DesiredState.ABSENT, applied={"type": "block", "netns_path": "/x"}, status=Status.RUNNING
    )
    assert plan(v, netns_path=None).steps == (Step.TEARDOWN, Step.FORGET)
    assert plan(view(DesiredState.ABSENT), netns_path=None).steps == (Step.FORGET,)


def test_namespace_gone_removes_host_leftovers_and_reports() -> None:
    v = view(
        DesiredState.RUNNING,
        applied={"type": "socks5", "netns_path": "/gone"},
        status=Status.RUNNING,
    )
    p = plan(v, netns_path=None, applied_netns_exists=False)
    assert p.steps == (Step.TEARDOWN, Step.RECORD_LOST)


def test_runtime_hiccup_keeps_the_walls() -> None:
    v = view(
        DesiredState.RUNNING, applied={"type": "socks5", "netns_path": "/x"}, status=Status.RUNNING
    )
    assert plan(v, netns_path=None, applied_netns_exists=True).steps == (Step.RECORD_LOST,)
    assert plan(view(DesiredState.RUNNING), netns_path=None).steps == (Step.RECORD_LOST,)
