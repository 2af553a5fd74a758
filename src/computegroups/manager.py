"""ComputeGroupManager: the seed's async API over the decision layer and the commit loop.

Every method that changes state reads the same way: parse the arguments (typed, before anything is
read), plan (pure: :mod:`computegroups.decide` over the ledger), commit the plan's change set if
the store's revision is unchanged (else catch up and plan again; :mod:`computegroups.commit`, which
commits decisions that arrive together as one change set), run its effects (materialise, undo,
events), return a view. A group is never visible to anyone before its commit is durable, and a
refused request changes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from computegroups.commit import Committer
from computegroups.decide import (
    Ask,
    Ledger,
    Plan,
    plan_acquire,
    plan_cordon,
    plan_create,
    plan_delete,
    plan_drain,
    plan_drain_node,
    plan_release,
    priority_of,
    resolve_pool,
)
from computegroups.errors import REFUSALS, ConflictError, InvalidRequestError, ProviderError
from computegroups.events import Event, Publisher
from computegroups.model import (
    AllocationState,
    ComputeGroup,
    ComputeNode,
    Constraints,
    GroupRecord,
    NodeSpec,
    Requirements,
    check_bool,
    check_callable,
    check_int_in,
    check_name,
    check_seconds,
    check_text,
    group_env,
    shown,
)
from computegroups.monitor import Follower, Hook, Monitor, observe_health, reconcile
from computegroups.pools import Pool, parse_pools
from computegroups.providers.base import ComputeResourceProvider, Inventory
from computegroups.state.base import EventLog, StateStore
from computegroups.state.memory import MemoryStateStore
from computegroups.state.sqlite import SqliteStateStore, default_state_path
from computegroups.views import Views, parse_filters, select

__all__ = ["ComputeGroupManager", "Event"]

log = logging.getLogger("computegroups")

_RELEASED = AllocationState.RELEASED
MAX_TTL_S = 7 * 24 * 3600.0


def _check_group_id(value: object, known: Mapping[str, GroupRecord]) -> str:
    if type(value) is str and value in known:  # an id the ledger holds (the common case, without a regex)
        return value
    return check_text("group_id", value, what="a group id")


def _reason(value: object) -> str | None:
    return None if value is None else check_text("reason", value)


def _open_store(state: StateStore | str | os.PathLike[str] | None) -> StateStore:
    if state is None:
        return SqliteStateStore(default_state_path())
    if isinstance(state, str) and state == ":memory:":
        return MemoryStateStore()
    if isinstance(state, str | os.PathLike):
        return SqliteStateStore(state)
    if isinstance(state, StateStore):
        return state
    raise InvalidRequestError(f"state: {type(state).__name__} is not a path, ':memory:' or a StateStore", key="state")


class ComputeGroupManager:
    """Manages compute groups across the system. Use as ``async with ComputeGroupManager(provider) as mgr``.

    ``state``: a SQLite file path, ``":memory:"``, a :class:`StateStore`, or None for
    the default file (``$COMPUTEGROUPS_STATE`` or ``$XDG_STATE_HOME/computegroups/state.db``).
    Discovery happens on enter. All methods are coroutine-safe within one event loop;
    separate processes sharing a store are kept consistent by the store's compare-and-swap.

    Arguments a caller can get wrong (names, ids, a TTL) are annotated ``object``: the manager
    checks them itself and raises InvalidRequestError naming the argument, the same whether this
    module runs compiled (mypyc would otherwise refuse them with a bare TypeError) or interpreted.
    """

    def __init__(
        self,
        provider: ComputeResourceProvider,
        state: StateStore | str | os.PathLike[str] | None = None,
        *,
        id_factory: Callable[[], str] | None = None,
        tombstone_limit: object = 10_000,
        max_attempts: object = 64,
        pools: Sequence[Pool | Mapping[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
        monitor_interval: object = None,
        reconcile_on_start: object = True,
    ) -> None:
        if not isinstance(provider, ComputeResourceProvider):
            raise InvalidRequestError(
                f"provider: {type(provider).__name__} is not a ComputeResourceProvider", key="provider"
            )
        tombstones = check_int_in("tombstone_limit", tombstone_limit, 0, 10**9)
        attempts = check_int_in("max_attempts", max_attempts, 1, 100_000)
        self._monitor_interval = check_seconds("monitor_interval", monitor_interval)
        reconcile_on_start = check_bool("reconcile_on_start", reconcile_on_start)
        self._new_id: Callable[[], str] = (
            check_callable("id_factory", id_factory) if id_factory is not None else lambda: "cg-" + os.urandom(8).hex()
        )
        self._clock: Callable[[], float] = check_callable("clock", clock)
        self.provider = provider
        self.store = _open_store(state)
        self._entered = False
        self.inventory: Inventory = Inventory((), source="none")
        self.pools: dict[str, Pool] = {p.name: p for p in parse_pools(pools)}
        self.ledger = Ledger((), self.pools.values())
        self._telemetry: dict[tuple[str, int], dict[str, float]] = {}
        self.views = Views(self.ledger, self._telemetry_of)
        self._events = Publisher(self.store.record if isinstance(self.store, EventLog) else None)
        self.recent_events: deque[Event] = self._events.recent
        self._commits = Committer(
            self.store, self.ledger, self._clock, self._events, max_attempts=attempts, tombstone_limit=tombstones
        )
        self._lock = self._commits.lock  # held by every read and change of the ledger
        # Monitoring and reconciliation (computegroups.monitor): hooks return the events they caused.
        self.reconcile_on_start = reconcile_on_start
        self.monitor_hooks: list[Hook] = []
        self.reconcile_hooks: list[Hook] = []
        #: awaited with a group's records before its release is committed (a runtime stops its worker)
        self.release_hooks: list[Callable[[Sequence[GroupRecord]], Awaitable[None]]] = []
        self.monitor: Monitor | None = None
        self.follower: Follower | None = None  # health again on each change the provider signals

    @property
    def monitor_interval(self) -> float | None:
        """Seconds between monitoring rounds once entered (None: no monitor); checked when set."""
        return self._monitor_interval

    @monitor_interval.setter
    def monitor_interval(self, value: float | None) -> None:
        self._monitor_interval = check_seconds("monitor_interval", value)

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> ComputeGroupManager:
        await self.provider.__aenter__()
        try:
            inv = self.inventory = await self.provider.discover_resources()
            self.ledger = self._commits.ledger = Ledger(inv.nodes, self.pools.values(), inv.cordoned, inv.unavailable)
            self.views = Views(self.ledger, self._telemetry_of)
            bind = getattr(self.store, "bind", None)  # a store bound to the cluster that made it
            if bind is not None:
                bind(self.provider.cluster_identity(self.inventory))
            await self.store.open()
            await self._commits.refresh()
        except BaseException:
            await self.store.close()
            await self.provider.__aexit__(None, None, None)
            raise
        for note in self.inventory.notes:
            log.info("discovery: %s", note)
        self._entered = True
        try:
            if self.reconcile_on_start:
                await self.reconcile()
            if self.monitor_interval is not None:
                self.monitor = Monitor(self, self.monitor_interval)
                self.monitor.start()
            changed = self.provider.changes()
            if changed is not None:
                self.follower = Follower(self, changed)
                self.follower.start()
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._entered = False
        for background in (self.monitor, self.follower):
            if background is not None:
                await background.stop()
        try:
            await self._events.drain()
            await self.store.close()
        finally:
            await self.provider.__aexit__(exc_type, exc, tb)

    def _require_open(self) -> None:
        if not self._entered:
            raise ConflictError("ComputeGroupManager is not open; use 'async with ComputeGroupManager(...) as mgr'")

    async def _run(self, decide: Callable[[float], Plan], component: str | None = None) -> Plan:
        """Decide and commit under the lock (a refusal is an event), run the plan's effects, raise its error."""
        try:
            plan = await self._commits.run(decide)
        except REFUSALS as exc:
            await self._events.note(Event("refused", None, None, component, f"{type(exc).__name__}: {exc}"))
            raise
        if plan.dematerialise:
            await self._dematerialise(plan.dematerialise)
        for record in plan.materialise:
            await self._materialise(record, own=plan.group == record.id or plan.group == record.gang_id)
        for event in plan.events:
            self._events.emit(event, durable=False)  # in the log already, with its commit
        if plan.error is not None:
            raise plan.error
        return plan

    async def _read(self) -> None:
        """Catch up before a read, releasing reservations past their deadline, so reads tell the truth."""
        await self._commits.read()

    async def _materialise(self, rec: GroupRecord, *, own: bool) -> None:
        # One record: a part of a multi-node group is materialised on its own node, with its own devices.
        resources = {**ComputeGroup(rec, self.ledger.specs.get(rec.node_id)).resources, "group_id": rec.id}
        resources["env"] = group_env(rec)
        try:
            await self.provider.allocate_resources(rec.component or "", resources)
        except Exception as exc:  # undo the allocation, so a failed materialisation leaves nothing behind
            await self._run(lambda now: plan_release(self.ledger, rec.id, now))
            error = ProviderError(f"{self.provider.name}: could not materialise group {rec.id}: {exc}")
            if own:
                raise error from exc
            log.warning("%s", error)
            self.emit(Event("provider-error", rec.id, rec.node_id, rec.component, str(exc)))

    async def _dematerialise(self, records: Sequence[GroupRecord]) -> None:
        first = records[0]
        try:  # one call for every record of the group
            await self.provider.deallocate_resources(first.component or "", [r.id for r in records])
        except Exception as exc:  # the state is released already; report, do not undo
            log.warning("provider could not undo group %s: %s", first.gang_id or first.id, exc)
            self.emit(Event("provider-error", first.gang_id or first.id, first.node_id, first.component, str(exc)))

    # -- events ---------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Publish an event: to every ``events()`` stream, the recent events, the state's event log."""
        self._events.emit(event)

    def events(self) -> AsyncIterator[Event]:
        """An endless stream of events from now on (allocations, releases, health changes)."""
        return self._events.stream()

    def _telemetry_of(self, node_id: str, index: int) -> Mapping[str, float]:
        return self._telemetry.get((node_id, index), {})

    # -- the seed's API -----------------------------------------------------------------
    async def list_compute_nodes(self) -> list[ComputeNode]:
        """List all compute nodes, with their groups and free capacity."""
        self._require_open()
        async with self._lock:
            await self._read()
            return self.views.nodes()

    async def list_compute_groups(self, filters: Mapping[str, Any] | None = None) -> list[ComputeGroup]:
        """List groups, optionally filtered by ``component``, ``state``, ``node_id``.

        Released groups are left out unless ``include_released`` is true.
        """
        self._require_open()
        f = parse_filters(filters)
        async with self._lock:
            await self._read()
            records = select(self.ledger.records.values(), f)
        return self.views.groups(records)

    async def get_compute_group(self, group_id: object) -> ComputeGroup:
        """Get one group by id; raises NotFoundError if unknown."""
        self._require_open()
        gid = _check_group_id(group_id, self.ledger.records)
        async with self._lock:
            await self._read()
            return self.views.by_id(gid)

    async def create_compute_group(
        self, resources: Mapping[str, Any] | Requirements, node_id: object = None
    ) -> ComputeGroup:
        """Pre-carve a free group holding ``resources`` (on ``node_id`` if given).

        ``allocate_compute_group`` hands out matching free groups before carving new
        capacity; a released pre-carved group becomes free again.
        """
        self._require_open()
        ask = self._ask("", resources, None if node_id is None else {"node_id": node_id}, AllocationState.FREE, None)
        plan = await self._run(lambda now: plan_create(self.ledger, ask, now, self._new_id))
        return self.views.by_id(plan.group or "")

    async def delete_compute_group(self, group_id: object) -> bool:
        """Delete a pre-carved group. Refuses a group with an owner (ConflictError).

        Returns False if the group was already released.
        """
        self._require_open()
        gid = _check_group_id(group_id, self.ledger.records)
        return (await self._run(lambda now: plan_delete(self.ledger, gid))).changed

    async def allocate_compute_group(
        self,
        component_name: object,
        resource_requirements: Mapping[str, Any] | Requirements,
        constraints: Mapping[str, Any] | Constraints | None = None,
    ) -> ComputeGroup:
        """Allocate a group to a component.

        The group comes from, in order: the reservation named by ``reservation_id``; an unexpired
        reservation of this component that matches; a matching pre-carved free group; new capacity.
        With ``request_id``, a retry returns the group the first call made, while it is held; once
        that group is released, the id is spent (ConflictError). A request with a priority that
        does not fit may preempt preemptible lower-priority groups.

        Raises InvalidRequestError, InsufficientResourcesError (QuotaExceededError,
        PreemptionPendingError), NotFoundError (unknown reservation), ConflictError (request id
        reused by another component or spent, reservation expired or unfit) or ProviderError
        (nothing kept).
        """
        self._require_open()
        component = check_name("component_name", component_name)
        ask = self._ask(component, resource_requirements, constraints, AllocationState.ALLOCATED, None)
        plan = await self._run(lambda now: plan_acquire(self.ledger, ask, now, self._new_id), component)
        return self.views.by_id(plan.group or "")

    async def reserve_compute_group(
        self,
        component_name: object,
        resource_requirements: Mapping[str, Any] | Requirements,
        constraints: Mapping[str, Any] | Constraints | None = None,
        ttl_seconds: object = 300.0,
    ) -> ComputeGroup:
        """Hold capacity for a planned scale-up until ``ttl_seconds`` from now.

        Only ``component_name``, or whoever presents the returned group id as
        ``constraints["reservation_id"]``, can claim it with ``allocate_compute_group``. An unclaimed
        reservation expires at its deadline and its capacity returns, even if the process that made it
        died: every decision and every read (in any process) and the monitor release expired reservations.
        """
        self._require_open()
        component = check_name("component_name", component_name)
        if (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, int | float)
            or not 0 < ttl_seconds <= MAX_TTL_S  # NaN fails the comparison too
        ):
            raise InvalidRequestError(
                f"ttl_seconds: {shown(ttl_seconds)} is not a number of seconds in (0, {MAX_TTL_S:g}]", key="ttl_seconds"
            )
        ask = self._ask(component, resource_requirements, constraints, AllocationState.RESERVED, float(ttl_seconds))
        if ask.cons.reservation_id is not None:
            raise InvalidRequestError(
                "constraints.reservation_id: a reservation cannot claim another", key="constraints.reservation_id"
            )
        if ask.req.nodes > 1:
            raise InvalidRequestError("requirements.nodes: reservations hold one node", key="requirements.nodes")
        plan = await self._run(lambda now: plan_acquire(self.ledger, ask, now, self._new_id), component)
        return self.views.by_id(plan.group or "")

    def _ask(
        self,
        component: str,
        requirements: Mapping[str, Any] | Requirements,
        constraints: Mapping[str, Any] | Constraints | None,
        state: AllocationState,
        ttl: float | None,
    ) -> Ask:
        req = Requirements.parse(requirements)
        cons = Constraints.parse(constraints)
        if req.pool is not None or cons.pool is not None:
            cons = resolve_pool(self.pools, req, cons)
        return Ask(component, req, cons, state, ttl, priority_of(self.pools, cons) if cons.pool else cons.priority)

    async def deallocate_compute_group(self, group_id: object) -> bool:
        """Release a group. Returns False (and changes nothing) if it already had no owner.

        Release hooks run first (a local runtime stops the group's worker and waits until none of
        its processes is left), so the devices are free before anyone else can be given them.
        """
        self._require_open()
        gid = _check_group_id(group_id, self.ledger.records)
        if self.release_hooks:
            async with self._lock:
                await self._read()
                held = [r for r in self.ledger.parts(gid) if r.component is not None and r.state is not _RELEASED]
            for hook in self.release_hooks if held else ():
                await hook(held)
        return (await self._run(lambda now: plan_release(self.ledger, gid, now))).changed

    async def drain_compute_group(self, group_id: object) -> bool:
        """Mark a group draining: it gets no new owner; a current owner keeps it until release.

        Returns False if it was already draining; ConflictError if it was released.
        """
        self._require_open()
        gid = _check_group_id(group_id, self.ledger.records)
        return (await self._run(lambda now: plan_drain(self.ledger, gid))).changed

    # -- nodes ------------------------------------------------------------------------
    async def cordon_node(self, node_id: object, reason: object = None) -> bool:
        """Cordon a node: it takes no new groups, its groups keep their owners. Committed like any change,
        so every manager sharing the state sees it. Returns False if it was cordoned already."""
        self._require_open()
        node, why = check_name("node_id", node_id), _reason(reason)
        return (await self._run(lambda now: plan_cordon(self.ledger, node, why))).changed

    async def uncordon_node(self, node_id: object) -> bool:
        """Let a cordoned node take new groups again. Returns False if an operator had not cordoned it."""
        self._require_open()
        node = check_name("node_id", node_id)
        return (await self._run(lambda now: plan_cordon(self.ledger, node, None, cordon=False))).changed

    async def drain_node(self, node_id: object, reason: object = None) -> list[ComputeGroup]:
        """Cordon a node and drain its groups in one change (each owner keeps its group until release);
        returns the groups drained now."""
        self._require_open()
        node, why = check_name("node_id", node_id), _reason(reason)
        plan = await self._run(lambda now: plan_drain_node(self.ledger, node, why))
        return self.views.groups(plan.upserts)

    async def expire_reservations(self) -> int:
        """Release every reservation past its deadline now; returns how many. Decisions and reads do this too."""
        self._require_open()
        async with self._lock:
            before = self.expired
            await self._read()
            return self.expired - before

    async def get_allocation_summary(self) -> dict[str, Any]:
        """Totals: total/allocated/reserved/free/unhealthy GPUs, groups by state, GPUs per component."""
        self._require_open()
        async with self._lock:
            await self._read()
            return self.views.summary()

    def held_by(self, component_name: object) -> list[ComputeGroup]:
        """Groups a component owns as of the last catch-up with the store (synchronous, no I/O).

        For callers that cannot await (a planner's synchronous hooks); prefer
        ``get_component_allocations``, which reads the store first. A reservation past its
        deadline is left out even if no one has released it yet.
        """
        component = check_name("component_name", component_name)
        now = self._clock()
        return [g for g in self.views.owned_by(component) if not self.ledger.expired(g.record, now)]

    async def get_component_allocations(self, component_name: object) -> list[ComputeGroup]:
        """Groups a component owns (allocated, reserved or draining)."""
        self._require_open()
        component = check_name("component_name", component_name)
        async with self._lock:
            await self._read()
            return self.views.owned_by(component)

    # -- health -----------------------------------------------------------------------
    async def refresh_health(self) -> list[Event]:
        """Sample the provider's device health and utilization once; returns the events it caused."""
        self._require_open()
        samples = await self.provider.sample_health()
        async with self._lock:
            events = observe_health(self.ledger, self._telemetry, samples)
        for e in events:
            self.emit(e)
        return events

    async def clear_device_health(self, node_id: object, index: object) -> bool:
        """Operator override: mark a device healthy again (the provider accepts the errors seen so far).

        Returns False if the device was not marked unhealthy. New errors mark it unhealthy again.
        """
        self._require_open()
        node_id = check_name("node_id", node_id)
        index = check_int_in("index", index, 0, 1 << 16)
        clear = getattr(self.provider, "clear_device_health", None)
        if clear is not None:
            clear(node_id, index)
        async with self._lock:
            reason = self.ledger.unhealthy.get((node_id, index))
            self.ledger.set_unhealthy(node_id, index, None)
        if reason is not None:
            self.emit(Event("device-healthy", None, node_id, None, f"GPU {index}: cleared by operator (was: {reason})"))
        return reason is not None

    async def reconcile(self) -> list[Event]:
        """Correct the state against reality (vanished or unhealthy devices, gone processes); see monitor.py."""
        self._require_open()
        return await reconcile(self)

    def unhealthy_devices(self) -> dict[tuple[str, int], str]:
        """Devices currently marked unhealthy, with the reason."""
        return dict(self.ledger.unhealthy)

    def group_health(self, group: ComputeGroup) -> list[str]:
        """Reasons the devices of a group are unhealthy (empty when healthy)."""
        return self.views.health_of(group)

    @property
    def expired(self) -> int:
        """Reservations this manager released at their deadline."""
        return self._commits.expired

    @property
    def conflicts(self) -> int:
        """Commits this manager lost to another writer (it caught up and decided again)."""
        return self._commits.conflicts

    @property
    def revision(self) -> int:
        """The state revision this manager has caught up to."""
        return self.ledger.revision

    def node_specs(self) -> Sequence[NodeSpec]:
        """What discovery found."""
        return self.inventory.nodes
