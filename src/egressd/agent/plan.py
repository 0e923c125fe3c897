"""Reconcile planning, pure: (desired, what we applied) -> steps.

The runner executes the steps with real I/O. Keeping the decision here
makes the lifecycle testable without root: which transitions tear down
first, when the store forgets a configuration, when the relay listener
opens (always after the kernel walls are in).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from egressd.model import DesiredState, NetworkType
from egressd.store import NetworkView


class Step(enum.Enum):
    TEARDOWN = "teardown"  # remove what ``applied`` says we put in the kernel + relay
    APPLY_BLOCK = "apply_block"
    APPLY_PROXY = "apply_proxy"  # kernel walls, bridge, veth, routes
    OPEN_LISTENER = "open_listener"  # relay listener (after the walls)
    PROBE_UPSTREAM = "probe_upstream"
    FORGET = "forget"  # drop the configuration from the store (DELETE finished)
    RECORD_IDLE = "record_idle"  # acknowledge a configured/stopped state
    RECORD_LOST = "record_lost"  # the container's namespace cannot be found: error


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    generation: int


def applied_type(applied: dict[str, Any] | None) -> NetworkType | None:
    if not applied or "type" not in applied:
        return None
    return NetworkType(applied["type"])


def plan(view: NetworkView, *, netns_path: str | None, applied_netns_exists: bool = True) -> Plan:
    """Steps that bring the kernel and relay to ``view.desired``.

    ``netns_path`` is where the container's namespace is now (None when it
    cannot be found); a change of namespace means tearing down the old.
    ``applied_netns_exists`` says whether the namespace we enforced on is
    still there: when the runtime cannot find the container but that
    namespace still exists (a runtime API hiccup), nothing is torn down —
    the walls stay and traffic fails closed. When it is gone, the host-side
    leftovers are removed.
    """
    desired = view.desired
    applied = view.observed.applied if view.observed else None
    have = applied_type(applied)
    generation = desired.generation if desired else 0
    state = desired.desired_state if desired else DesiredState.ABSENT

    if state is not DesiredState.RUNNING:
        steps: list[Step] = [Step.TEARDOWN] if have is not None else []
        observed = view.observed
        if state is DesiredState.ABSENT:
            steps.append(Step.FORGET)
        elif (
            have is not None
            or observed is None
            or observed.observed_generation != generation
            or observed.status.value != state.value
        ):
            steps.append(Step.RECORD_IDLE)
        return Plan(tuple(steps), generation)

    assert desired is not None
    if netns_path is None:
        gone = have is not None and not applied_netns_exists
        return Plan((Step.TEARDOWN, Step.RECORD_LOST) if gone else (Step.RECORD_LOST,), generation)
    want = desired.config.type
    steps = []
    moved = applied is not None and applied.get("netns_path") not in (None, netns_path)
    if have is not None and (have.is_proxy != want.is_proxy or moved):
        steps.append(Step.TEARDOWN)
    if want.is_proxy:
        steps += [Step.APPLY_PROXY, Step.OPEN_LISTENER, Step.PROBE_UPSTREAM]
    else:
        steps.append(Step.APPLY_BLOCK)
    return Plan(tuple(steps), generation)
