"""The agent: a level-triggered reconciler thread beside the relay's event loop.

Concurrency model: one reconciler thread does every kernel operation, one
container after another (netlink and ``nft`` are blocking and must not
interleave for one container). The relay lives on an asyncio loop owned by
the caller; the thread reaches it with ``run_coroutine_threadsafe``. The
thread wakes on ``Wakeups.notify_agent()`` or every ``resync_interval``.

Crash safety: before touching the kernel for a container, the runner
records *what it is about to apply* in the observed record, so a crash
half-way leaves enough in the store for the next pass (or ``stop``) to undo
it. A crash is not a stop: nothing is removed on exit, so the kernel walls
stay and traffic fails closed while the agent is down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from egressd import gil
from egressd.agent.gc_schedule import FullCollections
from egressd.agent.plan import Step, applied_type, plan
from egressd.agent.ports import Dataplane, RelayPort
from egressd.errors import EgressdError, NotFound, RuntimeLookupError
from egressd.model import Allocation, ProxySpec, Status
from egressd.runtimes import resolve_netns
from egressd.settings import Settings
from egressd.store import NetworkView, Store
from egressd.store.repository import HealthUpdate
from egressd.store.wakeups import Wakeups

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Pass:
    """One reconcile of one container: what it has applied so far."""

    view: NetworkView
    generation: int
    netns_path: str | None
    applied: dict[str, Any] | None = None
    upstream: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        observed = self.view.observed
        if observed is not None:
            self.applied = dict(observed.applied) if observed.applied else None
            self.upstream = observed.upstream


def _pending(view: NetworkView) -> bool:
    """Whether the agent has not yet acted on the latest desired state."""
    if view.desired is None:
        return True  # leftovers of a removed configuration
    observed = view.observed
    if observed is None or observed.observed_generation != view.desired.generation:
        return True
    # A failed apply (namespace missing, kernel error) is retried on every wake-up.
    return observed.status is Status.ERROR and not observed.is_running


class Agent:
    def __init__(
        self,
        *,
        settings: Settings,
        store: Store,
        wakeups: Wakeups,
        dataplane: Dataplane,
        relay: RelayPort,
        loop: asyncio.AbstractEventLoop,
        resolve: Callable[[str, str], str] = resolve_netns,
    ) -> None:
        self.resolve = resolve
        self.settings = settings
        self.store = store
        self.wakeups = wakeups
        self.dataplane = dataplane
        self.relay = relay
        self.loop = loop
        self._stopping = threading.Event()
        # Until the first full pass is done, adopted containers get their
        # observed record refreshed: what is stored predates this process.
        self._fresh_start = True
        self._thread: threading.Thread | None = None
        self._collections = FullCollections()

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        self.dataplane.ensure_host_base(self.settings.nft_table)
        self._thread = threading.Thread(target=self._run, name="egressd-agent", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop reconciling. Kernel state stays: traffic keeps failing closed."""
        self._stopping.set()
        self.wakeups.notify_agent()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        # Held by this thread, so given back however it ends (see gc_schedule).
        self._collections.take_over()
        try:
            self._reconcile_until_stopped()
        finally:
            self._collections.give_back()

    def _reconcile_until_stopped(self) -> None:
        now = time.monotonic()
        # The first pass adopts; the first probe round follows it at once.
        next_resync, next_probe = now, now
        while not self._stopping.is_set():
            now = time.monotonic()
            try:
                if now >= next_resync:
                    # Level-triggered safety net: every container, changed or not.
                    self.reconcile_all(only_pending=False)
                    self.collect_garbage()
                    self._fresh_start = False
                    next_resync = time.monotonic() + self.settings.resync_interval
                else:
                    self.reconcile_all(only_pending=True)
                if time.monotonic() >= next_probe:
                    self.probe_all()
                    next_probe = time.monotonic() + self.settings.probe_interval
            except Exception:
                log.exception("reconcile pass failed")
            now = time.monotonic()
            self._collections.run_if_due()  # between passes (see gc_schedule)
            wait = min(next_resync - now, next_probe - now, self._collections.due_in())
            self.wakeups.wait_for_work(max(wait, 0.0))

    # -- garbage collection ----------------------------------------------------------

    def collect_garbage(self) -> None:
        """Remove host-side kernel objects and listeners that no container here owns.

        "Owned" means: a container of this node whose observed record says we
        applied a proxy enforcement. Everything else carrying our tag in the
        host table (chains ``c-<id>-*``, the bridge and veth of that id) or
        listening in the relay is a leftover (a crash between apply and
        record, a container deleted while the agent was down) and goes.
        Containers' own walls are inside their namespaces and are undone by
        their own teardown.
        """
        owned = {
            v.container.id
            for v in self.store.list_networks(node=self.settings.node)
            if v.observed is not None
            and (kind := applied_type(v.observed.applied)) is not None
            and kind.is_proxy
        }
        table = self.settings.nft_table
        for cid in sorted(self.dataplane.enforced_container_ids(table) - owned):
            log.warning("container %s: removing orphaned host rules, bridge and veth", cid)
            try:
                self.dataplane.remove(
                    container_id=cid, netns_path=None, allocation=None, saved_routes=[], table=table
                )
            except EgressdError as exc:
                log.warning("container %s: garbage collection failed: %s", cid, exc)
        for cid in sorted(self._on_loop(self.relay.listener_ids()) - owned):
            log.warning("container %s: closing orphaned relay listener", cid)
            self._on_loop(self.relay.remove_listener(cid))

    # -- health --------------------------------------------------------------------

    def probe_all(self) -> None:
        """Probe the upstream of every running proxy container; flip running <-> error.

        Runs in the reconciler thread (the only writer of observed state), the
        probes themselves concurrently on the relay loop, bounded in number.
        """
        targets = self.store.probe_targets(node=self.settings.node)
        if not targets:
            return

        # One probe per distinct upstream (endpoint and credentials), however
        # many containers share it: hundreds of containers behind one proxy
        # must not mean hundreds of handshakes every round.
        specs = list(dict.fromkeys(target.proxy for target in targets))

        async def probe_many() -> list[dict[str, Any]]:
            limit = asyncio.Semaphore(64)

            async def one(spec: ProxySpec) -> dict[str, Any]:
                async with limit:
                    return await self.relay.probe(spec, timeout=self.settings.upstream_timeout)

            return await asyncio.gather(*(one(spec) for spec in specs))

        results = self._on_loop(probe_many(), timeout=self.settings.upstream_timeout * 4 + 30)
        health: dict[ProxySpec, tuple[Status, str | None, dict[str, Any]]] = {}
        for spec, upstream in zip(specs, results, strict=True):
            if upstream.get("reachable") and not upstream.get("last_error"):
                health[spec] = (Status.RUNNING, None, dict(upstream))
            else:
                failed = f"upstream proxy check failed: {upstream.get('last_error')}"
                health[spec] = (Status.ERROR, failed, dict(upstream))
        members: dict[ProxySpec, list[str]] = {spec: [] for spec in specs}
        for target in targets:
            status, reason, _ = health[target.proxy]
            if status is Status.RUNNING and target.status is Status.ERROR:
                log.info("container %s: upstream recovered", target.container_id)
            elif status is Status.ERROR and target.status is not Status.ERROR:
                log.warning("container %s: %s", target.container_id, reason)
            members[target.proxy].append(target.container_id)
        updates = [HealthUpdate(members[spec], *health[spec]) for spec in specs]
        # One transaction for the round, one statement per upstream (see Store.record_health).
        self.store.record_health(updates)
        self.wakeups.notify_observed()

    # -- reconcile -----------------------------------------------------------------

    def reconcile_all(self, *, only_pending: bool = False) -> None:
        """Converge every container of this node (or only those with unapplied changes)."""
        views = self.store.list_networks(node=self.settings.node, only_pending=only_pending)
        if not views:
            return
        # One read of the host table for the whole pass, not one per container.
        self.dataplane.begin_pass(self.settings.nft_table)
        try:
            self._reconcile_views(views, full=not only_pending)
        finally:
            self.dataplane.end_pass()

    def _reconcile_views(self, views: list[NetworkView], *, full: bool) -> None:
        for listed in views:
            gil.breathe()
            # A pass can outlast the interval (re-adopting a thousand containers,
            # timeouts): the full collections keep their pace meanwhile.
            self._collections.run_if_due()
            if self._stopping.is_set():
                return
            if full and self.wakeups.work_pending():
                # A start/stop came in during a long resync: serve it first,
                # within the same pass (the dataplane's host-table snapshot
                # stays valid: it knows which containers it changed).
                self.wakeups.wait_for_work(0)  # consume the wake-up
                pending = self.store.list_networks(node=self.settings.node, only_pending=True)
                self._reconcile_views(pending, full=False)
            try:
                # Fresh: the API may have changed it since the list was read,
                # and acting on a stale desired state could undo a newer one.
                view = self.store.get_network(listed.container.id)
                self.reconcile(view)
            except NotFound:
                continue  # deleted meanwhile
            except Exception:
                log.exception("container %s: reconcile failed", listed.container.id)
            self.wakeups.notify_observed()

    def _on_loop(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def reconcile(self, view: NetworkView) -> None:
        cid = view.container.id
        netns_path: str | None
        lookup_error: str | None = None
        try:
            netns_path = self.resolve(view.container.runtime, view.container.ref)
        except EgressdError as exc:
            netns_path, lookup_error = None, str(exc)
        applied = view.observed.applied if view.observed else None
        applied_path = applied.get("netns_path") if applied else None
        p = plan(
            view,
            netns_path=netns_path,
            applied_netns_exists=bool(applied_path) and os.path.exists(str(applied_path)),
        )
        pass_ = _Pass(view=view, generation=p.generation, netns_path=netns_path)
        try:
            for step in p.steps:
                self._execute(step, pass_, lookup_error)
        except EgressdError as exc:
            # Kernel walls already in place stay: a failed apply fails closed.
            log.warning("container %s: %s", cid, exc)
            self._record(pass_, Status.ERROR, str(exc), False)

    def _execute(self, step: Step, p: _Pass, lookup_error: str | None) -> None:
        view, cid, desired = p.view, p.view.container.id, p.view.desired
        table = self.settings.nft_table
        if step is Step.TEARDOWN:
            self._teardown(cid, p.applied, view.allocation)
            p.applied = None
            self._record(p, Status.STOPPED, None, False, generation=p.generation - 1)
        elif step is Step.FORGET:
            self.store.forget_network(cid, generation=p.generation)
            log.info("container %s: configuration removed", cid)
        elif step is Step.RECORD_LOST:
            reason = lookup_error or "network namespace not found"
            if p.applied is None:
                log.warning("container %s: %s; host-side leftovers removed", cid, reason)
            self._record(p, Status.ERROR, reason, p.applied is not None)
        elif step is Step.RECORD_IDLE:
            assert desired is not None
            self._record(p, Status(desired.desired_state.value), None, False)
        elif p.netns_path is None:
            raise RuntimeLookupError(lookup_error or "network namespace not found")
        elif step is Step.APPLY_BLOCK:
            assert desired is not None
            wanted: dict[str, Any] = {
                "type": desired.config.type.value,
                "netns_path": p.netns_path,
            }
            if not self._in_place(p, wanted, "block", None):
                self._about_to_apply(p, wanted)
                self.dataplane.apply_block(container_id=cid, netns_path=p.netns_path, table=table)
                log.info("container %s: block enforced", cid)
            observed = p.view.observed
            if _pending(view) or self._fresh_start or observed is None or not observed.is_running:
                self._record(p, Status.RUNNING, None, True)
        elif step is Step.APPLY_PROXY:
            assert desired is not None and view.allocation is not None
            saved = p.applied.get("saved_routes") if p.applied else None
            if saved is None:
                # Stored before the routes are replaced: a crash cannot lose the originals.
                saved = self.dataplane.record_routes(netns_path=p.netns_path)
            wanted = {
                "type": desired.config.type.value,
                "netns_path": p.netns_path,
                "saved_routes": saved,
            }
            if not self._in_place(p, wanted, "proxy", view.allocation):
                self._about_to_apply(p, wanted)
                self.dataplane.apply_proxy(
                    container_id=cid,
                    netns_path=p.netns_path,
                    allocation=view.allocation,
                    saved_routes=saved,
                    table=table,
                )
        elif step is Step.OPEN_LISTENER:
            assert desired is not None and desired.config.proxy and view.allocation
            self._on_loop(
                self.relay.ensure_listener(
                    container_id=cid,
                    listen_ip=str(view.allocation.listener_ip),
                    port=view.allocation.port,
                    upstream=desired.config.proxy,
                    dns_servers=desired.config.dns_servers,
                )
            )
        elif step is Step.PROBE_UPSTREAM:
            assert desired is not None and desired.config.proxy
            if not _pending(view):
                # Steady state: the probe round keeps health current (and
                # runs right after the first pass after a start).
                if self._fresh_start and view.observed is not None:
                    self._record(p, view.observed.status, view.observed.reason, True)
                return
            p.upstream = self._on_loop(
                self.relay.probe(desired.config.proxy, timeout=self.settings.upstream_timeout)
            )
            if p.upstream.get("reachable") and not p.upstream.get("last_error"):
                self._record(p, Status.RUNNING, None, True)
                log.info(
                    "container %s: proxy enforced via %s", cid, desired.config.proxy.endpoint_url
                )
            else:
                reason = f"upstream proxy check failed: {p.upstream.get('last_error')}"
                self._record(p, Status.ERROR, reason, True)

    def _in_place(
        self, p: _Pass, wanted: dict[str, Any], kind: str, allocation: Allocation | None
    ) -> bool:
        """Adopt instead of re-applying when the kernel already holds exactly this."""
        if p.applied is None or p.applied.get("type") is None or p.netns_path is None:
            return False
        if {k: p.applied.get(k) for k in wanted} != wanted:
            return False
        if self.dataplane.is_enforced(
            kind=kind,
            container_id=p.view.container.id,
            netns_path=p.netns_path,
            allocation=allocation,
            table=self.settings.nft_table,
        ):
            return True
        log.warning("container %s: enforcement drifted; re-applying", p.view.container.id)
        return False

    def _about_to_apply(self, p: _Pass, wanted: dict[str, Any]) -> None:
        """Record what we are about to put in the kernel before touching it."""
        if p.applied != wanted:
            p.applied = dict(wanted)
            self._record(p, Status.CONFIGURED, None, False, generation=p.generation - 1)

    def _teardown(
        self, cid: str, applied: dict[str, Any] | None, allocation: Allocation | None
    ) -> None:
        if applied is None:
            return
        kind = applied_type(applied)
        if kind is not None and kind.is_proxy:
            self._on_loop(self.relay.remove_listener(cid))
        self.dataplane.remove(
            container_id=cid,
            netns_path=applied.get("netns_path"),
            allocation=allocation if kind is not None and kind.is_proxy else None,
            saved_routes=applied.get("saved_routes") or [],
            table=self.settings.nft_table,
        )
        log.info("container %s: enforcement removed", cid)

    def _record(
        self,
        p: _Pass,
        status: Status,
        reason: str | None,
        is_running: bool,
        *,
        generation: int | None = None,
    ) -> None:
        self.store.record_observed(
            p.view.container.id,
            status=status,
            reason=reason,
            is_running=is_running,
            observed_generation=p.generation if generation is None else generation,
            applied=p.applied,
            upstream=p.upstream,
        )
