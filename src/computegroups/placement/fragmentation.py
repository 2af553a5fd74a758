"""Fragmentation-aware scoring: keep free GPU capacity usable by the requests that will come.

The idea is the Fragmentation Gradient Descent policy of Weng et al. ("Beware
of Fragmentation", USENIX ATC 2023). For one node and one request shape, the
node's *fragment* is the free GPU capacity that shape cannot use:

* all of the node's free GPU capacity when the shape cannot fit there at all
  (too few CPUs or too little memory left, no GPU of its model, no GPU with
  enough room);
* otherwise the free capacity on GPUs too small for one of its GPUs (for a
  share of ``s`` thousandths, GPUs with less than ``s`` free; for whole GPUs,
  partly used GPUs).

A node's fragmentation is that amount averaged over the workload's shapes,
weighted by how often each is requested, plus (weighted by
``CPU_STARVED_WEIGHT``) its *CPU-starved* capacity: the free GPU capacity
beyond what its free CPUs can feed at the workload's CPUs per GPU. The per-shape
measure only sees a node's CPUs once they are too few for the next request;
the starved term sees them running out sooner, so CPU-only requests go where
CPUs are plentiful for the GPUs left and CPU-heavy GPU requests go where CPUs
are cheap. :class:`FragmentationScore` rates a
placement by how much it *increases* the node's fragmentation: a share that
fills a GPU exactly, or a CPU-only request on a node whose GPUs are all taken,
scores high; one that strands half a GPU or the last CPUs of a node with free
GPUs scores low.

The workload is learned, not configured: :class:`WorkloadMix` is a decayed
histogram of the request shapes of the groups committed to the state (each group
counted once, when it first gets an owner, from its stored requirements), kept by
the decision ledger and passed to placement, which only reads it. Every manager
that has read the same state has the same mix, so they make the same decisions.
Only the most common shapes are scored (``top``), so a decision costs a bounded
amount of work whatever the variety of requests; node fragmentation values are
remembered by node occupancy.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from computegroups.memo import Memo
from computegroups.model import MILLI, Requirements
from computegroups.placement.cluster import NodeState
from computegroups.placement.plugins import Context, Pick

__all__ = [
    "FRAGMENTATION_LIMIT",
    "FragmentationScore",
    "Shape",
    "WorkloadMix",
    "enabled",
    "node_fragmentation",
    "set_enabled",
]

#: Fragmentation changes are scaled against the capacity of an 8-GPU node.
SCALE_MILLI = 8 * MILLI
#: Feasible candidates the engine scores when fragmentation scoring is engaged (it needs a wider look).
FRAGMENTATION_LIMIT = 64
#: Weight of a node's CPU-starved GPU capacity in its fragment (see :func:`node_fragmentation`).
CPU_STARVED_WEIGHT = 2.0


@dataclass(frozen=True, slots=True)
class Shape:
    """One kind of request: whole GPUs or a share, CPUs and memory beside, GPU model alternatives."""

    whole_gpus: int
    share_milli: int
    cpus_milli: int
    memory_mib: int
    models: tuple[str, ...] = ()

    @classmethod
    def of(cls, req: Requirements) -> Shape:
        return cls(req.whole_gpus, req.share_milli, req.cpus_milli, req.memory_mib, req.models)

    @classmethod
    def stored(cls, requirements: Mapping[str, Any]) -> Shape:
        """The shape of requirements as a group record stores them (``Requirements.to_dict()``)."""
        gpus = requirements.get("gpus", 0)
        model = requirements.get("gpu_model")
        models = (model,) if isinstance(model, str) else tuple(model or ())
        whole = int(gpus) if gpus >= 1 else 0
        return cls(
            whole,
            0 if whole or not gpus else round(gpus * MILLI),
            round(requirements.get("cpus", 0) * MILLI),
            int(requirements.get("memory_mib", 0)),
            tuple(m.lower() for m in models),
        )

    @property
    def uses_gpus(self) -> bool:
        return bool(self.whole_gpus or self.share_milli)


class WorkloadMix:
    """A decayed histogram of request shapes; its ``top`` most common GPU shapes, normalised, are scored.

    ``observe`` is O(1). The weighted shape list is rebuilt when the number of
    observations has grown by an eighth since the last rebuild, so it settles
    as the workload does. Counts halve once their total passes ``horizon``,
    so the mix follows a workload that changes.
    """

    __slots__ = (
        "_cache",
        "_counts",
        "_engaged",
        "_gpu_per_cpu",
        "_raw_of",
        "_shape_of",
        "_since",
        "_total",
        "_weighted",
        "horizon",
        "top",
    )

    def __init__(self, top: int = 24, horizon: int = 20_000) -> None:
        self.top = top
        self.horizon = horizon
        # Counted by the request's raw fields (a tuple of scalars hashes fast); each key's Shape is
        # made once, and counts are summed per Shape when the weighted list is rebuilt.
        self._counts: dict[object, float] = {}
        self._shape_of: dict[object, Shape] = {}
        self._total = 0.0
        self._since = 0
        self._weighted: tuple[tuple[Shape, float], ...] = ()
        self._engaged = False
        self._gpu_per_cpu = 0.0
        self._cache: Memo[tuple[object, ...], float] = Memo("free per GPU, CPUs, memory, GPU name", 100_000)
        self._raw_of: Memo[int, tuple[Mapping[str, Any], tuple[object, ...]]] = Memo("stored requirements object", 1024)

    @classmethod
    def of(cls, shapes: dict[Shape, float], top: int = 24) -> WorkloadMix:
        """A fixed mix from known shape frequencies (for callers who know their workload)."""
        mix = cls(top=top)
        for shape, weight in shapes.items():
            mix._counts[shape] = mix._counts.get(shape, 0.0) + float(weight)
            mix._shape_of[shape] = shape
            mix._total += float(weight)
        mix._rebuild()
        return mix

    def observe(self, requirements: Mapping[str, Any]) -> None:
        """Count one group's requirements, as its record stores them (MIG is not modelled, not counted)."""
        known = self._raw_of.get(id(requirements))  # repeated requests share one stored mapping
        if known is not None and known[0] is requirements:
            raw = known[1]
        else:
            model = requirements.get("gpu_model")
            raw = (
                requirements.get("gpus", 0),
                requirements.get("cpus", 0),
                requirements.get("memory_mib", 0),
                tuple(model) if isinstance(model, list) else model,
                "mig_profile" in requirements,
            )
            self._raw_of.put(id(requirements), (requirements, raw))
        if raw[4]:
            return
        counts = self._counts
        seen = counts.get(raw)
        if seen is None:
            self._shape_of[raw] = Shape.stored(requirements)
            seen = 0.0
        counts[raw] = seen + 1.0
        self._total += 1.0
        self._since += 1
        if self._total > self.horizon or len(counts) > 4 * self.horizon:
            self._halve()
        if self._since * 8 >= self._total or self._since >= 4096:
            self._rebuild()

    def _halve(self) -> None:
        """Halve every count and forget the ones that fall below one, so the mix follows the workload."""
        self._counts = {k: c / 2 for k, c in self._counts.items() if c >= 1.0}
        self._shape_of = {k: self._shape_of[k] for k in self._counts}
        self._total = sum(self._counts.values())

    def _rebuild(self) -> None:
        self._since = 0
        per_shape: dict[Shape, float] = {}
        for raw, c in self._counts.items():
            shape = self._shape_of[raw]
            per_shape[shape] = per_shape.get(shape, 0.0) + c
        gpu_shapes = sorted(
            ((s, c) for s, c in per_shape.items() if s.uses_gpus),
            key=lambda sc: (-sc[1], sc[0].whole_gpus, sc[0].share_milli, sc[0].cpus_milli, sc[0].memory_mib),
        )[: self.top]
        weight = sum(c for _, c in gpu_shapes)
        weighted = tuple((s, c / weight) for s, c in gpu_shapes) if weight else ()
        if weighted != self._weighted:
            self._weighted = weighted
            cpus = sum(w * s.cpus_milli for s, w in weighted)
            gpus = sum(w * (s.whole_gpus * MILLI + s.share_milli) for s, w in weighted)
            self._gpu_per_cpu = gpus / cpus if cpus else 0.0
            self._cache.clear()
        self._engaged = any(s.share_milli or s.cpus_milli or s.memory_mib or s.models for s, _ in weighted)

    @property
    def engaged(self) -> bool:
        """Whether fragmentation can differ between placements that bin-pack rates alike.

        With whole-GPU requests only (no shares, host resources or model
        constraints), a node's fragment is its partly used GPUs, which bin-pack
        by free-GPU count already keeps few; scoring it would only cost time.
        """
        return self._engaged

    @property
    def gpu_per_cpu(self) -> float:
        """GPU thousandths the scored shapes request per CPU thousandth (0 when they request no CPUs)."""
        return self._gpu_per_cpu

    @property
    def shapes(self) -> tuple[tuple[Shape, float], ...]:
        """The scored shapes and their weights (summing to 1; empty before any GPU request)."""
        return self._weighted

    def fragmentation(self, free: tuple[int, ...], cpu_free: int, mem_free: int, name: str) -> float:
        """Expected fragment (thousandths of a GPU) of a node with these free amounts; cached."""
        key = (free, cpu_free, mem_free, name)
        value = self._cache.get(key)
        if value is None:
            value = self._cache.put(
                key, node_fragmentation(free, cpu_free, mem_free, name, self._weighted, self._gpu_per_cpu)
            )
        return value


def node_fragmentation(
    free: tuple[int, ...],
    cpu_free: int,
    mem_free: int,
    name: str,
    shapes: tuple[tuple[Shape, float], ...],
    gpu_per_cpu: float = 0.0,
) -> float:
    """Expected free GPU capacity (thousandths) that a request drawn from ``shapes`` could not use,
    plus ``CPU_STARVED_WEIGHT`` times the free capacity the node's free CPUs cannot feed.

    ``free``: thousandths free on each usable GPU of the node; ``name``: the
    lower-cased GPU product name that model alternatives are matched against;
    ``gpu_per_cpu``: GPU thousandths the workload requests per CPU thousandth
    (0: no starved term).
    """
    total = sum(free)
    if total == 0:
        return 0.0
    whole = free.count(MILLI)
    biggest = max(free)
    acc = 0.0
    for shape, weight in shapes:
        if shape.cpus_milli > cpu_free or shape.memory_mib > mem_free:
            acc += weight * total
            continue
        if shape.models and not any(m in name for m in shape.models):
            acc += weight * total
            continue
        if shape.whole_gpus:
            acc += weight * (total - MILLI * whole if whole >= shape.whole_gpus else total)
            continue
        s = shape.share_milli
        if biggest < s:
            acc += weight * total
        else:
            acc += weight * sum(f for f in free if f < s)
    if gpu_per_cpu:
        acc += CPU_STARVED_WEIGHT * max(0.0, total - cpu_free * gpu_per_cpu)
    return acc


def _free_after(node: NodeState, pick: Pick | None) -> tuple[int, ...]:
    used = list(node.gpu_used)
    if pick is not None:
        for d in pick.devices:
            used[d.index] += d.share_milli
    bad = node.unhealthy_mask
    return tuple(MILLI - u for i, u in enumerate(used) if not bad >> i & 1)


class FragmentationScore:
    """Rates a placement by how little it increases the node's expected fragmentation (0..100).

    50 means no change; each GPU's worth of capacity newly stranded (or
    recovered) moves the score by 6.25. Part of the default bin-pack pipeline
    once the workload mix engages it (see :attr:`WorkloadMix.engaged`). Its
    weight (20) lets it overrule bin-pack (a whole 8-GPU node of difference is
    100 points) where placements strand different amounts, while the topology
    score (weight 2, up to 200 points) still wins between an NVLink and a PCIe
    set unless the fragmentation at stake exceeds about 1.6 GPUs.
    """

    name = "fragmentation"

    def __init__(self, mix: WorkloadMix, weight: int = 20) -> None:
        self.mix = mix
        self.weight = weight
        self._names: dict[int, str] = {}

    def delta(self, node: NodeState, req: Requirements, pick: Pick) -> float:
        """Increase of the node's expected fragment (thousandths of a GPU) if ``pick`` is placed."""
        mix = self.mix
        # MIG slices are not thousandths of a GPU; the model below does not describe them.
        if not mix.shapes or node.gpu_count == 0 or node.has_mig:
            return 0.0
        name = self._names.get(node.ordinal)
        if name is None:
            # A mixed node matches a model if any of its GPUs is one.
            name = self._names[node.ordinal] = " ".join(sorted({g.name.lower() for g in node.spec.gpus}))
        before = mix.fragmentation(_free_after(node, None), node.cpu_free, node.mem_free, name)
        after = mix.fragmentation(
            _free_after(node, pick), node.cpu_free - req.cpus_milli, node.mem_free - req.memory_mib, name
        )
        return after - before

    def score(self, node: NodeState, req: Requirements, pick: Pick, ctx: Context) -> float:
        x = self.delta(node, req, pick) / SCALE_MILLI
        return 50.0 * (1.0 - max(-1.0, min(1.0, x)))

    def bound(self, free: int, gpu_count: int, req: Requirements) -> float:
        # A placement can lower a node's fragment by at most the GPU capacity it takes, and its
        # starved capacity by at most as much.
        consumed = req.whole_gpus * MILLI + req.share_milli
        return 50.0 * (1.0 + min(1.0, (1.0 + CPU_STARVED_WEIGHT) * consumed / SCALE_MILLI))


_state = {"enabled": True}


def set_enabled(enabled: bool) -> None:
    """Turn fragmentation scoring on or off in this process (on by default; off: bin-pack and topology only)."""
    _state["enabled"] = enabled


def enabled() -> bool:
    """Whether fragmentation scoring is on in this process."""
    return _state["enabled"]
