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
from computegroups.memo import Memo
from computegroups.model import MILLI, Constraints, DeviceShare, Requirements, Strategy
from computegroups.placement import fragmentation
from computegroups.placement.cluster import Cluster, NodeState
from computegroups.placement.fragmentation import FragmentationScore
from computegroups.placement.plugins import (
    EMPTY_CONTEXT,
    UNRESOLVABLE,
    UNSCHEDULABLE,
    AffinityFilter,
    CapacityFilter,
    Context,
    CordonFilter,
    FilterPlugin,
    NicFilter,
    NodeSelectorFilter,
    Pick,
    PreferredAffinityScore,
    Reason,
    ScorePlugin,
    TopologyScore,
    eligible_mask,
    nic_mask,
    nic_subset,
    nic_text,
    share_memory,
    share_target,
    strategy_plugin,
)

__all__ = [
    "DEFAULT_FILTERS",
    "Decision",
    "Screen",
    "candidates",
    "judge",
    "pick_devices",
    "place",
    "prefilter",
    "refusal",
]

DEFAULT_FILTERS: tuple[FilterPlugin, ...] = (
    NodeSelectorFilter(),
    AffinityFilter(),
    CordonFilter(),
    CapacityFilter(),
    NicFilter(),
)
_TOPOLOGY = TopologyScore()
_PREFERRED = PreferredAffinityScore()


class Decision(NamedTuple):
    """Where a request goes: a node, the devices on it, and the host resources."""

    node_id: str
    devices: tuple[DeviceShare, ...]
    cpus_milli: int
    memory_mib: int
    score: float


class Screen(NamedTuple):
    """What the filters' pre-filters decided for one request (see :class:`~.plugins.PreFilter`)."""

    filters: tuple[FilterPlugin, ...]  # the filters that can reject a node for this request
    visit: frozenset[str] | None  # only these nodes can qualify
    outside: Reason | None  # why the nodes outside ``visit`` cannot
    allowed: frozenset[str] | None  # nodes outside are passed over
    barred: frozenset[str]  # nodes inside are passed over


def prefilter(
    filters: Sequence[FilterPlugin], cluster: Cluster, req: Requirements, cons: Constraints, ctx: Context
) -> Screen:
    """Run every filter's pre-filter once: drop the filters that cannot reject, combine the node sets.

    The smallest ``visit`` set wins (ties: the first filter's); the others are still enforced by
    their filters on the nodes visited.
    """
    active: list[FilterPlugin] = []
    visit: frozenset[str] | None = None
    outside: Reason | None = None
    allowed: frozenset[str] | None = None
    barred: frozenset[str] = frozenset()
    for f in filters:
        pre = f.prefilter(cluster, req, cons, ctx)
        if pre.skip:
            continue
        active.append(f)
        if pre.visit is not None and (visit is None or len(pre.visit) < len(visit)):
            visit, outside = pre.visit, pre.outside
        if pre.allowed is not None:
            allowed = pre.allowed if allowed is None else allowed & pre.allowed
        if pre.barred:
            barred = barred | pre.barred if barred else pre.barred
    return Screen(tuple(active), visit, outside, allowed, barred)


_SCREENS: Memo[tuple[int, int, int, bool], tuple[Requirements, Constraints, Sequence[FilterPlugin], Screen]] = Memo(
    "requirements, constraints and filters objects, any node cordoned", 1024
)


def _screen(
    filters: Sequence[FilterPlugin], cluster: Cluster, req: Requirements, cons: Constraints, ctx: Context
) -> Screen:
    """``prefilter``, remembered for requests that repeat without a context or a node (the common case).

    Pre-filters read the request, the constraints, the context and, of the cluster, whether a node
    is cordoned and (for ``node_id``) which nodes exist; without a context or a node id, the key
    holds all of that.
    """
    if ctx is not EMPTY_CONTEXT or cons.node_id is not None:
        return prefilter(filters, cluster, req, cons, ctx)
    key = (id(req), id(cons), id(filters), bool(cluster.cordoned))
    known = _SCREENS.get(key)
    if known is None or known[0] is not req or known[1] is not cons or known[2] is not filters:
        known = _SCREENS.put(key, (req, cons, filters, prefilter(filters, cluster, req, cons, ctx)))
    return known[3]


def candidates(
    cluster: Cluster, req: Requirements, cons: Constraints, visit: frozenset[str] | None
) -> Iterator[NodeState]:
    """Nodes that might fit, in the order the strategy prefers them."""
    spread = cons.strategy is Strategy.SPREAD
    if visit is None and not req.share_milli:
        return cluster.iter_by_free(req.whole_gpus, descending=spread)  # the common case, without a wrapper
    return _candidates(cluster, req, visit, spread)


def _candidates(cluster: Cluster, req: Requirements, visit: frozenset[str] | None, spread: bool) -> Iterator[NodeState]:
    if visit is not None:
        by_id = cluster.by_id
        order = sorted(
            (-st.free_mask.bit_count() if spread else st.free_mask.bit_count(), st.ordinal)
            for st in (by_id[n] for n in visit if n in by_id)
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


def pick_devices(node: NodeState, req: Requirements, cons: Constraints, ctx: Context = EMPTY_CONTEXT) -> Pick | Reason:
    """Choose the devices on a node that passed the filters, or say why none fit."""
    spec = node.spec
    blocked = ctx.blocked_mask(spec.id) if ctx.nominated else 0
    nic = cons.nic
    if req.share_milli:
        eligible = eligible_mask(node, req) & ~blocked
        if nic is not None:
            eligible &= nic_mask(node.topology, cons)
        idx = share_target(node, req, eligible)
        if idx is None:
            if nic is not None:
                return Reason(
                    UNSCHEDULABLE, "no GPU {} with {:g} of a GPU free", (nic_text(cons), req.share_milli / MILLI)
                )
            return Reason(UNSCHEDULABLE, "no GPU with {:g} of a GPU free", (req.share_milli / MILLI,))
        dev = DeviceShare(idx, spec.gpus[idx].uuid, req.share_milli, share_memory(node, idx, req))
        return Pick((dev,), None, req.share_milli)
    k = req.whole_gpus
    if k == 0:
        return Pick((), None, 0)
    mask = node.free_mask & eligible_mask(node, req) & ~blocked
    if nic is None:
        choice = node.topology.best_subset(mask, k, nvlink=cons.nvlink, same_numa=cons.same_numa)
    else:
        choice = nic_subset(node.topology, mask, k, cons)
    if choice is None:
        rules = [text for on, text in ((cons.nvlink, "joined by NVLink"), (cons.same_numa, "on one NUMA node")) if on]
        if nic is not None:
            rules.append(nic_text(cons))
        return Reason(UNSCHEDULABLE, "no {} free GPUs {}", (k, ", ".join(rules) or "that fit"))
    return Pick(node.whole_gpus(choice.indices), choice, k * MILLI)


def judge(node: NodeState, req: Requirements, cons: Constraints, ctx: Context, screen: Screen) -> Pick | Reason:
    """The pipeline on one node: every filter the pre-filters kept (they enforce the node sets the
    pre-filters narrowed to), then the choice of devices."""
    for f in screen.filters:
        reason = f.filter(node, req, cons, ctx)
        if reason is not None:
            return reason
    return pick_devices(node, req, cons, ctx)


def place(
    cluster: Cluster,
    req: Requirements,
    cons: Constraints,
    *,
    filters: Sequence[FilterPlugin] = DEFAULT_FILTERS,
    scores: Sequence[ScorePlugin] | None = None,
    limit: int = 16,
    ctx: Context = EMPTY_CONTEXT,
    demand: FragmentationScore | None = None,
) -> Decision:
    """Choose a node and devices for one request, or raise InsufficientResourcesError.

    ``demand``: the fragmentation score over the workload mix the caller keeps (read, never updated).
    """
    if scores is None:
        binpack = cons.strategy is not Strategy.SPREAD
        scores = _BINPACK_SCORES if binpack else _SPREAD_SCORES
        if ctx.prefer_near or ctx.prefer_away:
            scores = (*scores, _PREFERRED)
        if demand is not None and binpack and demand.mix.engaged and fragmentation.enabled():
            scores = (*scores, demand)
            limit = max(limit, fragmentation.FRAGMENTATION_LIMIT)
    screen = _screen(filters, cluster, req, cons, ctx)
    active = screen.filters
    # Set checks first: a node outside the pool, holding another part of the gang or beside a component
    # it must avoid is passed over without running the filters (they explain it only if nothing fits).
    allowed = screen.allowed
    barred = screen.barred
    screen_nodes = allowed is not None or bool(barred)
    screened: list[NodeState] = []
    reasons: Counter[Reason] | None = None
    best: tuple[float, NodeState, Pick] | None = None
    best_total = 0.0
    feasible = visited = 0
    bounds = _bounds(scores, req, cluster.max_gpus)  # a bound depends on the node only through its free count
    for node in candidates(cluster, req, cons, screen.visit):
        if best is not None and bounds[node.free_mask.bit_count()] <= best_total:
            break
        visited += 1
        if screen_nodes:
            node_id = node.spec.id
            if (allowed is not None and node_id not in allowed) or node_id in barred:
                screened.append(node)
                continue
        reason: Reason | None = None
        for f in active:
            reason = f.filter(node, req, cons, ctx)
            if reason is not None:
                break
        else:
            picked = pick_devices(node, req, cons, ctx)
            if not isinstance(picked, Pick):
                reason = picked
        if reason is not None:
            if reasons is None:
                reasons = Counter()
            reasons[reason] += 1
            continue
        assert isinstance(picked, Pick)
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
            why = next((r for f in active if (r := f.filter(node, req, cons, ctx)) is not None), None)
            reasons[why or Reason(UNRESOLVABLE, "screened")] += 1
        _explain_unvisited(cluster, req, screen, reasons, visited)
        raise refusal(f"no node can take {_describe(req, cons)}", reasons)
    total, node, picked = best
    return Decision(node.spec.id, picked.devices, req.cpus_milli, req.memory_mib, total)


def refusal(message: str, reasons: Counter[Reason]) -> InsufficientResourcesError:
    """The error for a request nothing could take; reasons are formatted here, and only here."""
    texts: Counter[str] = Counter()
    for reason, n in reasons.items():
        texts[reason.text()] += n
    return InsufficientResourcesError(message, reasons=texts)


_BINPACK_SCORES: tuple[ScorePlugin, ...] = (strategy_plugin(Strategy.BINPACK), _TOPOLOGY)
_SPREAD_SCORES: tuple[ScorePlugin, ...] = (strategy_plugin(Strategy.SPREAD), _TOPOLOGY)
_BOUNDS: Memo[tuple[object, ...], tuple[float, ...]] = Memo("scores, request size, largest node", 4096)


def _bounds(scores: Sequence[ScorePlugin], req: Requirements, n_max: int) -> tuple[float, ...]:
    """Upper bound of the weighted score for a node with 0..n_max wholly free GPUs (remembered)."""
    key = (tuple(scores), req.whole_gpus, req.share_milli, req.cpus_milli, req.memory_mib, n_max)
    table = _BOUNDS.get(key)
    if table is None:
        table = _BOUNDS.put(
            key, tuple(sum(p.weight * p.bound(free, n_max, req) for p in scores) for free in range(n_max + 1))
        )
    return table


def _explain_unvisited(
    cluster: Cluster, req: Requirements, screen: Screen, reasons: Counter[Reason], visited: int
) -> None:
    """Account for the nodes the indexes or a pre-filter skipped, so the error covers the whole fleet."""
    if not cluster.nodes:
        reasons[Reason(UNRESOLVABLE, "no nodes discovered")] += 1
        return
    if screen.visit is not None:
        inside = sum(1 for n in screen.visit if n in cluster.by_id)
        outside = len(cluster.nodes) - inside
        if screen.outside is not None and (outside > 0 or not inside):
            reasons[screen.outside] += max(outside, 1)
        skipped = inside - visited
    else:
        skipped = len(cluster.nodes) - visited
    if skipped > 0:
        if req.share_milli:
            reasons[Reason(UNSCHEDULABLE, "no GPU with any capacity free")] += skipped
        else:
            reasons[Reason(UNSCHEDULABLE, "fewer than {} wholly free GPUs", (req.whole_gpus,))] += skipped


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
    if cons.nic is not None:
        parts.append(nic_text(cons))
    return ", ".join(parts) or "the request"
