"""Filter and score plugins: each small, pure and testable alone (the Kubernetes scheduler framework's shape).

A filter has two extension points. ``prefilter`` runs once per request: it says the plugin cannot
reject anything for this request (``SKIP``), or narrows the nodes worth visiting (``visit``),
or names nodes to pass over without running filters (outside ``allowed``, or in ``barred``).
``filter`` answers "can this node take the request?" with ``None`` (yes) or a :class:`Reason`:
a code (could freeing capacity help?) and the facts, formatted only when an error is raised
("2 of 8 GPUs free, 4 requested"). A score rates a feasible node and the devices picked on it
from 0 (worst) to 100 (best); it also states an upper bound for a node with a given number of
free GPUs, so the engine can stop as soon as no later candidate could win.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, Protocol

from computegroups.model import MILLI, Constraints, DeviceShare, Requirements, Strategy
from computegroups.placement.cluster import Cluster, NodeState
from computegroups.topology import SubsetChoice, Topology, link_rank

__all__ = [
    "RUN",
    "SKIP",
    "UNRESOLVABLE",
    "UNSCHEDULABLE",
    "AffinityFilter",
    "BinPackScore",
    "CapacityFilter",
    "CordonFilter",
    "FilterPlugin",
    "NicFilter",
    "NodeSelectorFilter",
    "Pick",
    "PreFilter",
    "Reason",
    "ScorePlugin",
    "SpreadScore",
    "TopologyScore",
]

#: The node could take the request if capacity there were freed (preemption may help).
UNSCHEDULABLE = 1
#: Nothing freed on the node would help (wrong node, label, model, pool, rule, cordon).
UNRESOLVABLE = 2


class Reason(NamedTuple):
    """Why a node cannot take a request, as data: a code, a message template and its arguments."""

    code: int
    template: str
    args: tuple[object, ...] = ()

    def text(self) -> str:
        """The message a person reads ("2 of 8 GPUs free, 4 requested")."""
        return self.template.format(*self.args) if self.args else self.template


class PreFilter(NamedTuple):
    """What a filter decides once per request, before any node is visited.

    ``skip``: the filter cannot reject any node for this request. ``visit``: only these nodes can
    qualify (the engine visits them instead of the fleet; ``outside`` explains the others).
    ``allowed`` / ``barred``: nodes outside / inside are passed over without running the filters
    (which then explain them only if nothing fits).
    """

    skip: bool = False
    visit: frozenset[str] | None = None
    outside: Reason | None = None
    allowed: frozenset[str] | None = None
    barred: frozenset[str] = frozenset()


SKIP = PreFilter(skip=True)
RUN = PreFilter()


class Context(NamedTuple):
    """What placement needs beyond occupancy, resolved by the manager to sets of node ids.

    ``allowed``: nodes of the requested pool (None: any). ``excluded``: nodes already taken by
    other parts of a gang. ``near`` / ``away``: for each required affinity / anti-affinity rule,
    the nodes that satisfy / violate it. ``prefer_near`` / ``prefer_away``: the same for preferred
    rules (they score, never filter). ``nominated``: per node, the GPUs promised to a pending
    preemptor, with its priority; only higher-priority requests may use them.
    """

    allowed: frozenset[str] | None = None
    excluded: frozenset[str] = frozenset()
    near: tuple[frozenset[str], ...] = ()
    away: tuple[frozenset[str], ...] = ()
    prefer_near: tuple[frozenset[str], ...] = ()
    prefer_away: tuple[frozenset[str], ...] = ()
    nominated: Mapping[str, Sequence[tuple[int, int]]] = MappingProxyType({})  # node -> [(mask, priority)]
    priority: int = 0

    def blocked_mask(self, node_id: str) -> int:
        """GPUs of a node this request may not take: promised to a waiting preemptor of no lower priority."""
        if not self.nominated:
            return 0
        mask = 0
        for gpus, priority in self.nominated.get(node_id, ()):
            if priority >= self.priority:
                mask |= gpus
        return mask


EMPTY_CONTEXT = Context()


class Pick(NamedTuple):
    """The devices chosen on one node, and the topology verdict for them."""

    devices: tuple[DeviceShare, ...]
    choice: SubsetChoice | None  # for whole GPUs
    milli: int  # GPU capacity the devices hold, in thousandths of a GPU


class FilterPlugin(Protocol):
    """Rejects nodes that cannot take a request. Must only read what it is given."""

    name: str

    def prefilter(self, cluster: Cluster, req: Requirements, cons: Constraints, ctx: Context) -> PreFilter:
        """Once per request: ``SKIP``, ``RUN``, or the nodes to visit, pass over or keep to."""
        ...

    def filter(self, node: NodeState, req: Requirements, cons: Constraints, ctx: Context) -> Reason | None:
        """Return None if the node may take the request, else the reason it cannot."""
        ...


class ScorePlugin(Protocol):
    """Rates a feasible (node, pick) from 0 to 100; higher is better."""

    name: str
    weight: int

    def score(self, node: NodeState, req: Requirements, pick: Pick, ctx: Context) -> float:
        """Score in [0, 100]."""
        ...

    def bound(self, free: int, gpu_count: int, req: Requirements) -> float:
        """Upper bound of ``score`` for any node with ``free`` wholly free GPUs of ``gpu_count``."""
        ...


# -- filters ------------------------------------------------------------------
class NodeSelectorFilter:
    """``constraints.node_id``, ``constraints.labels``, pool membership and gang exclusions."""

    name = "node-selector"

    def prefilter(self, cluster: Cluster, req: Requirements, cons: Constraints, ctx: Context) -> PreFilter:
        if cons.node_id is None and ctx.allowed is None and not ctx.excluded and not cons.labels:
            return SKIP
        if cons.node_id is not None:
            outside = (
                Reason(UNRESOLVABLE, "not node {}", (cons.node_id,))
                if cons.node_id in cluster.by_id
                else Reason(UNRESOLVABLE, "no node named {}", (cons.node_id,))
            )
            return PreFilter(False, frozenset((cons.node_id,)), outside, ctx.allowed, ctx.excluded)
        return PreFilter(False, None, None, ctx.allowed, ctx.excluded)

    def filter(self, node: NodeState, req: Requirements, cons: Constraints, ctx: Context) -> Reason | None:
        node_id = node.spec.id
        if cons.node_id is not None and node_id != cons.node_id:
            return Reason(UNRESOLVABLE, "not node {}", (cons.node_id,))
        if ctx.allowed is not None and node_id not in ctx.allowed:
            return Reason(UNRESOLVABLE, "not in pool {}", (cons.pool,))
        if node_id in ctx.excluded:
            return Reason(UNRESOLVABLE, "holds another part of the gang")
        labels = node.spec.labels
        for k, v in cons.labels.items():
            if labels.get(k) != v:
                return Reason(UNRESOLVABLE, "label {}={} does not match", (k, v))
        return None


class AffinityFilter:
    """Required affinity and anti-affinity rules."""

    name = "affinity"

    def prefilter(self, cluster: Cluster, req: Requirements, cons: Constraints, ctx: Context) -> PreFilter:
        visit: frozenset[str] | None = None
        outside: Reason | None = None
        for rule, nodes in zip(cons.affinity, ctx.near, strict=False):
            if rule.required and (visit is None or len(nodes) < len(visit)):
                # Only nodes near the other component can qualify: visit those, not the fleet.
                visit, outside = nodes, Reason(UNRESOLVABLE, "not near {} ({})", (rule.component, rule.scope.value))
        barred: frozenset[str] = frozenset()
        for rule, nodes in zip(cons.anti_affinity, ctx.away, strict=False):
            if rule.required:
                barred = barred | nodes
        if visit is None and not barred:
            return SKIP
        return PreFilter(False, visit, outside, None, barred)

    def filter(self, node: NodeState, req: Requirements, cons: Constraints, ctx: Context) -> Reason | None:
        node_id = node.spec.id
        for rule, nodes in zip(cons.affinity, ctx.near, strict=False):
            if rule.required and node_id not in nodes:
                return Reason(UNRESOLVABLE, "not near {} ({})", (rule.component, rule.scope.value))
        for rule, nodes in zip(cons.anti_affinity, ctx.away, strict=False):
            if rule.required and node_id in nodes:
                return Reason(UNRESOLVABLE, "shares a {} with {}", (rule.scope.value, rule.component))
        return None


_CORDONED = Reason(UNRESOLVABLE, "node is cordoned")


class CordonFilter:
    """A cordoned (draining) node takes nothing new."""

    name = "cordon"

    def prefilter(self, cluster: Cluster, req: Requirements, cons: Constraints, ctx: Context) -> PreFilter:
        return RUN if cluster.cordoned else SKIP

    def filter(self, node: NodeState, req: Requirements, cons: Constraints, ctx: Context) -> Reason | None:
        return _CORDONED if node.cordoned else None


_NO_GPUS = Reason(UNRESOLVABLE, "no GPUs")


class CapacityFilter:
    """CPUs and memory; GPUs of the right model and memory, enough of them free."""

    name = "capacity"

    def prefilter(self, cluster: Cluster, req: Requirements, cons: Constraints, ctx: Context) -> PreFilter:
        return RUN

    def filter(self, node: NodeState, req: Requirements, cons: Constraints, ctx: Context) -> Reason | None:
        if req.cpus_milli and req.cpus_milli > node.cpu_free:
            code = UNSCHEDULABLE if req.cpus_milli <= node.spec.cpus_milli else UNRESOLVABLE
            return Reason(code, "{:g} CPUs free, {:g} requested", (node.cpu_free / MILLI, req.cpus_milli / MILLI))
        if req.memory_mib and req.memory_mib > node.mem_free:
            code = UNSCHEDULABLE if req.memory_mib <= node.spec.memory_mib else UNRESOLVABLE
            return Reason(code, "{} MiB memory free, {} requested", (node.mem_free, req.memory_mib))
        k = req.whole_gpus
        if k == 0 and req.share_milli == 0:
            return None
        if node.all_mask == 0:
            return _NO_GPUS
        eligible = eligible_mask(node, req)
        if eligible == 0:
            return _model_reason(node, req)
        if ctx.nominated:
            eligible &= ~ctx.blocked_mask(node.spec.id)
        if k:
            free = (node.free_mask & eligible).bit_count()
            if free < k:
                code = UNSCHEDULABLE if eligible.bit_count() >= k else UNRESOLVABLE
                if req.mig_profile:
                    total = eligible.bit_count()
                    return Reason(code, "{} of {} {} MIG devices free, {} requested", (free, total, req.mig_profile, k))
                return Reason(code, "{} of {} GPUs free, {} requested", (free, node.gpu_count, k))
        elif share_target(node, req, eligible) is None:
            return Reason(UNSCHEDULABLE, "no GPU with {:g} of a GPU free", (req.share_milli / MILLI,))
        return None


_NO_NICS = Reason(UNRESOLVABLE, "topology lists no NICs")
#: Searches one NIC's device choice may spend looking for a set nearer the NIC (see :func:`nic_subset`).
NIC_SEARCHES = 32


def nic_text(cons: Constraints) -> str:
    """``within PHB of NIC0`` / ``within NODE of a NIC``, for messages."""
    return f"within {cons.nic_link} of {'a NIC' if cons.nic == 'any' else cons.nic}"


class NicFilter:
    """``constraints.nic``: the node lists the NIC, and enough GPUs are within ``nic_link`` of it.

    All of a group's GPUs must be near one NIC (with ``any``: any one of the node's NICs). A node
    whose topology lists no NICs (NVML discovery sees none) is refused, never taken as near. A
    request without GPUs only needs the node to list the NIC.
    """

    name = "nic"

    def prefilter(self, cluster: Cluster, req: Requirements, cons: Constraints, ctx: Context) -> PreFilter:
        return SKIP if cons.nic is None else RUN

    def filter(self, node: NodeState, req: Requirements, cons: Constraints, ctx: Context) -> Reason | None:
        assert cons.nic is not None and cons.nic_link is not None
        topo = node.topology
        if not topo.nics:
            return _NO_NICS
        nics = topo.nic_indices(cons.nic)
        if not nics:
            return Reason(UNRESOLVABLE, "no NIC {} (has {})", (cons.nic, ", ".join(n.name for n in topo.nics)))
        k = req.whole_gpus or (1 if req.share_milli else 0)
        if k == 0:
            return None
        eligible = eligible_mask(node, req)
        worst = link_rank(cons.nic_link)
        near = max((topo.near_nic(i, worst) & eligible).bit_count() for i in nics)
        if near < k:
            return Reason(UNRESOLVABLE, "{} GPU(s) {}, {} requested", (near, nic_text(cons), k))
        if req.share_milli:
            return None  # the GPU a share goes to is chosen among the near ones (pick_devices)
        free = node.free_mask & eligible & ~(ctx.blocked_mask(node.spec.id) if ctx.nominated else 0)
        near_free = max((topo.near_nic(i, worst) & free).bit_count() for i in nics)
        if near_free < k:
            return Reason(UNSCHEDULABLE, "{} of {} GPU(s) {} free, {} requested", (near_free, near, nic_text(cons), k))
        return None


def nic_mask(topo: Topology, cons: Constraints) -> int:
    """GPUs within ``nic_link`` of any NIC ``constraints.nic`` names."""
    assert cons.nic is not None and cons.nic_link is not None
    worst = link_rank(cons.nic_link)
    mask = 0
    for i in topo.nic_indices(cons.nic):
        mask |= topo.near_nic(i, worst)
    return mask


def nic_subset(topo: Topology, free_mask: int, k: int, cons: Constraints) -> SubsetChoice | None:
    """Choose k GPUs of ``free_mask`` all within ``nic_link`` of one NIC, the nearest among the best.

    For each NIC ``constraints.nic`` names, the ordinary search (:meth:`Topology.best_subset`, with
    the request's NVLink and NUMA rules) runs on the free GPUs within ``nic_link`` of it; that sets
    the quality to keep (bottleneck, total, NUMA nodes). Among sets of that quality the one nearest
    the NIC (worst link to it, then the sum of the links) is then looked for, without changing the
    search: the same search runs on the free GPUs within each nearer link class, and then on that
    set less one chosen GPU at a time (the farthest first), as long as that finds a nearer set of the
    same quality, at most :data:`NIC_SEARCHES` searches per NIC. The best over the NICs wins, by
    (quality, nearness), then the first NIC. Deterministic.
    """
    assert cons.nic is not None and cons.nic_link is not None
    worst = link_rank(cons.nic_link)
    best: SubsetChoice | None = None
    best_key: tuple[int, int, int, int, int] | None = None
    for nic in topo.nic_indices(cons.nic):
        choice = _nearest(topo, nic, free_mask, worst, k, cons)
        if choice is None:
            continue
        key = (*_quality(choice), *_nearness(topo, nic, choice.indices))
        if best_key is None or key > best_key:
            best, best_key = choice, key
    return best


def _quality(choice: SubsetChoice) -> tuple[int, int, int]:
    """The search's own order: bottleneck, total, fewest NUMA nodes."""
    return (choice.bottleneck, choice.total, -choice.numa_nodes)


def _nearness(topo: Topology, nic: int, indices: Sequence[int]) -> tuple[int, int]:
    """(worst link rank to the NIC, sum of the link ranks to it) of a set of GPUs."""
    ranks = [topo.nic_rank(nic, i) for i in indices]
    return (min(ranks, default=0), sum(ranks))


def _nearest(topo: Topology, nic: int, free_mask: int, worst: int, k: int, cons: Constraints) -> SubsetChoice | None:
    """The best set within ``worst`` of one NIC, and among the sets as good, one nearest the NIC."""

    def search(mask: int) -> SubsetChoice | None:
        return topo.best_subset(mask, k, nvlink=cons.nvlink, same_numa=cons.same_numa)

    mask = free_mask & topo.near_nic(nic, worst)
    choice = search(mask)
    if choice is None:
        return None
    quality = _quality(choice)
    near = _nearness(topo, nic, choice.indices)
    searches = 0
    # Nearer link classes first: the farthest class left out, then the next, ...
    base = mask
    for rank in sorted({topo.nic_rank(nic, i) for i in range(topo.gpu_count) if base >> i & 1})[1:]:
        tier = base & topo.near_nic(nic, rank)
        if tier.bit_count() < k:
            break
        found = search(tier)
        searches += 1
        if found is None:
            break  # a smaller set of GPUs cannot do better
        if _quality(found) >= quality and _nearness(topo, nic, found.indices) > near:
            choice, near, mask = found, _nearness(topo, nic, found.indices), tier
    # Then one chosen GPU at a time, the farthest from the NIC first.
    improved = True
    while improved and searches < NIC_SEARCHES:
        improved = False
        nearest = max(topo.nic_rank(nic, i) for i in range(topo.gpu_count) if mask >> i & 1)
        for gpu in sorted(choice.indices, key=lambda i: (topo.nic_rank(nic, i), i)):
            if topo.nic_rank(nic, gpu) >= nearest or searches >= NIC_SEARCHES:
                break
            searches += 1
            other = search(mask & ~(1 << gpu))
            if other is not None and _quality(other) >= quality and _nearness(topo, nic, other.indices) > near:
                choice, near, mask = other, _nearness(topo, nic, other.indices), mask & ~(1 << gpu)
                improved = True
                break
    return choice


def _model_reason(node: NodeState, req: Requirements) -> Reason:
    gpu = node.spec.gpus[0]
    if req.mig_profile:
        return Reason(UNRESOLVABLE, "no MIG device of profile {}", (req.mig_profile,))
    if all(g.mig_profile for g in node.spec.gpus):
        return Reason(UNRESOLVABLE, "only MIG devices; ask for one with mig_profile")
    if req.models and not any(m in gpu.name.lower() for m in req.models):
        return Reason(UNRESOLVABLE, "GPU model {} is not {}", (gpu.name, "|".join(req.models)))
    return Reason(UNRESOLVABLE, "GPU memory {} MiB < {} MiB", (gpu.memory_mib, req.gpu_memory_mib))


def eligible_mask(node: NodeState, req: Requirements) -> int:
    """GPUs of the node whose model and memory satisfy the request (healthy or not)."""
    if req.any_gpu and not node.has_mig:
        return node.all_mask
    models = req.models
    need = req.gpu_memory_mib
    profile = req.mig_profile.lower() if req.mig_profile else ""
    mask = 0
    for g in node.spec.gpus:
        if g.mig_profile.lower() != profile:
            continue  # MIG devices go only to requests naming their profile, and only they do
        if models and not any(m in g.name.lower() for m in models):
            continue
        if need is not None and req.whole_gpus and g.memory_mib < need:
            continue
        mask |= 1 << g.index
    return mask


def share_memory(node: NodeState, index: int, req: Requirements) -> int:
    """GPU memory a share holds: what it asked for, else its proportion of the GPU."""
    if req.gpu_memory_mib is not None:
        return req.gpu_memory_mib
    return node.spec.gpus[index].memory_mib * req.share_milli // MILLI


def share_target(node: NodeState, req: Requirements, eligible: int) -> int | None:
    """The GPU a share goes to: the fullest shared GPU it fits (best fit), else a free one.

    Shares go to already-shared GPUs first, so whole GPUs stay free.
    """
    best: int | None = None
    best_used = -1
    for i, used in enumerate(node.gpu_used):
        if not eligible >> i & 1 or node.unhealthy_mask >> i & 1 or used == 0:
            continue
        if used + req.share_milli > MILLI:
            continue
        if node.gpu_mem_used[i] + share_memory(node, i, req) > node.spec.gpus[i].memory_mib:
            continue
        if used > best_used:
            best, best_used = i, used
    if best is not None:
        return best
    free = node.free_mask & eligible
    for i in range(node.gpu_count):
        if free >> i & 1 and share_memory(node, i, req) > node.spec.gpus[i].memory_mib:
            free &= ~(1 << i)
    if not free:
        return None
    choice = node.spec.effective_topology.best_subset(free, 1)
    return choice.indices[0] if choice else None


# -- scores ---------------------------------------------------------------------
def _gpu_util_after(node: NodeState, req: Requirements, pick: Pick) -> float:
    if node.all_mask == 0:
        total = node.spec.cpus_milli or 1
        return (node.cpu_used + req.cpus_milli) / total
    return (node.used_milli + pick.milli) / (len(node.gpu_used) * MILLI)


class BinPackScore:
    """Fill the most-used node that fits: score is the node's GPU use after placing."""

    name = "binpack"

    def __init__(self, weight: int = 1) -> None:
        self.weight = weight

    def score(self, node: NodeState, req: Requirements, pick: Pick, ctx: Context) -> float:
        return 100.0 * _gpu_util_after(node, req, pick)

    def bound(self, free: int, gpu_count: int, req: Requirements) -> float:
        if gpu_count == 0:
            return 100.0
        return 100.0 * (1.0 - max(free - req.whole_gpus, 0) / gpu_count)


class SpreadScore:
    """Use the least-used node: score is the node's GPU capacity left after placing."""

    name = "spread"

    def __init__(self, weight: int = 1) -> None:
        self.weight = weight

    def score(self, node: NodeState, req: Requirements, pick: Pick, ctx: Context) -> float:
        return 100.0 * (1.0 - _gpu_util_after(node, req, pick))

    def bound(self, free: int, gpu_count: int, req: Requirements) -> float:
        if gpu_count == 0:
            return 100.0
        return 100.0 * max(free - req.whole_gpus, 0) / gpu_count


class TopologyScore:
    """How close the picked GPUs' bottleneck link is to the best this node type can give."""

    name = "topology"

    def __init__(self, weight: int = 2) -> None:
        self.weight = weight

    def score(self, node: NodeState, req: Requirements, pick: Pick, ctx: Context) -> float:
        choice = pick.choice
        if choice is None or len(choice.indices) < 2:
            return 100.0
        best = node.topology.best_bottleneck(len(choice.indices))
        if best <= 0 or choice.bottleneck >= best:
            return 100.0
        return 100.0 * choice.bottleneck / best

    def bound(self, free: int, gpu_count: int, req: Requirements) -> float:
        return 100.0


class PreferredAffinityScore:
    """Share of preferred affinity rules a node satisfies (100 when there are none)."""

    name = "preferred-affinity"

    def __init__(self, weight: int = 1) -> None:
        self.weight = weight

    def score(self, node: NodeState, req: Requirements, pick: Pick, ctx: Context) -> float:
        total = len(ctx.prefer_near) + len(ctx.prefer_away)
        if total == 0:
            return 100.0
        node_id = node.spec.id
        met = sum(node_id in s for s in ctx.prefer_near) + sum(node_id not in s for s in ctx.prefer_away)
        return 100.0 * met / total

    def bound(self, free: int, gpu_count: int, req: Requirements) -> float:
        return 100.0


_BINPACK = BinPackScore()
_SPREAD = SpreadScore()


def strategy_plugin(strategy: Strategy) -> ScorePlugin:
    """The score plugin for a node-choice strategy."""
    return _SPREAD if strategy is Strategy.SPREAD else _BINPACK
