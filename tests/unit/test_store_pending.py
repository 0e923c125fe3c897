"""The SQL filter for pending containers agrees with the agent's own rule."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from egressd.agent.runner import _pending
from egressd.daemon import open_store
from egressd.model import DesiredState, NetworkConfig, NetworkType, Status
from egressd.settings import Settings
from egressd.store.repository import Observation


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


def test_observations_of_a_round_are_written_together(tmp_path: Path) -> None:
    """New rows, updated rows and deleted containers, across more ids than one IN list holds."""
    store = open_store(Settings(data_dir=tmp_path))
    ids = [store.create_container(container_id=None, name=None, owner=None, runtime="netns",
                                  ref=f"n{i}").id for i in range(1203)]  # fmt: skip
    store.record_observed(
        ids[0], status=Status.STOPPED, reason=None, is_running=False,
        observed_generation=1, applied={"type": "block"},
    )  # fmt: skip
    store.delete_container(ids[1])
    upstream = {"reachable": False, "last_error": "refused"}
    store.record_observations(
        [
            Observation(cid, status=Status.ERROR, reason="down", is_running=True,
                        observed_generation=7, applied=None, upstream=upstream)
            for cid in ids
        ]
    )  # fmt: skip
    seen = {cid: store.get_network(cid).observed for cid in (ids[0], ids[2], ids[-1])}
    for observed in seen.values():
        assert observed is not None and observed.status is Status.ERROR
        assert observed.observed_generation == 7 and observed.upstream == upstream
    assert ids[1] not in {c.id for c in store.list_containers()}
    store.engine.dispose()
