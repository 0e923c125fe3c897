"""The agent's SQL filters agree with its own rules; what its writes change."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from egressd.agent.runner import _pending
from egressd.daemon import open_store
from egressd.errors import NotFound
from egressd.model import DesiredState, NetworkConfig, NetworkType, ProxySpec, Status
from egressd.settings import Settings
from egressd.store import NetworkView
from egressd.store.repository import HealthUpdate


def test_only_pending_matches_the_agents_rule(tmp_path: Path) -> None:
    store = open_store(Settings(data_dir=tmp_path))
    pool = ipaddress.IPv4Network("10.20.0.0/24")
    block = NetworkConfig(type=NetworkType.BLOCK, proxy=None)
    ids = [store.create_container(container_id=None, name=None, owner=None, runtime="netns",
                                  ref=f"n{i}").id for i in range(6)]  # fmt: skip
    for cid in ids[:5]:
        store.put_config(cid, block, pool=pool, prefix=29, port=1080)
    # 0: never observed. 1: observed at its generation. 2: observed at an older one.
    # 3: failed apply (error, not running). 4: error while running (upstream down).
    # 5: no config but a status row left (removed configuration).
    gen = {cid: store.set_desired_state(cid, DesiredState.RUNNING) for cid in ids[:5]}
    for cid, status, running, generation in (
        (ids[1], Status.RUNNING, True, gen[ids[1]]),
        (ids[2], Status.RUNNING, True, gen[ids[2]] - 1),
        (ids[3], Status.ERROR, False, gen[ids[3]]),
        (ids[4], Status.ERROR, True, gen[ids[4]]),
        (ids[5], Status.STOPPED, False, 0),
    ):
        store.record_observed(
            cid, status=status, reason=None, is_running=running,
            observed_generation=generation, applied=None,
        )  # fmt: skip
    everything = store.list_networks(node="local")
    expected = sorted(v.container.id for v in everything if _pending(v))
    got = sorted(v.container.id for v in store.list_networks(node="local", only_pending=True))
    assert got == expected == sorted([ids[0], ids[2], ids[3], ids[5]])
    # The list reads the same views as the per-container read (ids[5]'s config is gone).
    assert everything == [store.get_network(v.container.id) for v in everything]
    assert [v.container.id for v in everything] == sorted(ids)
    store.engine.dispose()


def test_observed_record_is_written_then_updated_and_skipped_once_deleted(
    tmp_path: Path,
) -> None:
    store = open_store(Settings(data_dir=tmp_path))
    kept, gone = [store.create_container(container_id=None, name=None, owner=None,
                                         runtime="netns", ref=f"n{i}").id
                  for i in range(2)]  # fmt: skip
    store.record_observed(
        kept, status=Status.STOPPED, reason=None, is_running=False,
        observed_generation=1, applied={"type": "block"},
    )  # fmt: skip
    upstream = {"reachable": False, "last_error": "refused"}
    store.record_observed(
        kept, status=Status.ERROR, reason="down", is_running=True,
        observed_generation=7, applied=None, upstream=upstream,
    )  # fmt: skip
    observed = store.get_network(kept).observed
    assert observed is not None and observed.last_check is not None
    assert (observed.status, observed.reason, observed.is_running) == (Status.ERROR, "down", True)
    assert (observed.observed_generation, observed.applied, observed.upstream) == (
        7,
        None,
        upstream,
    )
    store.delete_container(gone)
    store.record_observed(
        gone, status=Status.RUNNING, reason=None, is_running=True,
        observed_generation=1, applied=None,
    )  # deleted meanwhile: nothing written, no error  # fmt: skip
    assert [c.id for c in store.list_containers()] == [kept]
    with pytest.raises(NotFound):
        store.get_network(gone)
    store.engine.dispose()


def _socks5(url: str) -> NetworkConfig:
    return NetworkConfig(
        type=NetworkType.SOCKS5, proxy=ProxySpec.parse(url, expected=NetworkType.SOCKS5)
    )


def test_probe_targets_are_the_settled_running_proxies(tmp_path: Path) -> None:
    """The probe round's slim list selects what the agent's rule over full views selects."""
    store = open_store(Settings(data_dir=tmp_path))
    pool = ipaddress.IPv4Network("10.20.0.0/24")
    shared = _socks5("socks5://198.18.0.1:1080")
    configs = {
        "running": shared,
        "upstream-down": shared,  # error while running: still probed, may recover
        "with-credentials": _socks5("socks5://u:p@198.18.0.2:1080"),
        "block": NetworkConfig(type=NetworkType.BLOCK, proxy=None),
        "stopping": shared,  # desired stopped, not yet acted on
        "stopped-while-running": shared,  # a record that says running at a stopped generation
        "older-generation": shared,
        "failed-apply": shared,
        "never-observed": shared,
        "other-node": shared,
    }
    ids = {}
    for name, config in configs.items():
        ids[name] = store.create_container(
            container_id=None, name=name, owner=None, runtime="netns", ref=name,
            node="elsewhere" if name == "other-node" else None,
        ).id  # fmt: skip
        store.put_config(ids[name], config, pool=pool, prefix=29, port=1080)
        generation = store.set_desired_state(ids[name], DesiredState.RUNNING)
        if name == "stopped-while-running":
            generation = store.set_desired_state(ids[name], DesiredState.STOPPED)
        status, running = Status.RUNNING, True
        if name == "upstream-down":
            status = Status.ERROR
        elif name == "failed-apply":
            status, running = Status.ERROR, False
        elif name == "older-generation":
            generation -= 1
        if name != "never-observed":
            store.record_observed(
                ids[name], status=status, reason=None, is_running=running,
                observed_generation=generation, applied={"type": config.type.value},
            )  # fmt: skip
        if name == "stopping":
            store.set_desired_state(ids[name], DesiredState.STOPPED)

    def probed(v: NetworkView) -> bool:  # the rule probe_all applied to the full list
        return (
            not _pending(v)
            and v.desired is not None
            and v.desired.desired_state is DesiredState.RUNNING
            and v.desired.config.proxy is not None
            and v.observed is not None
            and v.observed.is_running
        )

    views = [v for node in ("local", "elsewhere") for v in store.list_networks(node=node)]
    expected = sorted(
        (v.container.id, v.desired.config.proxy, v.observed.status)  # type: ignore[union-attr]
        for v in views
        if probed(v) and v.container.node == "local"
    )
    got = [(t.container_id, t.proxy, t.status) for t in store.probe_targets(node="local")]
    assert got == expected
    assert {cid for cid, _, _ in got} == {
        ids["running"],
        ids["upstream-down"],
        ids["with-credentials"],
    }
    credentials = next(t.proxy for t in store.probe_targets(node="local")
                       if t.container_id == ids["with-credentials"])  # fmt: skip
    assert (credentials.username, credentials.password) == ("u", "p")
    assert [t.container_id for t in store.probe_targets(node="elsewhere")] == [ids["other-node"]]
    store.engine.dispose()


def test_health_of_a_round_changes_only_the_health(tmp_path: Path) -> None:
    """Status, reason, upstream and check time, for the listed ids (more than one IN list)."""
    store = open_store(Settings(data_dir=tmp_path))
    ids = [store.create_container(container_id=None, name=None, owner=None, runtime="netns",
                                  ref=f"n{i}").id for i in range(1203)]  # fmt: skip
    applied = {"type": "socks5", "netns_path": "/run/netns/x", "saved_routes": []}
    for cid in ids:
        store.record_observed(
            cid, status=Status.RUNNING, reason=None, is_running=True,
            observed_generation=4, applied=applied, upstream={"reachable": True},
        )  # fmt: skip
    before = {cid: store.get_network(cid).observed for cid in (ids[0], ids[1202])}
    store.delete_container(ids[1])  # deleted meanwhile: nothing to update
    down = {"reachable": False, "last_error": "refused"}
    store.record_health(
        [
            HealthUpdate(ids[:1200], status=Status.ERROR, reason="down", upstream=down),
            HealthUpdate([], status=Status.RUNNING, reason=None, upstream={"reachable": True}),
        ]
    )
    for cid in (ids[0], ids[2], ids[1199]):
        observed = store.get_network(cid).observed
        assert observed is not None
        assert (observed.status, observed.reason, observed.upstream) == (Status.ERROR, "down", down)
        assert (observed.is_running, observed.observed_generation, observed.applied) == (
            True, 4, applied
        )  # fmt: skip
        assert observed.last_check is not None
        assert observed.last_check > before[ids[0]].last_check  # type: ignore[union-attr,operator]
    untouched = store.get_network(ids[1202]).observed
    assert untouched == before[ids[1202]]
    assert ids[1] not in {c.id for c in store.list_containers()}
    store.engine.dispose()
