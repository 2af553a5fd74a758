"""The placement engine: filter nodes, pick devices, score, choose. Pure and synchronous.

``place(cluster, requirements, constraints)`` reads the cluster and returns a
:class:`Decision`, or raises :class:`InsufficientResourcesError` with the reasons
nodes were rejected. It never mutates the cluster; the manager applies the
decision once the state store has committed it.

Candidates come from the cluster's indexes in the strategy's order (fullest
first for bin-pack, emptiest first for spread). The engine scores feasible
candidates and stops as soon as no later candidate's upper bound can beat the
best so far, or after ``limit`` feasible candidates, so one decision never scans
the fleet when capacity is available.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from computegroups.errors import InsufficientResourcesError
from computegroups.model import MILLI, Constraints, DeviceShare, Requirements, Strategy
from computegroups.placement import fragmentation
from computegroups.placement.cluster import Cluster, NodeState
from computegroups.placement.plugins import (
    EMPTY_CONTEXT,
    AffinityFilter,
    CapacityFilter,
    Context,
    CordonFilter,
    FilterPlugin,
    NodeSelectorFilter,
    Pick,
    PreferredAffinityScore,
    ScorePlugin,
    TopologyScore,
    eligible_mask,
    share_memory,
    share_target,
    strategy_plugin,
)

__all__ = ["DEFAULT_FILTERS", "Decision", "candidates", "pick_devices", "place"]

DEFAULT_FILTERS: tuple[FilterPlugin, ...] = (NodeSelectorFilter(), AffinityFilter(), CordonFilter(), CapacityFilter())
_TOPOLOGY = TopologyScore()
_PREFERRED = PreferredAffinityScore()


class Decision(NamedTuple):
    """Where a request goes: a node, the devices on it, and the host resources."""

    node_id: str
    devices: tuple[DeviceShare, ...]
    cpus_milli: int
    memory_mib: int
    score: float


def candidates(
    cluster: Cluster, req: Requirements, cons: Constraints, ctx: Context = EMPTY_CONTEXT
) -> Iterator[NodeState]:
    """Nodes that might fit, in the order the strategy prefers them."""
    spread = cons.strategy is Strategy.SPREAD
    if cons.node_id is None and not cons.affinity and not req.share_milli:
        return cluster.iter_by_free(req.whole_gpus, descending=spread)  # the common case, without a wrapper
    return _candidates(cluster, req, cons, ctx, spread)


def _candidates(
    cluster: Cluster, req: Requirements, cons: Constraints, ctx: Context, spread: bool
) -> Iterator[NodeState]:
    if cons.node_id is not None:
        st = cluster.by_id.get(cons.node_id)
        if st is not None:
            yield st
        return
    if cons.affinity:
        required_near = [s for rule, s in zip(cons.affinity, ctx.near, strict=False) if rule.required]
        if required_near:
            # Only nodes near the other component can qualify: visit those, not the fleet.
            smallest = min(required_near, key=len)
            by_id = cluster.by_id
            order = sorted(
                (-st.free_mask.bit_count() if spread else st.free_mask.bit_count(), st.ordinal)
                for st in (by_id[n] for n in smallest if n in by_id)
            )
            nodes = cluster.nodes
            for _, ordinal in order:
                yield nodes[ordinal]
            return
    if req.share_milli:
        if not spread:
            yield from cluster.iter_partial()
        yield from (st for st in cluster.iter_by_free(1, descending=spread) if not cluster.is_partial(st.ordinal))
        if spread:
            yield from cluster.iter_partial()
        return
    yield from cluster.iter_by_free(req.whole_gpus, descending=spread)


def pick_devices(node: NodeState, req: Requirements, cons: Constraints, ctx: Context = EMPTY_CONTEXT) -> Pick | str:
    """Choose the devices on a node that passed the filters, or say why none fit."""
    spec = node.spec
    blocked = ctx.blocked_mask(spec.id) if ctx.nominated else 0
    if req.share_milli:
        idx = share_target(node, req, eligible_mask(node, req) & ~blocked)
        if idx is None:
            return f"no GPU with {req.share_milli / MILLI:g} of a GPU free"
        dev = DeviceShare(idx, spec.gpus[idx].uuid, req.share_milli, share_memory(node, idx, req))
        return Pick((dev,), None, req.share_milli)
    k = req.whole_gpus
    if k == 0:
        return Pick((), None, 0)
    mask = node.free_mask & eligible_mask(node, req) & ~blocked
    choice = node.topology.best_subset(mask, k, nvlink=cons.nvlink, same_numa=cons.same_numa)
    if choice is None:
        need = "joined by NVLink" if cons.nvlink else "on one NUMA node"
        return f"no {k} free GPUs {need}"
    return Pick(node.whole_gpus(choice.indices), choice, k * MILLI)


def _filters_for(cons: Constraints, ctx: Context) -> tuple[FilterPlugin, ...]:
    """The default filters that can reject a node for this request (the others always pass)."""
    selects = cons.node_id is not None or ctx.allowed is not None or bool(ctx.excluded) or bool(cons.labels)
    return _FILTER_SETS[selects, bool(cons.affinity or cons.anti_affinity)]


_FILTER_SETS = {
    (selects, affinity): tuple(
        f
        for f in DEFAULT_FILTERS
        if (selects or not isinstance(f, NodeSelectorFilter)) and (affinity or not isinstance(f, AffinityFilter))
    )
    for selects in (False, True)
    for affinity in (False, True)
}


def place(
    cluster: Cluster,
    req: Requirements,
    cons: Constraints,
    *,
    filters: Sequence[FilterPlugin] = DEFAULT_FILTERS,
    scores: Sequence[ScorePlugin] | None = None,
    limit: int = 16,
    ctx: Context = EMPTY_CONTEXT,
) -> Decision:
    """Choose a node and devices for one request, or raise InsufficientResourcesError."""
    if scores is None:
        binpack = cons.strategy is not Strategy.SPREAD
        scores = _BINPACK_SCORES if binpack else _SPREAD_SCORES
        if ctx.prefer_near or ctx.prefer_away:
            scores = (*scores, _PREFERRED)
        frag = fragmentation.for_cluster(cluster, req)  # every request counts in the workload mix
        if frag is not None and binpack:
            scores = (*scores, frag)
            limit = max(limit, fragmentation.FRAGMENTATION_LIMIT)
    # Set checks first: a node outside the pool, holding another part of the gang or beside a component
    # it must avoid is passed over without running the filters (they explain it only if nothing fits).
    allowed: frozenset[str] | None = None
    barred: frozenset[str] = frozenset()
    screened: list[NodeState] = []
    if filters is DEFAULT_FILTERS:
        filters = _filters_for(cons, ctx)
        allowed = ctx.allowed
        barred = ctx.excluded
        if cons.anti_affinity:
            for rule, nodes in zip(cons.anti_affinity, ctx.away, strict=False):
                if rule.required:
                    barred = barred | nodes
    screen = allowed is not None or bool(barred)
    reasons: Counter[str] | None = None
    best: tuple[float, NodeState, Pick] | None = None
    best_total = 0.0
    feasible = visited = 0
    bounds = _bounds(scores, req, cluster.max_gpus)  # a bound depends on the node only through its free count
    for node in candidates(cluster, req, cons, ctx):
        if best is not None and bounds[node.free_mask.bit_count()] <= best_total:
            break
        visited += 1
        if screen:
            node_id = node.spec.id
            if (allowed is not None and node_id not in allowed) or node_id in barred:
                screened.append(node)
                continue
        reason = None
        for f in filters:
            reason = f.filter(node, req, cons, ctx)
            if reason is not None:
                break
        else:
            picked = pick_devices(node, req, cons, ctx)
            if isinstance(picked, str):
                reason = picked
        if reason is not None:
            if reasons is None:
                reasons = Counter()
            reasons[reason] += 1
            continue
        assert not isinstance(picked, str)
        total = 0.0
        for p in scores:
            total += p.weight * p.score(node, req, picked, ctx)
        if best is None or total > best_total:
            best = (total, node, picked)
            best_total = total
        feasible += 1
        if feasible >= limit:
            break
    if best is None:
        reasons = reasons if reasons is not None else Counter()
        for node in screened:
            reason = next((r for f in filters if (r := f.filter(node, req, cons, ctx)) is not None), "screened")
            reasons[reason] += 1
        _explain_unvisited(cluster, req, cons, reasons, visited)
        raise InsufficientResourcesError(f"no node can take {_describe(req, cons)}", reasons=reasons)
    total, node, picked = best
    return Decision(node.spec.id, picked.devices, req.cpus_milli, req.memory_mib, total)


_BINPACK_SCORES: tuple[ScorePlugin, ...] = (strategy_plugin(Strategy.BINPACK), _TOPOLOGY)
_SPREAD_SCORES: tuple[ScorePlugin, ...] = (strategy_plugin(Strategy.SPREAD), _TOPOLOGY)
_BOUNDS: dict[tuple[object, ...], tuple[float, ...]] = {}


def _bounds(scores: Sequence[ScorePlugin], req: Requirements, n_max: int) -> tuple[float, ...]:
    """Upper bound of the weighted score for a node with 0..n_max wholly free GPUs (remembered)."""
    key = (tuple(scores), req.whole_gpus, req.share_milli, req.cpus_milli, req.memory_mib, n_max)
    table = _BOUNDS.get(key)
    if table is None:
        table = tuple(sum(p.weight * p.bound(free, n_max, req) for p in scores) for free in range(n_max + 1))
        if len(_BOUNDS) >= 4096:
            _BOUNDS.clear()
        _BOUNDS[key] = table
    return table


def _explain_unvisited(
    cluster: Cluster, req: Requirements, cons: Constraints, reasons: Counter[str], visited: int
) -> None:
    """Account for the nodes the indexes skipped, so the error covers the whole fleet."""
    if cons.node_id is not None:
        if cons.node_id not in cluster.by_id:
            reasons[f"no node named {cons.node_id}"] += 1
        return
    if not cluster.nodes:
        reasons["no nodes discovered"] += 1
    skipped = len(cluster.nodes) - visited
    if skipped > 0:
        if req.share_milli:
            reasons["no GPU with any capacity free"] += skipped
        else:
            reasons[f"fewer than {req.whole_gpus} wholly free GPUs"] += skipped


def _describe(req: Requirements, cons: Constraints) -> str:
    parts = []
    if req.share_milli:
        parts.append(f"{req.share_milli / MILLI:g} of a GPU")
    elif req.whole_gpus:
        parts.append(f"{req.whole_gpus} GPU(s)")
    if req.models:
        parts.append("model " + "|".join(req.models))
    if req.gpu_memory_mib:
        parts.append(f">= {req.gpu_memory_mib} MiB GPU memory")
    if req.cpus_milli:
        parts.append(f"{req.cpus_milli / MILLI:g} CPUs")
    if req.memory_mib:
        parts.append(f"{req.memory_mib} MiB memory")
    if cons.nvlink:
        parts.append("joined by NVLink")
    if cons.same_numa:
        parts.append("on one NUMA node")
    return ", ".join(parts) or "the request"
