"""Read-only views of the ledger: groups, nodes and summaries, as the seed's API returns them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from computegroups.decide.ledger import Ledger
from computegroups.errors import InvalidRequestError, NotFoundError, one_of
from computegroups.model import (
    MILLI,
    AllocationState,
    ComputeGroup,
    ComputeNode,
    GangComputeGroup,
    GroupRecord,
    check_text,
)

__all__ = ["FILTER_KEYS", "Views", "parse_filters", "select"]

Telemetry = Callable[[str, int], Mapping[str, float]]
_OWNED = (AllocationState.ALLOCATED, AllocationState.DRAINING, AllocationState.RESERVED)
_IN_USE = (AllocationState.ALLOCATED, AllocationState.DRAINING)  # with an owner: not a reservation, not free
FILTER_KEYS = ("component", "state", "node_id", "include_released")
_STATES = [s.value for s in AllocationState]


def parse_filters(filters: object) -> dict[str, Any]:
    """The filters of ``list_compute_groups``, checked: InvalidRequestError naming ``filters.<key>``."""
    if filters is not None and not isinstance(filters, Mapping):
        raise InvalidRequestError(f"filters: {type(filters).__name__} is not a mapping", key="filters")
    f = dict(filters or {})
    unknown = sorted(str(k) for k in f if k not in FILTER_KEYS)
    if unknown:
        raise InvalidRequestError(
            f"filters.{unknown[0]}: unknown key; allowed: {one_of(FILTER_KEYS)}", key=f"filters.{unknown[0]}"
        )
    for key in ("component", "node_id"):
        if key in f:
            check_text(f"filters.{key}", f[key])
    if not isinstance(f.get("include_released", False), bool):
        raise InvalidRequestError("filters.include_released: not true or false", key="filters.include_released")
    state = f.get("state")
    if state is not None and state not in _STATES:
        raise InvalidRequestError(f"filters.state: {state!r} is not one of {one_of(_STATES)}", key="filters.state")
    return f


def select(records: Iterable[GroupRecord], f: Mapping[str, Any]) -> list[GroupRecord]:
    """The records that pass checked filters (released ones only with ``state`` or ``include_released``)."""
    out = list(records)
    if "node_id" in f:
        out = [r for r in out if r.node_id == f["node_id"]]
    if "component" in f:
        out = [r for r in out if r.component == f["component"]]
    state = f.get("state")
    if state is not None:
        out = [r for r in out if r.state.value == state]
    elif not f.get("include_released"):
        out = [r for r in out if r.state is not AllocationState.RELEASED]
    return out


class Views:
    """Builds :class:`ComputeGroup` and :class:`ComputeNode` views and summaries from a ledger."""

    def __init__(self, ledger: Ledger, telemetry: Telemetry) -> None:
        self.ledger = ledger
        self.telemetry = telemetry

    def group(self, r: GroupRecord) -> ComputeGroup:
        """The view of a record (of the whole multi-node group it is a part of)."""
        ledger = self.ledger
        if r.gang_id and r.gang_id in ledger.gangs:
            return self._gang(r.gang_id)
        return ComputeGroup(r, ledger.specs.get(r.node_id), self.telemetry)

    def by_id(self, gid: str) -> ComputeGroup:
        """The view of a group or of a multi-node group by its id; NotFoundError if unknown."""
        ledger = self.ledger
        if gid in ledger.gangs:
            return self._gang(gid)
        r = ledger.records.get(gid)
        if r is None:
            raise NotFoundError(f"group_id: no compute group {gid!r}")
        return self.group(r)

    def _gang(self, gang_id: str) -> ComputeGroup:
        ledger = self.ledger
        parts = sorted((ledger.records[p] for p in ledger.gangs[gang_id]), key=lambda r: r.id)
        return GangComputeGroup(gang_id, parts, ledger.specs, self.telemetry)

    def groups(self, records: Iterable[GroupRecord]) -> list[ComputeGroup]:
        """Views of records in creation order, a multi-node group once (at its first part)."""
        out: list[ComputeGroup] = []
        seen: set[str] = set()
        for r in sorted(records, key=lambda r: (r.created_at, r.id)):
            key = r.gang_id or r.id
            if key not in seen:
                seen.add(key)
                out.append(self.group(r))
        return out

    def health_of(self, group: ComputeGroup) -> list[str]:
        """Reasons the devices of a group are unhealthy (empty when healthy)."""
        bad = self.ledger.unhealthy
        node = group.node_id
        return [f"GPU {d.index}: {bad[(node, d.index)]}" for d in group.record.devices if (node, d.index) in bad]

    def owned_by(self, component: str) -> list[ComputeGroup]:
        """Groups a component owns (allocated, reserved or draining)."""
        return self.groups(r for r in self.ledger.records.values() if r.component == component and r.state in _OWNED)

    def nodes(self) -> list[ComputeNode]:
        """Every node with the groups holding capacity on it and its free capacity."""
        ledger = self.ledger
        out = []
        for st in ledger.cluster.nodes:
            node_id = st.spec.id
            held = [ledger.records[g] for g in ledger.by_node.get(node_id, ()) if ledger.records[g].holds_capacity]
            held.sort(key=lambda r: (r.created_at, r.id))
            free = {
                "gpus": st.gpus_free(),
                "whole_gpus": st.free_count,
                "cpus": st.cpu_free / MILLI,
                "memory_mib": st.mem_free,
            }
            unhealthy = frozenset(i for (n, i) in ledger.unhealthy if n == node_id)
            groups = [self.group(r) for r in held]
            cordoned = ledger.cordon_reason(node_id) if st.cordoned else None
            out.append(ComputeNode(st.spec, groups, free, unhealthy, self.telemetry, cordoned))
        return out

    def summary(self) -> dict[str, Any]:
        """Totals: total/allocated/reserved/free/unhealthy GPUs, groups by state, GPUs per component."""
        ledger = self.ledger
        records = [r for r in ledger.records.values() if r.holds_capacity]
        nodes = ledger.cluster.nodes
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
            "total_gpus": sum(st.gpu_count for st in nodes),
            "allocated_gpus": allocated / MILLI,
            "reserved_gpus": reserved / MILLI,
            "free_gpus": round(sum(st.gpus_free() for st in nodes), 3),
            "unhealthy_gpus": len(ledger.unhealthy),
            "cordoned_nodes": len(ledger.cluster.cordoned),
            "total_cpus": sum(st.spec.cpus_milli for st in nodes) / MILLI,
            "free_cpus": sum(st.cpu_free for st in nodes) / MILLI,
            "groups": by_state,
            "components": dict(sorted(components.items())),
            "reservations": dict(sorted(reservations.items())),
            "pools": self._pools(records),
            "revision": ledger.revision,
        }

    def _pools(self, records: Sequence[GroupRecord]) -> dict[str, Any]:
        ledger = self.ledger
        out: dict[str, Any] = {}
        for name, members in ledger.pool_members.items():
            comps: Counter[str] = Counter()
            tenants: Counter[str] = Counter()
            for r in records:
                if r.node_id not in members or r.component is None or r.state not in _IN_USE:
                    continue
                comps[r.component] += r.share_milli
                if r.tenant is not None:
                    tenants[r.tenant] += r.share_milli
            out[name] = {
                "nodes": len(members),
                "priority": ledger.pools[name].priority,
                "total_gpus": ledger.pool_gpus[name],
                "allocated_gpus": sum(comps.values()) / MILLI,
                "free_gpus": round(sum(ledger.cluster.by_id[n].gpus_free() for n in members), 3),
                "components": {k: v / MILLI for k, v in sorted(comps.items())},
                "tenants": {k: v / MILLI for k, v in sorted(tenants.items())},
            }
        return out
