"""ComputeGroupManager: the seed's async API over placement, a state store and a provider.

One request goes: validate (typed, before anything is read) -> catch up with the
store -> place (pure) -> commit if the revision is unchanged, else catch up and
decide again -> materialise through the provider. A group is never visible to
anyone before its commit is durable, and a rejected request changes nothing.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from computegroups.errors import (
    ConflictError,
    InvalidRequestError,
    NotFoundError,
    ProviderError,
    one_of,
)
from computegroups.model import (
    MILLI,
    AllocationState,
    ComputeGroup,
    ComputeNode,
    Constraints,
    GroupRecord,
    NodeSpec,
    Requirements,
    group_env,
)
from computegroups.placement.cluster import Cluster
from computegroups.placement.engine import place
from computegroups.providers.base import ComputeResourceProvider, Inventory
from computegroups.state.base import Changes, RevisionConflict, StateStore
from computegroups.state.memory import MemoryStateStore
from computegroups.state.sqlite import SqliteStateStore, default_state_path

__all__ = ["ComputeGroupManager", "Event"]

log = logging.getLogger("computegroups")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,252}$")
_FILTER_KEYS = ("component", "state", "node_id", "include_released")
_OWNED = (AllocationState.ALLOCATED, AllocationState.DRAINING, AllocationState.RESERVED)


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a group or a device, for the event stream and logs."""

    kind: str  # allocated, released, drained, created, deleted, device-unhealthy, device-healthy, ...
    group_id: str | None = None
    node_id: str | None = None
    component: str | None = None
    detail: str = ""
    at: float = field(default_factory=time.time)


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
    """

    def __init__(
        self,
        provider: ComputeResourceProvider,
        state: StateStore | str | os.PathLike[str] | None = None,
        *,
        id_factory: Callable[[], str] | None = None,
        tombstone_limit: int = 10_000,
        max_attempts: int = 64,
    ) -> None:
        if not isinstance(provider, ComputeResourceProvider):
            raise InvalidRequestError(
                f"provider: {type(provider).__name__} is not a ComputeResourceProvider", key="provider"
            )
        self.provider = provider
        self.store = _open_store(state)
        self._new_id = id_factory or (lambda: "cg-" + uuid.uuid4().hex[:16])
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

    # -- lifecycle ----------------------------------------------------------------
    async def __aenter__(self) -> ComputeGroupManager:
        await self.provider.__aenter__()
        try:
            self.inventory = await self.provider.discover_resources()
            self._specs = {n.id: n for n in self.inventory.nodes}
            self._cluster = Cluster(self.inventory.nodes)
            await self.store.open()
            await self._refresh()
        except BaseException:
            await self.store.close()
            await self.provider.__aexit__(None, None, None)
            raise
        for note in self.inventory.notes:
            log.info("discovery: %s", note)
        self._entered = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._entered = False
        try:
            await self.store.close()
        finally:
            await self.provider.__aexit__(exc_type, exc, tb)

    def _require_open(self) -> None:
        if not self._entered:
            raise ConflictError("ComputeGroupManager is not open; use 'async with ComputeGroupManager(...) as mgr'")

    # -- keeping the mirror in step with the store ----------------------------------
    async def _refresh(self) -> None:
        changes = await self.store.changes_since(self._rev)
        if changes.revision != self._rev or changes.full:
            self._apply_changes(changes)

    def _apply_changes(self, changes: Changes) -> None:
        if changes.full:
            self._cluster = Cluster(self.inventory.nodes)
            for node_id, index in self._unhealthy:
                self._cluster.set_unhealthy(node_id, index, True)
            self._records.clear()
            self._by_request.clear()
            self._by_node.clear()
            self._carved_free.clear()
            self._tombstones.clear()
            for r in sorted(changes.upserts, key=lambda r: (r.updated_at, r.id)):
                self._index(r)
        else:
            for r in changes.upserts:
                self._unindex(r.id)
                self._index(r)
            for gid in changes.deletes:
                self._unindex(gid)
        self._rev = changes.revision

    def _index(self, r: GroupRecord) -> None:
        self._records[r.id] = r
        self._cluster.apply(r)
        if r.request_id and r.state is not AllocationState.RELEASED:
            self._by_request[r.request_id] = r.id
        elif r.request_id:
            self._by_request.setdefault(r.request_id, r.id)
        self._by_node.setdefault(r.node_id, set()).add(r.id)
        if r.carved and r.state is AllocationState.FREE:
            self._carved_free[r.id] = None
        if r.state is AllocationState.RELEASED:
            self._tombstones.append(r.id)

    def _unindex(self, gid: str) -> None:
        old = self._records.pop(gid, None)
        if old is None:
            return
        self._cluster.remove(old)
        if old.request_id and self._by_request.get(old.request_id) == gid:
            del self._by_request[old.request_id]
        ids = self._by_node.get(old.node_id)
        if ids is not None:
            ids.discard(gid)
        self._carved_free.pop(gid, None)

    async def _commit(self, build: Callable[[], tuple[list[GroupRecord], list[str]]]) -> list[GroupRecord] | None:
        """Decide with ``build`` against the freshest state and commit; retry on a lost race.

        Returns the records written, or None when ``build`` found nothing to change.
        Old tombstones (released groups past ``tombstone_limit``) are pruned in the same commit.
        """
        for _ in range(self._max_attempts):
            await self._refresh()
            upserts, deletes = build()
            if not upserts and not deletes:
                return None
            excess = max(0, len(self._tombstones) - self._tombstone_limit)
            written = {r.id for r in upserts} | set(deletes)
            for gid in itertools.islice(self._tombstones, excess):
                r = self._records.get(gid)
                if r is not None and r.state is AllocationState.RELEASED and gid not in written:
                    deletes.append(gid)
                    written.add(gid)
            try:
                rev = await self.store.commit(self._rev, upserts, deletes)
            except RevisionConflict:
                continue
            for _ in range(excess):
                self._tombstones.popleft()
            self._apply_changes(Changes(rev, upserts, deletes))
            return upserts
        raise ConflictError(f"state kept changing underneath; gave up after {self._max_attempts} attempts")

    # -- events ---------------------------------------------------------------------
    def _emit(self, event: Event) -> None:
        self.recent_events.append(event)
        log.debug("event %s", event)
        for q in self._subscribers:
            q.put_nowait(event)

    async def events(self) -> AsyncIterator[Event]:
        """An endless stream of events from now on (allocations, releases, health changes)."""
        q: asyncio.Queue[Event] = asyncio.Queue()
        self._subscribers.append(q)
        try:
            while True:
                yield await q.get()
        finally:
            self._subscribers.remove(q)

    # -- views ------------------------------------------------------------------------
    def _view(self, r: GroupRecord) -> ComputeGroup:
        return ComputeGroup(r, self._specs.get(r.node_id), self._telemetry_of)

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
        return [self._view(r) for r in records]

    async def get_compute_group(self, group_id: str) -> ComputeGroup:
        """Get one group by id; raises NotFoundError if unknown."""
        self._require_open()
        gid = _check_group_id(group_id)
        async with self._lock:
            await self._refresh()
            r = self._records.get(gid)
        if r is None:
            raise NotFoundError(f"group_id: no compute group {gid!r}")
        return self._view(r)

    async def create_compute_group(
        self, resources: Mapping[str, Any] | Requirements, node_id: str | None = None
    ) -> ComputeGroup:
        """Pre-carve a free group holding ``resources`` (on ``node_id`` if given).

        ``allocate_compute_group`` hands out matching free groups before carving new
        capacity; a released pre-carved group becomes free again.
        """
        self._require_open()
        req = Requirements.parse(resources)
        cons = Constraints(node_id=node_id)
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
        self._emit(Event("created", rec.id, rec.node_id))
        return self._view(rec)

    async def delete_compute_group(self, group_id: str) -> bool:
        """Delete a pre-carved group. Refuses a group with an owner (ConflictError).

        Returns False if the group was already released.
        """
        self._require_open()
        gid = _check_group_id(group_id)
        async with self._lock:

            def build() -> tuple[list[GroupRecord], list[str]]:
                r = self._records.get(gid)
                if r is None:
                    raise NotFoundError(f"group_id: no compute group {gid!r}")
                if r.state is AllocationState.RELEASED:
                    return [], []
                if r.component is not None:
                    raise ConflictError(
                        f"group {gid} is {r.state.value} by {r.component}; deallocate it before deleting"
                    )
                return [], [gid]

            r = self._records.get(gid)
            done = await self._commit(build) is not None
        if done and r is not None:
            self._emit(Event("deleted", gid, r.node_id))
        return done

    async def allocate_compute_group(
        self,
        component_name: str,
        resource_requirements: Mapping[str, Any] | Requirements,
        constraints: Mapping[str, Any] | Constraints | None = None,
    ) -> ComputeGroup:
        """Allocate a group to a component. Raises InvalidRequestError, InsufficientResourcesError,
        ConflictError (request id reused for another component) or ProviderError (nothing kept).

        With ``constraints["request_id"]``, a retry returns the group the first call made.
        """
        self._require_open()
        component = _check_name("component_name", component_name)
        req = Requirements.parse(resource_requirements)
        cons = Constraints.parse(constraints)
        reused = False
        async with self._lock:
            now = time.time()

            def build() -> tuple[list[GroupRecord], list[str]]:
                nonlocal reused
                if cons.request_id is not None and cons.request_id in self._by_request:
                    prior = self._records[self._by_request[cons.request_id]]
                    if prior.component != component:
                        raise ConflictError(
                            f"constraints.request_id: {cons.request_id!r} was used by {prior.component!r}, "
                            f"not {component!r}"
                        )
                    reused = True
                    return [], []
                carved = self._match_carved(req, cons)
                if carved is not None:
                    return [
                        carved.replace(
                            state=AllocationState.ALLOCATED,
                            component=component,
                            request_id=cons.request_id,
                            constraints=cons.to_dict(),
                        )
                    ], []
                d = place(self._cluster, req, cons)
                rec = GroupRecord(
                    id=self._new_id(),
                    node_id=d.node_id,
                    state=AllocationState.ALLOCATED,
                    component=component,
                    devices=d.devices,
                    cpus_milli=d.cpus_milli,
                    memory_mib=d.memory_mib,
                    request_id=cons.request_id,
                    requirements=req.to_dict(),
                    constraints=cons.to_dict(),
                    created_at=now,
                    updated_at=now,
                )
                return [rec], []

            committed = await self._commit(build) or []
            if reused:
                assert cons.request_id is not None
                return self._view(self._records[self._by_request[cons.request_id]])
            (rec,) = committed
        await self._materialise(rec)
        self._emit(Event("allocated", rec.id, rec.node_id, component))
        return self._view(rec)

    def _match_carved(self, req: Requirements, cons: Constraints) -> GroupRecord | None:
        for gid in self._carved_free:
            r = self._records[gid]
            if req.share_milli:
                if len(r.devices) != 1 or r.devices[0].share_milli != req.share_milli:
                    continue
            elif len(r.devices) != req.whole_gpus or any(d.share_milli != MILLI for d in r.devices):
                continue
            if r.cpus_milli < req.cpus_milli or r.memory_mib < req.memory_mib:
                continue
            if cons.node_id is not None and r.node_id != cons.node_id:
                continue
            spec = self._specs.get(r.node_id)
            if spec is None:
                continue
            if any(spec.labels.get(k) != v for k, v in cons.labels.items()):
                continue
            gpus = [spec.gpus[d.index] for d in r.devices]
            if req.models and not all(any(m in g.name.lower() for m in req.models) for g in gpus):
                continue
            if req.gpu_memory_mib is not None and any(d.memory_mib < req.gpu_memory_mib for d in r.devices):
                continue
            if any(self._unhealthy.get((r.node_id, d.index)) for d in r.devices):
                continue
            topo = spec.effective_topology
            idx = [d.index for d in r.devices]
            if cons.nvlink and not all(topo.is_nvlink(a, b) for a in idx for b in idx if a < b):
                continue
            if cons.same_numa and len({topo.numa_node(i) for i in idx}) > 1:
                continue
            return r
        return None

    async def _materialise(self, rec: GroupRecord) -> None:
        resources = self._view(rec).resources
        resources["group_id"] = rec.id
        resources["env"] = group_env(rec)
        try:
            await self.provider.allocate_resources(rec.component or "", resources)
        except Exception as exc:
            # Undo the allocation so a failed materialisation leaves nothing behind.
            await self._release(rec.id)
            raise ProviderError(f"{self.provider.name}: could not materialise group {rec.id}: {exc}") from exc

    async def deallocate_compute_group(self, group_id: str) -> bool:
        """Release a group. Returns False (and changes nothing) if it already had no owner."""
        self._require_open()
        gid = _check_group_id(group_id)
        prior = await self._release(gid)
        if prior is None:
            return False
        try:
            await self.provider.deallocate_resources(prior.component or "", [gid])
        except Exception as exc:  # the state is released already; report, do not undo
            log.warning("provider could not undo group %s: %s", gid, exc)
            self._emit(Event("provider-error", gid, prior.node_id, prior.component, str(exc)))
        self._emit(Event("released", gid, prior.node_id, prior.component))
        return True

    async def _release(self, gid: str) -> GroupRecord | None:
        prior: GroupRecord | None = None
        async with self._lock:

            def build() -> tuple[list[GroupRecord], list[str]]:
                nonlocal prior
                r = self._records.get(gid)
                if r is None:
                    raise NotFoundError(f"group_id: no compute group {gid!r}")
                prior = None
                if r.component is None or r.state is AllocationState.RELEASED:
                    return [], []
                prior = r
                if r.carved:
                    state = AllocationState.DRAINING if r.state is AllocationState.DRAINING else AllocationState.FREE
                    return [r.replace(state=state, component=None, request_id=None)], []
                return [r.replace(state=AllocationState.RELEASED)], []

            await self._commit(build)
        return prior

    async def drain_compute_group(self, group_id: str) -> bool:
        """Mark a group draining: it gets no new owner; a current owner keeps it until release.

        Returns False if it was already draining; ConflictError if it was released.
        """
        self._require_open()
        gid = _check_group_id(group_id)
        async with self._lock:

            def build() -> tuple[list[GroupRecord], list[str]]:
                r = self._records.get(gid)
                if r is None:
                    raise NotFoundError(f"group_id: no compute group {gid!r}")
                if r.state is AllocationState.RELEASED:
                    raise ConflictError(f"group {gid} is released; there is nothing to drain")
                if r.state is AllocationState.DRAINING:
                    return [], []
                return [r.replace(state=AllocationState.DRAINING)], []

            changed = await self._commit(build) or []
        if changed:
            self._emit(Event("drained", gid, changed[0].node_id, changed[0].component))
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
        allocated = reserved = 0
        by_state: dict[str, int] = {}
        for r in records:
            milli = sum(d.share_milli for d in r.devices)
            by_state[r.state.value] = by_state.get(r.state.value, 0) + 1
            if r.component is not None:
                allocated += milli
                components[r.component] = round(components.get(r.component, 0.0) + milli / MILLI, 3)
            else:
                reserved += milli
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
            "revision": self._rev,
        }

    async def get_component_allocations(self, component_name: str) -> list[ComputeGroup]:
        """Groups a component owns (allocated, reserved or draining)."""
        self._require_open()
        component = _check_name("component_name", component_name)
        async with self._lock:
            await self._refresh()
            records = [r for r in self._records.values() if r.component == component and r.state in _OWNED]
        records.sort(key=lambda r: (r.created_at, r.id))
        return [self._view(r) for r in records]

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
            self._emit(e)
        return events

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
