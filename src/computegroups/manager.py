"""ComputeGroupManager: the seed's async API over placement, a state store and a provider.

One request goes: validate (typed, before anything is read) -> catch up with the
store -> place (pure) -> commit if the revision is unchanged, else catch up and
decide again -> materialise through the provider. A group is never visible to
anyone before its commit is durable, and a rejected request changes nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import itertools
import logging
import math
import os
import re
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

from computegroups.errors import (
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
    PreemptionPendingError,
    ProviderError,
    QuotaExceededError,
    one_of,
)
from computegroups.events import Event, event_stream
from computegroups.model import (
    MILLI,
    AllocationState,
    ComputeGroup,
    ComputeNode,
    Constraints,
    GangComputeGroup,
    GroupRecord,
    NodeSpec,
    Requirements,
    Scope,
    group_env,
)
from computegroups.monitor import Hook, Monitor, reconcile
from computegroups.placement.cluster import Cluster
from computegroups.placement.engine import Decision, place
from computegroups.placement.plugins import EMPTY_CONTEXT, Context
from computegroups.placement.preemption import find_victims
from computegroups.pools import Pool, Quota, parse_pools
from computegroups.providers.base import ComputeResourceProvider, Inventory
from computegroups.state.base import Changes, RevisionConflict, StateStore
from computegroups.state.memory import MemoryStateStore
from computegroups.state.sqlite import SqliteStateStore, default_state_path

__all__ = ["ComputeGroupManager", "Event"]

log = logging.getLogger("computegroups")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,252}$")
_FILTER_KEYS = ("component", "state", "node_id", "include_released")
_OWNED = (AllocationState.ALLOCATED, AllocationState.DRAINING, AllocationState.RESERVED)
_IN_USE = (AllocationState.ALLOCATED, AllocationState.DRAINING)  # with an owner: not a reservation, not free
CLIQUE_LABEL = "nvidia.com/gpu.clique"
MAX_TTL_S = 7 * 24 * 3600.0
_PRUNE_SLACK = 64  # released groups kept past ``tombstone_limit`` before a batch is pruned


def _check_name(key: str, value: object) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise InvalidRequestError(
            f"{key}: {value!r} is not a name (1-253 of letters, digits and . _ : / @ -, starting alphanumeric)",
            key=key,
        )
    return value


def _check_group_id(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise InvalidRequestError(f"group_id: {value!r} is not a group id", key="group_id")
    return value


def _excluding(ctx: Context, excluded: frozenset[str]) -> Context:
    """``ctx`` with ``excluded`` nodes (a named tuple's ``_replace`` is slow for a hot path)."""
    return Context(
        ctx.allowed, excluded, ctx.near, ctx.away, ctx.prefer_near, ctx.prefer_away, ctx.nominated, ctx.priority
    )


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
        tombstone_limit: int = 10_000,
        max_attempts: int = 64,
        pools: Sequence[Pool | Mapping[str, Any]] | None = None,
        clock: Callable[[], float] = time.time,
        monitor_interval: float | None = None,
        reconcile_on_start: bool = True,
    ) -> None:
        if not isinstance(provider, ComputeResourceProvider):
            raise InvalidRequestError(
                f"provider: {type(provider).__name__} is not a ComputeResourceProvider", key="provider"
            )
        self.provider = provider
        self.store = _open_store(state)
        # Stores in this process can tell their revision without I/O (optional ``local_revision()``).
        self._peek_revision: Callable[[], int] | None = getattr(self.store, "local_revision", None)
        self._new_id = id_factory or (lambda: "cg-" + os.urandom(8).hex())
        self._tombstone_limit = tombstone_limit
        self._max_attempts = max_attempts
        self._lock = asyncio.Lock()
        self._entered = False
        self.inventory: Inventory = Inventory((), source="none")
        self._specs: dict[str, NodeSpec] = {}
        self._cluster = Cluster(())
        self._rev = -1
        self._records: dict[str, GroupRecord] = {}
        self._by_request: dict[str, str] = {}
        self._by_node: dict[str, set[str]] = {}
        self._carved_free: dict[str, None] = {}  # ordered set of allocatable pre-carved groups
        self._tombstones: deque[str] = deque()
        self._subscribers: list[asyncio.Queue[Event]] = []
        self.recent_events: deque[Event] = deque(maxlen=1000)
        self._telemetry: dict[tuple[str, int], dict[str, float]] = {}
        self._unhealthy: dict[tuple[str, int], str] = {}
        self._clock = clock
        self.pools: dict[str, Pool] = {p.name: p for p in parse_pools(pools)}
        self._pool_members: dict[str, frozenset[str]] = {}
        self._with_pool: dict[tuple[int, str | None], tuple[Constraints, Constraints]] = {}
        self._pool_gpus: dict[str, int] = {}
        self._domain_of: dict[str, str] = {}
        self._domain_nodes: dict[str, set[str]] = {}
        # Indexes derived from the records (rebuilt on a full reload):
        self._usage: Counter[tuple[str, str, str]] = Counter()  # (pool, "component"|"tenant", name) -> milli
        self._component_nodes: dict[str, dict[str, int]] = {}  # component -> node id -> groups held there
        self._near: dict[tuple[str, Scope], frozenset[str]] = {}  # (component, scope) -> nodes near it
        self._reservations: dict[str, dict[str, None]] = {}  # component -> its unclaimed reservations
        self._expiry: list[tuple[float, str]] = []  # heap of (expires_at, reservation id)
        self._victims: dict[str, set[str]] = {}  # pending preemptor -> victims still holding capacity
        self._nominated: dict[str, dict[str, tuple[int, int]]] = {}  # node -> preemptor -> (gpu mask, priority)
        self._preemptible: dict[str, dict[str, None]] = {}  # node -> preemptible allocated groups
        self._gangs: dict[str, list[str]] = {}  # gang id -> part ids
        # Monitoring and reconciliation (computegroups.monitor): hooks return the events they caused.
        self.monitor_interval = monitor_interval
        self.reconcile_on_start = reconcile_on_start
        self.monitor_hooks: list[Hook] = []
        self.reconcile_hooks: list[Hook] = []
        self.monitor: Monitor | None = None

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> ComputeGroupManager:
        await self.provider.__aenter__()
        try:
            self.inventory = await self.provider.discover_resources()
            self._specs = {n.id: n for n in self.inventory.nodes}
            self._cluster = Cluster(self.inventory.nodes)
            for node_id in self.inventory.cordoned:
                self._cluster.set_cordoned(node_id, True)
            for name, pool in self.pools.items():
                members = pool.members(self.inventory.nodes)
                self._pool_members[name] = members
                self._pool_gpus[name] = sum(len(self._specs[n].gpus) for n in members)
            for n in self.inventory.nodes:
                domain = n.labels.get(CLIQUE_LABEL) or f"node:{n.id}"
                self._domain_of[n.id] = domain
                self._domain_nodes.setdefault(domain, set()).add(n.id)
            await self.store.open()
            await self._refresh()
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
        except BaseException:
            await self.__aexit__(None, None, None)
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._entered = False
        if self.monitor is not None:
            await self.monitor.stop()
        try:
            await self.store.close()
        finally:
            await self.provider.__aexit__(exc_type, exc, tb)

    def _require_open(self) -> None:
        if not self._entered:
            raise ConflictError("ComputeGroupManager is not open; use 'async with ComputeGroupManager(...) as mgr'")

    # -- keeping the mirror in step with the store ----------------------------------
    async def _refresh(self) -> None:
        peek = self._peek_revision
        if peek is not None and peek() == self._rev:
            return  # an in-process store says nothing changed
        changes = await self.store.changes_since(self._rev)
        if changes.revision != self._rev or changes.full:
            self._apply_changes(changes)

    def _apply_changes(self, changes: Changes) -> None:
        if not changes.full:
            self._apply_delta(changes.revision, changes.upserts, changes.deletes)
            return
        demand = self._cluster.demand  # what the workload asks for outlives a reload of what it holds
        self._cluster = Cluster(self.inventory.nodes)
        self._cluster.demand = demand
        for node_id in self.inventory.cordoned:
            self._cluster.set_cordoned(node_id, True)
        for node_id, index in self._unhealthy:
            self._cluster.set_unhealthy(node_id, index, True)
        self._records.clear()
        self._by_request.clear()
        self._by_node.clear()
        self._carved_free.clear()
        self._tombstones.clear()
        for table in (
            self._usage,
            self._component_nodes,
            self._near,
            self._reservations,
            self._victims,
            self._nominated,
            self._preemptible,
            self._gangs,
        ):
            table.clear()
        self._expiry.clear()
        for r in sorted(changes.upserts, key=lambda r: (r.updated_at, r.id)):
            self._index(r)
        self._rev = changes.revision

    def _apply_delta(self, revision: int, upserts: Sequence[GroupRecord], deletes: Sequence[str]) -> None:
        for r in upserts:
            self._unindex(r.id)
            self._index(r)
        for gid in deletes:
            self._unindex(gid)
        self._rev = revision

    def _index(self, r: GroupRecord) -> None:
        gid = r.id
        self._records[gid] = r
        released = r.state is AllocationState.RELEASED
        self._cluster.apply(r)  # counts only what holds capacity
        if r.request_id:
            if not released:
                self._by_request[r.request_id] = gid
            else:
                self._by_request.setdefault(r.request_id, gid)
        ids = self._by_node.get(r.node_id)
        if ids is None:
            ids = self._by_node[r.node_id] = set()
        ids.add(gid)
        if r.carved and r.state is AllocationState.FREE:
            self._carved_free[gid] = None
        if released:
            self._tombstones.append(gid)
        else:
            self._index_live(r, 1)
        if r.gang_id:
            self._gangs.setdefault(r.gang_id, []).append(gid)

    def _index_live(self, r: GroupRecord, sign: int) -> None:
        """Indexes over groups that are not released: quotas, affinity, reservations, preemption."""
        component = r.component
        if component is None:
            return  # a free pre-carved group: no owner to count
        if r.pool:
            milli = sign * r.share_milli
            self._usage[(r.pool, "component", component)] += milli
            if r.tenant:
                self._usage[(r.pool, "tenant", r.tenant)] += milli
        state = r.state
        if not r.pending:
            nodes = self._component_nodes.get(component)
            if nodes is None:
                nodes = self._component_nodes[component] = {}
            count = nodes.get(r.node_id, 0) + sign
            if count > 0:
                nodes[r.node_id] = count
            else:
                nodes.pop(r.node_id, None)
            if (count == 1 and sign > 0) or count <= 0:  # the component arrived on or left a node
                self._near.pop((component, Scope.NODE), None)
                self._near.pop((component, Scope.NVLINK_DOMAIN), None)
            if state is AllocationState.RESERVED:
                bucket = self._reservations.setdefault(component, {})
                if sign > 0:
                    bucket[r.id] = None
                else:
                    bucket.pop(r.id, None)
            if sign > 0 and r.expires_at is not None:
                heapq.heappush(self._expiry, (r.expires_at, r.id))  # a drained reservation expires too
            if r.preempted_by:
                victims = self._victims.setdefault(r.preempted_by, set())
                (victims.add if sign > 0 else victims.discard)(r.id)
        else:
            noms = self._nominated.setdefault(r.node_id, {})
            if sign > 0:
                noms[r.id] = (sum(1 << d.index for d in r.devices), r.priority)
            else:
                noms.pop(r.id, None)
                if not noms:
                    del self._nominated[r.node_id]
        if r.preemptible and state is AllocationState.ALLOCATED and not r.carved:
            bucket = self._preemptible.setdefault(r.node_id, {})
            if sign > 0:
                bucket[r.id] = None
            else:
                bucket.pop(r.id, None)

    def _unindex(self, gid: str) -> None:
        old = self._records.pop(gid, None)
        if old is None:
            return
        released = old.state is AllocationState.RELEASED
        self._cluster.remove(old)
        if old.request_id and self._by_request.get(old.request_id) == gid:
            del self._by_request[old.request_id]
        ids = self._by_node.get(old.node_id)
        if ids is not None:
            ids.discard(gid)
        if old.carved:
            self._carved_free.pop(gid, None)
        if not released:
            self._index_live(old, -1)
        if old.gang_id and old.gang_id in self._gangs:
            parts = self._gangs[old.gang_id]
            if gid in parts:
                parts.remove(gid)
            if not parts:
                del self._gangs[old.gang_id]

    async def _commit(self, build: Callable[[], tuple[list[GroupRecord], list[str]]]) -> list[GroupRecord] | None:
        """Decide with ``build`` against the freshest state and commit; retry on a lost race.

        Returns the records written, or None when ``build`` found nothing to change.
        Old tombstones (released groups past ``tombstone_limit``) are pruned in the same commit,
        in batches.
        """
        for _ in range(self._max_attempts):
            await self._refresh()
            due = self._due_reservations()
            if due:
                await self._release_expired(due)
                continue
            upserts, deletes = build()
            if not upserts and not deletes:
                return None
            # Prune a batch at a time once past the limit by a slack: one delete per release costs every release.
            excess = len(self._tombstones) - self._tombstone_limit
            if excess > min(_PRUNE_SLACK, self._tombstone_limit // 8):
                self._prune(excess, upserts, deletes)
            else:
                excess = 0
            try:
                rev = await self.store.commit(self._rev, upserts, deletes)
            except RevisionConflict:
                continue
            for _ in range(excess):
                self._tombstones.popleft()
            self._apply_delta(rev, upserts, deletes)
            return upserts
        raise ConflictError(f"state kept changing underneath; gave up after {self._max_attempts} attempts")

    def _prune(self, excess: int, upserts: list[GroupRecord], deletes: list[str]) -> None:
        """Add the oldest ``excess`` released groups to ``deletes`` (unless the change set writes them)."""
        written = {r.id for r in upserts} | set(deletes)
        for gid in itertools.islice(self._tombstones, excess):
            r = self._records.get(gid)
            if r is not None and r.state is AllocationState.RELEASED and gid not in written:
                deletes.append(gid)
                written.add(gid)

    def _due_reservations(self) -> list[GroupRecord]:
        """Reservations past their deadline (popped from the expiry heap)."""
        if not self._expiry or self._expiry[0][0] > self._clock():
            return []
        now = self._clock()
        due: list[GroupRecord] = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            at, gid = heapq.heappop(heap)
            r = self._records.get(gid)
            live = r is not None and r.state in (AllocationState.RESERVED, AllocationState.DRAINING)
            if live and r is not None and r.expires_at == at and not r.pending:
                due.append(r)
        return due

    async def _release_expired(self, due: list[GroupRecord]) -> int:
        now = self._clock()
        try:
            rev = await self.store.commit(
                self._rev, [r.replace(state=AllocationState.RELEASED, updated_at=now) for r in due], []
            )
        except RevisionConflict:
            for r in due:  # someone else moved on; look at them again after catching up
                heapq.heappush(self._expiry, (r.expires_at or now, r.id))
            return 0
        released = [r.replace(state=AllocationState.RELEASED, updated_at=now) for r in due]
        self._apply_delta(rev, released, ())
        for r in due:
            log.info("reservation %s of %s expired; its capacity returns", r.id, r.component)
            self.emit(Event("reservation-expired", r.id, r.node_id, r.component))
        return len(due)

    async def expire_reservations(self) -> int:
        """Release every reservation past its deadline now; returns how many. Decisions do this too."""
        self._require_open()
        async with self._lock:
            total = 0
            for _ in range(self._max_attempts):
                await self._refresh()
                due = self._due_reservations()
                if not due:
                    break
                total += await self._release_expired(due)
            return total

    # -- events ---------------------------------------------------------------------
    def emit(self, event: Event) -> None:
        """Publish an event: to every ``events()`` stream, the recent-events log and the debug log."""
        self.recent_events.append(event)
        log.debug("event %s", event)
        for q in self._subscribers:
            q.put_nowait(event)

    def events(self) -> AsyncIterator[Event]:
        """An endless stream of events from now on (allocations, releases, health changes)."""
        return event_stream(self._subscribers)

    # -- views ------------------------------------------------------------------------
    def _view(self, r: GroupRecord) -> ComputeGroup:
        if r.gang_id and r.gang_id in self._gangs:
            return self._gang_view(r.gang_id)
        return ComputeGroup(r, self._specs.get(r.node_id), self._telemetry_of)

    def _views(self, records: Sequence[GroupRecord]) -> list[ComputeGroup]:
        """Views of records, a multi-node group once (at its first part)."""
        out: list[ComputeGroup] = []
        seen: set[str] = set()
        for r in records:
            key = r.gang_id or r.id
            if key not in seen:
                seen.add(key)
                out.append(self._view(r))
        return out

    def _gang_view(self, gang_id: str) -> ComputeGroup:
        parts = sorted((self._records[p] for p in self._gangs[gang_id]), key=lambda r: r.id)
        return GangComputeGroup(gang_id, parts, self._specs, self._telemetry_of)

    def _view_id(self, gid: str) -> ComputeGroup:
        """The view of a group or of a multi-node group by its id; NotFoundError if unknown."""
        if gid in self._gangs:
            return self._gang_view(gid)
        r = self._records.get(gid)
        if r is None:
            raise NotFoundError(f"group_id: no compute group {gid!r}")
        return self._view(r)

    def _telemetry_of(self, node_id: str, index: int) -> Mapping[str, float]:
        return self._telemetry.get((node_id, index), {})

    # -- the seed's API -----------------------------------------------------------------
    async def list_compute_nodes(self) -> list[ComputeNode]:
        """List all compute nodes, with their groups and free capacity."""
        self._require_open()
        async with self._lock:
            await self._refresh()
            out = []
            for st in self._cluster.nodes:
                groups = sorted(
                    (self._records[g] for g in self._by_node.get(st.spec.id, ()) if self._records[g].holds_capacity),
                    key=lambda r: (r.created_at, r.id),
                )
                free = {
                    "gpus": st.gpus_free(),
                    "whole_gpus": st.free_count,
                    "cpus": st.cpu_free / MILLI,
                    "memory_mib": st.mem_free,
                }
                unhealthy = frozenset(i for (n, i) in self._unhealthy if n == st.spec.id)
                out.append(ComputeNode(st.spec, [self._view(r) for r in groups], free, unhealthy, self._telemetry_of))
            return out

    async def list_compute_groups(self, filters: Mapping[str, Any] | None = None) -> list[ComputeGroup]:
        """List groups, optionally filtered by ``component``, ``state``, ``node_id``.

        Released groups are left out unless ``include_released`` is true.
        """
        self._require_open()
        f = dict(filters or {})
        unknown = sorted(str(k) for k in f if k not in _FILTER_KEYS)
        if unknown:
            raise InvalidRequestError(
                f"filters.{unknown[0]}: unknown key; allowed: {one_of(_FILTER_KEYS)}", key=f"filters.{unknown[0]}"
            )
        state = f.get("state")
        if state is not None and state not in [s.value for s in AllocationState]:
            raise InvalidRequestError(
                f"filters.state: {state!r} is not one of {one_of([s.value for s in AllocationState])}",
                key="filters.state",
            )
        async with self._lock:
            await self._refresh()
            records = list(self._records.values())
        if "node_id" in f:
            records = [r for r in records if r.node_id == f["node_id"]]
        if "component" in f:
            records = [r for r in records if r.component == f["component"]]
        if state is not None:
            records = [r for r in records if r.state.value == state]
        elif not f.get("include_released"):
            records = [r for r in records if r.state is not AllocationState.RELEASED]
        records.sort(key=lambda r: (r.created_at, r.id))
        return self._views(records)

    async def get_compute_group(self, group_id: object) -> ComputeGroup:
        """Get one group by id; raises NotFoundError if unknown."""
        self._require_open()
        gid = _check_group_id(group_id)
        async with self._lock:
            await self._refresh()
            return self._view_id(gid)

    async def create_compute_group(
        self, resources: Mapping[str, Any] | Requirements, node_id: object = None
    ) -> ComputeGroup:
        """Pre-carve a free group holding ``resources`` (on ``node_id`` if given).

        ``allocate_compute_group`` hands out matching free groups before carving new
        capacity; a released pre-carved group becomes free again.
        """
        self._require_open()
        req = Requirements.parse(resources)
        cons = Constraints.parse(None if node_id is None else {"node_id": node_id})
        async with self._lock:
            now = time.time()

            def build() -> tuple[list[GroupRecord], list[str]]:
                d = place(self._cluster, req, cons)
                rec = GroupRecord(
                    id=self._new_id(),
                    node_id=d.node_id,
                    state=AllocationState.FREE,
                    component=None,
                    devices=d.devices,
                    cpus_milli=d.cpus_milli,
                    memory_mib=d.memory_mib,
                    carved=True,
                    requirements=req.to_dict(),
                    created_at=now,
                    updated_at=now,
                )
                return [rec], []

            (rec,) = await self._commit(build) or []
        self.emit(Event("created", rec.id, rec.node_id))
        return self._view(rec)

    async def delete_compute_group(self, group_id: object) -> bool:
        """Delete a pre-carved group. Refuses a group with an owner (ConflictError).

        Returns False if the group was already released.
        """
        self._require_open()
        gid = _check_group_id(group_id)
        async with self._lock:

            def build() -> tuple[list[GroupRecord], list[str]]:
                live = [r for r in self._parts(gid) if r.state is not AllocationState.RELEASED]
                for r in live:
                    if r.component is not None:
                        raise ConflictError(
                            f"group {gid} is {r.state.value} by {r.component}; deallocate it before deleting"
                        )
                return [], [r.id for r in live]

            node = self._parts(gid)[0].node_id
            done = await self._commit(build) is not None
        if done:
            self.emit(Event("deleted", gid, node))
        return done

    async def allocate_compute_group(
        self,
        component_name: object,
        resource_requirements: Mapping[str, Any] | Requirements,
        constraints: Mapping[str, Any] | Constraints | None = None,
    ) -> ComputeGroup:
        """Allocate a group to a component.

        The group comes from, in order: the reservation named by ``reservation_id``; an unexpired
        reservation of this component that matches; a matching pre-carved free group; new capacity.
        With ``request_id``, a retry returns the group the first call made. A request with a
        priority that does not fit may preempt preemptible lower-priority groups.

        Raises InvalidRequestError, InsufficientResourcesError (QuotaExceededError,
        PreemptionPendingError), NotFoundError (unknown reservation), ConflictError (request id
        reused by another component, reservation expired or too small) or ProviderError (nothing kept).
        """
        self._require_open()
        component = _check_name("component_name", component_name)
        req = Requirements.parse(resource_requirements)
        cons = self._effective_constraints(req, Constraints.parse(constraints))
        return await self._acquire(component, req, cons, AllocationState.ALLOCATED, None)

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
        died: every decision (in any process) and the monitor release expired reservations.
        """
        self._require_open()
        component = _check_name("component_name", component_name)
        if (
            isinstance(ttl_seconds, bool)
            or not isinstance(ttl_seconds, int | float)
            or not (math.isfinite(ttl_seconds) and 0 < ttl_seconds <= MAX_TTL_S)
        ):
            raise InvalidRequestError(
                f"ttl_seconds: {ttl_seconds!r} is not a number of seconds in (0, {MAX_TTL_S:g}]", key="ttl_seconds"
            )
        req = Requirements.parse(resource_requirements)
        cons = self._effective_constraints(req, Constraints.parse(constraints))
        if cons.reservation_id is not None:
            raise InvalidRequestError(
                "constraints.reservation_id: a reservation cannot claim another", key="constraints.reservation_id"
            )
        if req.nodes > 1:
            raise InvalidRequestError("requirements.nodes: reservations hold one node", key="requirements.nodes")
        return await self._acquire(component, req, cons, AllocationState.RESERVED, float(ttl_seconds))

    def _effective_constraints(self, req: Requirements, cons: Constraints) -> Constraints:
        """Merge the pool named in requirements into constraints and check it exists."""
        pool = cons.pool
        if req.pool is not None:
            if pool is not None and pool != req.pool:
                raise InvalidRequestError(
                    f"requirements.pool: {req.pool!r} differs from constraints.pool {pool!r}", key="requirements.pool"
                )
            pool = req.pool
        if pool is not None and pool not in self.pools:
            allowed = one_of(sorted(self.pools)) or "none are defined"
            raise InvalidRequestError(
                f"constraints.pool: {pool!r} is not a pool; pools: {allowed}", key="constraints.pool"
            )
        if pool == cons.pool:
            return cons
        # Requests repeat: remember the merged constraints (the entry holds ``cons``, so its id stays its own).
        key = (id(cons), pool)
        known = self._with_pool.get(key)
        if known is None or known[0] is not cons:
            if len(self._with_pool) >= 1024:
                self._with_pool.clear()
            known = self._with_pool[key] = (cons, dataclasses.replace(cons, pool=pool))
        return known[1]

    def _priority(self, cons: Constraints) -> int:
        if cons.priority or cons.pool is None:
            return cons.priority
        return self.pools[cons.pool].priority

    def _context(self, cons: Constraints, priority: int, excluded: frozenset[str] = frozenset()) -> Context:
        if not (cons.pool or cons.affinity or cons.anti_affinity or excluded or self._nominated):
            return EMPTY_CONTEXT  # the common case: nothing to resolve (priority matters only beside nominations)

        near = tuple(self._nodes_near(r.component, r.scope) for r in cons.affinity) if cons.affinity else ()
        away = tuple(self._nodes_near(r.component, r.scope) for r in cons.anti_affinity) if cons.anti_affinity else ()
        return Context(
            allowed=self._pool_members[cons.pool] if cons.pool else None,
            excluded=excluded,
            near=near,
            away=away,
            prefer_near=tuple(s for r, s in zip(cons.affinity, near, strict=True) if not r.required) if near else (),
            prefer_away=tuple(s for r, s in zip(cons.anti_affinity, away, strict=True) if not r.required)
            if away
            else (),
            nominated={n: tuple(v.values()) for n, v in self._nominated.items() if v} if self._nominated else {},
            priority=priority,
        )

    def _nodes_near(self, component: str, scope: Scope) -> frozenset[str]:
        """Nodes that share a node (or an NVLink domain) with a group of ``component``.

        Remembered until the component's placement changes (``_index_live`` forgets it).
        """
        key = (component, scope)
        nodes = self._near.get(key)
        if nodes is not None:
            return nodes
        hosts = self._component_nodes.get(component) or {}
        if scope is Scope.NODE:
            nodes = frozenset(hosts)
        else:
            out: set[str] = set()
            for n in hosts:
                out |= self._domain_nodes.get(self._domain_of.get(n, f"node:{n}"), {n})
            nodes = frozenset(out)
        self._near[key] = nodes
        return nodes

    def _check_quota(
        self,
        component: str,
        pool_name: str | None,
        tenant: str | None,
        milli: int,
        replacing: GroupRecord | None = None,
    ) -> None:
        """Raise QuotaExceededError if ``milli`` more in pool ``pool_name`` would pass a quota.

        ``replacing``: a group whose own share is already counted and is being re-attributed.
        """
        if pool_name is None:
            return
        pool = self.pools[pool_name]
        total = self._pool_gpus.get(pool_name, 0)
        self._check_one_quota(
            pool_name, "component", component, pool.component_quota(component), total, milli, replacing
        )
        if tenant:
            self._check_one_quota(pool_name, "tenant", tenant, pool.tenant_quota(tenant), total, milli, replacing)

    def _check_one_quota(
        self,
        pool_name: str,
        kind: str,
        name: str,
        quota: Quota | None,
        total: int,
        milli: int,
        replacing: GroupRecord | None,
    ) -> None:
        limit = quota.limit_milli(total) if quota else None
        if limit is None:
            return
        held = self._usage[(pool_name, kind, name)]
        if replacing is not None and replacing.pool == pool_name and replacing.component is not None:
            owner = replacing.component if kind == "component" else replacing.tenant
            if owner == name:
                held -= replacing.share_milli
        if held + milli > limit:
            raise QuotaExceededError(
                f"pool {pool_name}: {kind} {name} holds {held / MILLI:g} GPU(s); "
                f"{milli / MILLI:g} more would exceed its quota of {limit / MILLI:g}"
            )

    def _claim(self, component: str, req: Requirements, cons: Constraints) -> GroupRecord | None:
        """The reservation this request claims, if any (by id, or this component's matching one)."""
        if cons.reservation_id is not None:
            r = self._records.get(cons.reservation_id)
            if r is None:
                raise NotFoundError(f"constraints.reservation_id: no reservation {cons.reservation_id!r}")
            if r.state is not AllocationState.RESERVED or r.pending:
                raise ConflictError(
                    f"constraints.reservation_id: {r.id} is {r.state.value}, not an open reservation"
                    + (" (it expired)" if r.expires_at is not None and r.state is AllocationState.RELEASED else "")
                )
            if not self._fits(r, req, exact=False):
                raise ConflictError(f"constraints.reservation_id: {r.id} holds less than the request")
            return r
        for gid in self._reservations.get(component, {}):
            r = self._records[gid]
            if self._fits(r, req, exact=True) and self._satisfies(r, req, cons):
                return r
        return None

    @staticmethod
    def _fits(r: GroupRecord, req: Requirements, *, exact: bool) -> bool:
        if req.share_milli:
            if len(r.devices) != 1 or r.devices[0].share_milli < req.share_milli:
                return False
            if exact and r.devices[0].share_milli != req.share_milli:
                return False
        else:
            whole = [d for d in r.devices if d.share_milli == MILLI]
            if len(whole) != len(r.devices) or len(whole) < req.whole_gpus:
                return False
            if exact and len(whole) != req.whole_gpus:
                return False
        return r.cpus_milli >= req.cpus_milli and r.memory_mib >= req.memory_mib

    async def _acquire(
        self, component: str, req: Requirements, cons: Constraints, state: AllocationState, ttl: float | None
    ) -> ComputeGroup:
        reused: str | None = None
        pending: tuple[GroupRecord, list[str]] | None = None
        async with self._lock:

            def build() -> tuple[list[GroupRecord], list[str]]:
                nonlocal reused, pending
                reused, pending = None, None
                now = self._clock()
                if cons.request_id is not None and cons.request_id in self._by_request:
                    prior = self._records[self._by_request[cons.request_id]]
                    if prior.component != component:
                        raise ConflictError(
                            f"constraints.request_id: {cons.request_id!r} was used by {prior.component!r}, "
                            f"not {component!r}"
                        )
                    reused = prior.gang_id or prior.id
                    return [], []
                priority = self._priority(cons)
                expires = now + ttl if ttl is not None else None
                if state is AllocationState.ALLOCATED and (
                    cons.reservation_id is not None or self._reservations.get(component) or self._carved_free
                ):
                    owned = self._ownership(component, cons, priority, expires, now)
                    claimed = self._claim(component, req, cons)
                    if claimed is not None:
                        pool, tenant = claimed.pool or cons.pool, claimed.tenant or cons.tenant
                        self._check_quota(component, pool, tenant, claimed.share_milli, claimed)
                        owned["pool"], owned["tenant"] = pool, tenant
                        return [claimed.replace(state=state, **owned)], []
                    carved = self._match_carved(req, cons)
                    if carved is not None:
                        self._check_quota(component, cons.pool, cons.tenant, carved.share_milli)
                        return [carved.replace(state=state, **owned)], []
                milli = (req.whole_gpus * MILLI or req.share_milli) * req.nodes
                self._check_quota(component, cons.pool, cons.tenant, milli)
                ctx = self._context(cons, priority)
                try:
                    if req.nodes == 1:
                        d = place(self._cluster, req, cons, ctx=ctx)
                        return [self._record(d, req, cons, component, state, priority, expires, now)], []
                    decisions = self._place_gang(req, cons, ctx)
                except InsufficientResourcesError:
                    if priority <= 0 or req.nodes > 1 or state is not AllocationState.ALLOCATED:
                        raise
                    preempting = self._preempt(req, cons, ctx, priority)
                    if preempting is None:
                        raise
                    decision, victims = preempting
                    gid = self._new_id()
                    waiting = self._record(
                        decision, req, cons, component, AllocationState.RESERVED, priority, expires, now, gid=gid
                    )._replace(pending=True, request_id=cons.request_id or f"preempt-{gid}")
                    pending = (waiting, [v.id for v in victims])
                    drained = [
                        v.replace(state=AllocationState.DRAINING, preempted_by=waiting.id, updated_at=now)
                        for v in victims
                    ]
                    return [waiting, *drained], []
                gang = self._new_id()
                return [
                    self._record(
                        d,
                        req,
                        cons,
                        component,
                        state,
                        priority,
                        expires,
                        now,
                        gid=f"{gang}.{n}",
                        gang_id=gang,
                        first=n == 0,
                    )
                    for n, d in enumerate(decisions)
                ], []

            committed = await self._commit(build) or []
        if reused is not None:
            return await self._reused(reused)
        if pending is not None:
            waiting, victims = pending
            for vid in victims:
                victim = self._records.get(vid)
                self.emit(
                    Event(
                        "preempted",
                        vid,
                        victim.node_id if victim else None,
                        victim.component if victim else None,
                        f"by {waiting.id} ({component})",
                    )
                )
            raise PreemptionPendingError(
                f"{component}: preempting {len(victims)} group(s) ({', '.join(victims)}) on {waiting.node_id}; "
                f"retry with request_id {waiting.request_id!r} once they have drained",
                group_id=waiting.id,
                request_id=waiting.request_id or "",
                victims=victims,
            )
        for rec in committed:
            if state is AllocationState.ALLOCATED:
                await self._materialise(rec)
        kind = "allocated" if state is AllocationState.ALLOCATED else "reserved"
        first = committed[0]
        self.emit(Event(kind, first.gang_id or first.id, first.node_id, component))
        return self._view_id(first.gang_id or first.id)

    async def _reused(self, gid: str) -> ComputeGroup:
        view = self._view_id(gid)
        record = view.record
        if record.pending:
            victims = sorted(self._victims.get(record.id, ()))
            raise PreemptionPendingError(
                f"{record.component}: still waiting for {len(victims)} preempted group(s) to drain",
                group_id=record.id,
                request_id=record.request_id or "",
                victims=victims,
            )
        return view

    def _record(
        self,
        d: Decision,
        req: Requirements,
        cons: Constraints,
        component: str,
        state: AllocationState,
        priority: int,
        expires: float | None,
        now: float,
        *,
        gid: str | None = None,
        gang_id: str | None = None,
        first: bool = True,
    ) -> GroupRecord:
        """The record of a new group (of one part of a multi-node group: only the first keeps the request id)."""
        return GroupRecord(
            gid or self._new_id(),
            d.node_id,
            state,
            component,
            d.devices,
            d.cpus_milli,
            d.memory_mib,
            cons.request_id if first else None,
            False,
            req.stored,
            cons.stored,
            now,
            now,
            priority,
            cons.preemptible,
            cons.pool,
            cons.tenant,
            expires,
            gang_id=gang_id,
        )

    @staticmethod
    def _ownership(
        component: str, cons: Constraints, priority: int, expires: float | None, now: float
    ) -> dict[str, Any]:
        """The fields that give an existing group (a reservation, a pre-carved group) its new owner."""
        return {
            "component": component,
            "request_id": cons.request_id,
            "constraints": cons.stored,
            "priority": priority,
            "preemptible": cons.preemptible,
            "pool": cons.pool,
            "tenant": cons.tenant,
            "expires_at": expires,
            "updated_at": now,
        }

    def _place_gang(self, req: Requirements, cons: Constraints, ctx: Context) -> list[Decision]:
        """One decision per node, on distinct nodes, all or nothing."""
        decisions: list[Decision] = []
        for part in range(req.nodes):
            try:
                decisions.append(
                    place(
                        self._cluster,
                        req,
                        cons,
                        ctx=_excluding(ctx, frozenset([d.node_id for d in decisions])),
                    )
                )
            except InsufficientResourcesError as exc:
                raise InsufficientResourcesError(
                    f"a {req.nodes}-node group of {req.whole_gpus} GPU(s) per node does not fit: "
                    f"only {part} node(s) can take a part; nothing was allocated",
                    reasons=exc.reasons,
                ) from exc
        return decisions

    def _preempt(
        self, req: Requirements, cons: Constraints, ctx: Context, priority: int
    ) -> tuple[Decision, tuple[GroupRecord, ...]] | None:
        candidates: dict[str, list[GroupRecord]] = {}
        for node_id, gids in self._preemptible.items():
            victims = [self._records[g] for g in gids if self._records[g].priority < priority]
            if victims:
                candidates[node_id] = victims
        found = find_victims(self._cluster, req, cons, ctx, candidates)
        return (found.decision, found.victims) if found else None

    def _match_carved(self, req: Requirements, cons: Constraints) -> GroupRecord | None:
        """A pre-carved free group of exactly the requested size that meets the constraints."""
        if req.nodes > 1:
            return None
        for gid in self._carved_free:
            r = self._records[gid]
            if self._fits(r, req, exact=True) and self._satisfies(r, req, cons):
                return r
        return None

    def _satisfies(self, r: GroupRecord, req: Requirements, cons: Constraints) -> bool:
        """Whether an existing group meets the request's placement constraints."""
        if cons.node_id is not None and r.node_id != cons.node_id:
            return False
        if cons.pool is not None and r.node_id not in self._pool_members[cons.pool]:
            return False
        spec = self._specs.get(r.node_id)
        if spec is None or any(spec.labels.get(k) != v for k, v in cons.labels.items()):
            return False
        gpus = [spec.gpus[d.index] for d in r.devices]
        if req.models and not all(any(m in g.name.lower() for m in req.models) for g in gpus):
            return False
        if req.gpu_memory_mib is not None and any(d.memory_mib < req.gpu_memory_mib for d in r.devices):
            return False
        if any(self._unhealthy.get((r.node_id, d.index)) for d in r.devices):
            return False
        topo = spec.effective_topology
        idx = [d.index for d in r.devices]
        if cons.nvlink and not all(topo.is_nvlink(a, b) for a in idx for b in idx if a < b):
            return False
        return not (cons.same_numa and len({topo.numa_node(i) for i in idx}) > 1)

    async def _materialise(self, rec: GroupRecord) -> None:
        # One record: a part of a multi-node group is materialised on its own node, with its own devices.
        resources = ComputeGroup(rec, self._specs.get(rec.node_id)).resources
        resources["group_id"] = rec.id
        resources["env"] = group_env(rec)
        try:
            await self.provider.allocate_resources(rec.component or "", resources)
        except Exception as exc:
            # Undo the allocation so a failed materialisation leaves nothing behind.
            await self._release(rec.id)
            raise ProviderError(f"{self.provider.name}: could not materialise group {rec.id}: {exc}") from exc

    async def deallocate_compute_group(self, group_id: object) -> bool:
        """Release a group. Returns False (and changes nothing) if it already had no owner."""
        self._require_open()
        gid = _check_group_id(group_id)
        prior = await self._release(gid)
        if not prior:
            return False
        first = prior[0]
        try:
            await self.provider.deallocate_resources(first.component or "", [r.id for r in prior])
        except Exception as exc:  # the state is released already; report, do not undo
            log.warning("provider could not undo group %s: %s", gid, exc)
            self.emit(Event("provider-error", gid, first.node_id, first.component, str(exc)))
        self.emit(Event("released", first.gang_id or first.id, first.node_id, first.component))
        return True

    def _parts(self, gid: str) -> list[GroupRecord]:
        """The records behind a group id: one, or every part of a multi-node group."""
        r = self._records.get(gid)
        gang = gid if gid in self._gangs else (r.gang_id if r is not None else None)
        if gang is not None and gang in self._gangs:
            return sorted((self._records[p] for p in self._gangs[gang]), key=lambda x: x.id)
        if r is None:
            raise NotFoundError(f"group_id: no compute group {gid!r}")
        return [r]

    def _promotions(self, released: list[GroupRecord], now: float) -> list[GroupRecord]:
        """Waiting preemptors whose last victim is among ``released`` and that now fit: allocate them."""
        waiters = {r.preempted_by for r in released if r.preempted_by}
        if not waiters:
            return []
        out: list[GroupRecord] = []
        gone = {r.id for r in released}
        for waiter_id in waiters:
            assert waiter_id is not None
            waiter = self._records.get(waiter_id)
            if waiter is None or not waiter.pending or waiter.state is AllocationState.RELEASED:
                continue
            if self._victims.get(waiter_id, set()) - gone:
                continue
            node = self._cluster.by_id.get(waiter.node_id)
            if node is None:
                continue
            trial = node.without([r for r in released if r.node_id == waiter.node_id and r.holds_capacity])
            fits = (
                trial.cpu_free >= waiter.cpus_milli
                and trial.mem_free >= waiter.memory_mib
                and all(trial.gpu_used[d.index] + d.share_milli <= MILLI for d in waiter.devices)
            )
            if fits:
                out.append(waiter.replace(state=AllocationState.ALLOCATED, pending=False, updated_at=now))
        return out

    async def _release(self, gid: str) -> list[GroupRecord]:
        """Release a group (every part of a multi-node one); returns the records as they were, and
        allocates waiting preemptors whose victims are now all gone."""
        prior: list[GroupRecord] = []
        promoted: list[GroupRecord] = []
        async with self._lock:

            def build() -> tuple[list[GroupRecord], list[str]]:
                nonlocal prior, promoted
                now = self._clock()
                parts = self._parts(gid)
                prior = [r for r in parts if r.component is not None and r.state is not AllocationState.RELEASED]
                if not prior:
                    return [], []
                ups = []
                for r in prior:
                    if r.carved:
                        state = (
                            AllocationState.DRAINING if r.state is AllocationState.DRAINING else AllocationState.FREE
                        )
                        ups.append(r.replace(state=state, component=None, request_id=None, updated_at=now))
                    else:
                        ups.append(r.replace(state=AllocationState.RELEASED, updated_at=now))
                promoted = self._promotions(prior, now)
                return ups + promoted, []

            await self._commit(build)
        for waiter in promoted:
            log.info("preemptor %s of %s is allocated: its victims have drained", waiter.id, waiter.component)
            await self._materialise(waiter)
            self.emit(Event("allocated", waiter.id, waiter.node_id, waiter.component, "after preemption"))
        return prior

    async def drain_compute_group(self, group_id: object) -> bool:
        """Mark a group draining: it gets no new owner; a current owner keeps it until release.

        Returns False if it was already draining; ConflictError if it was released.
        """
        self._require_open()
        gid = _check_group_id(group_id)
        async with self._lock:

            def build() -> tuple[list[GroupRecord], list[str]]:
                parts = self._parts(gid)
                if all(r.state is AllocationState.RELEASED for r in parts):
                    raise ConflictError(f"group {gid} is released; there is nothing to drain")
                if any(r.pending for r in parts):
                    raise ConflictError(f"group {gid} waits for preempted groups; release it to cancel the request")
                live = [r for r in parts if r.state not in (AllocationState.RELEASED, AllocationState.DRAINING)]
                return [r.replace(state=AllocationState.DRAINING) for r in live], []

            changed = await self._commit(build) or []
        if changed:
            self.emit(Event("drained", changed[0].gang_id or gid, changed[0].node_id, changed[0].component))
        return bool(changed)

    async def get_allocation_summary(self) -> dict[str, Any]:
        """Totals: total/allocated/reserved/free/unhealthy GPUs, groups by state, GPUs per component."""
        self._require_open()
        async with self._lock:
            await self._refresh()
            records = [r for r in self._records.values() if r.holds_capacity]
            nodes = self._cluster.nodes
            free_gpus = sum(st.gpus_free() for st in nodes)
        total = sum(st.gpu_count for st in nodes)
        components: dict[str, float] = {}
        reservations: dict[str, float] = {}
        allocated = reserved = 0
        by_state: dict[str, int] = {}
        for r in records:
            milli = r.share_milli
            by_state[r.state.value] = by_state.get(r.state.value, 0) + 1
            if r.component is not None and r.state in _IN_USE:
                allocated += milli
                components[r.component] = round(components.get(r.component, 0.0) + milli / MILLI, 3)
            else:  # pre-carved free groups, and reservations not yet claimed
                reserved += milli
                if r.component is not None:
                    reservations[r.component] = round(reservations.get(r.component, 0.0) + milli / MILLI, 3)
        return {
            "nodes": len(nodes),
            "total_gpus": total,
            "allocated_gpus": allocated / MILLI,
            "reserved_gpus": reserved / MILLI,
            "free_gpus": round(free_gpus, 3),
            "unhealthy_gpus": len(self._unhealthy),
            "total_cpus": sum(st.spec.cpus_milli for st in nodes) / MILLI,
            "free_cpus": sum(st.cpu_free for st in nodes) / MILLI,
            "groups": by_state,
            "components": dict(sorted(components.items())),
            "reservations": dict(sorted(reservations.items())),
            "pools": self._pool_summary(records),
            "revision": self._rev,
        }

    def _pool_summary(self, records: Sequence[GroupRecord]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, members in self._pool_members.items():
            held = [r for r in records if r.node_id in members]
            comps: Counter[str] = Counter()
            tenants: Counter[str] = Counter()
            for r in held:
                if r.component is None or r.state not in _IN_USE:
                    continue
                milli = r.share_milli
                comps[r.component] += milli
                if r.tenant is not None:
                    tenants[r.tenant] += milli
            out[name] = {
                "nodes": len(members),
                "priority": self.pools[name].priority,
                "total_gpus": self._pool_gpus[name],
                "allocated_gpus": sum(comps.values()) / MILLI,
                "free_gpus": round(sum(self._cluster.by_id[n].gpus_free() for n in members), 3),
                "components": {k: v / MILLI for k, v in sorted(comps.items())},
                "tenants": {k: v / MILLI for k, v in sorted(tenants.items())},
            }
        return out

    def held_by(self, component_name: object) -> list[ComputeGroup]:
        """Groups a component owns as of the last catch-up with the store (synchronous, no I/O).

        For callers that cannot await (a planner's synchronous hooks); prefer
        ``get_component_allocations``, which reads the store first.
        """
        component = _check_name("component_name", component_name)
        records = [r for r in self._records.values() if r.component == component and r.state in _OWNED]
        records.sort(key=lambda r: (r.created_at, r.id))
        return self._views(records)

    async def get_component_allocations(self, component_name: object) -> list[ComputeGroup]:
        """Groups a component owns (allocated, reserved or draining)."""
        self._require_open()
        component = _check_name("component_name", component_name)
        async with self._lock:
            await self._refresh()
            records = [r for r in self._records.values() if r.component == component and r.state in _OWNED]
        records.sort(key=lambda r: (r.created_at, r.id))
        return self._views(records)

    # -- health -----------------------------------------------------------------------
    async def refresh_health(self) -> list[Event]:
        """Sample the provider's device health and utilization once; returns the events it caused."""
        self._require_open()
        samples = await self.provider.sample_health()
        events: list[Event] = []
        async with self._lock:
            for h in samples:
                key = (h.node_id, h.index)
                if h.gpu_util is not None or h.memory_used_mib is not None:
                    self._telemetry[key] = {
                        "gpu": float(h.gpu_util or 0.0),
                        "memory_used_mib": float(h.memory_used_mib or 0.0),
                    }
                was_bad = key in self._unhealthy
                if not h.healthy and not was_bad:
                    self._unhealthy[key] = h.reason or "unhealthy"
                    self._cluster.set_unhealthy(h.node_id, h.index, True)
                    events.append(Event("device-unhealthy", None, h.node_id, None, f"GPU {h.index}: {h.reason}"))
                elif h.healthy and was_bad:
                    del self._unhealthy[key]
                    self._cluster.set_unhealthy(h.node_id, h.index, False)
                    events.append(Event("device-healthy", None, h.node_id, None, f"GPU {h.index}"))
        for e in events:
            self.emit(e)
        return events

    async def clear_device_health(self, node_id: object, index: object) -> bool:
        """Operator override: mark a device healthy again (the provider accepts the errors seen so far).

        Returns False if the device was not marked unhealthy. New errors mark it unhealthy again.
        """
        self._require_open()
        node_id = _check_name("node_id", node_id)
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise InvalidRequestError(f"index: {index!r} is not a GPU index", key="index")
        clear = getattr(self.provider, "clear_device_health", None)
        if clear is not None:
            clear(node_id, index)
        async with self._lock:
            reason = self._unhealthy.pop((node_id, index), None)
            if reason is not None:
                self._cluster.set_unhealthy(node_id, index, False)
        if reason is None:
            return False
        self.emit(Event("device-healthy", None, node_id, None, f"GPU {index}: cleared by operator (was: {reason})"))
        return True

    async def reconcile(self) -> list[Event]:
        """Correct the state against reality (vanished or unhealthy devices, gone processes); see monitor.py."""
        self._require_open()
        return await reconcile(self)

    def unhealthy_devices(self) -> dict[tuple[str, int], str]:
        """Devices currently marked unhealthy, with the reason."""
        return dict(self._unhealthy)

    def group_health(self, group: ComputeGroup) -> list[str]:
        """Reasons the devices of a group are unhealthy (empty when healthy)."""
        return [
            f"GPU {d.index}: {self._unhealthy[(group.node_id, d.index)]}"
            for d in group.record.devices
            if (group.node_id, d.index) in self._unhealthy
        ]

    @property
    def revision(self) -> int:
        """The state revision this manager has caught up to."""
        return self._rev

    def node_specs(self) -> Sequence[NodeSpec]:
        """What discovery found."""
        return self.inventory.nodes
