"""In-memory occupancy of the fleet, with the indexes that keep decisions off a fleet scan.

A :class:`Cluster` is built from discovered :class:`NodeSpec` s and kept in step
with the committed group records (``apply`` / ``remove``). Placement only reads
it. Nodes are bucketed by their number of wholly free GPUs, and nodes holding a
partly shared GPU are indexed apart, so a request looks at the few buckets that
can fit it, in a deterministic order (node ordinal).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable, Iterator

from computegroups.memo import Memo
from computegroups.model import MILLI, DeviceShare, GroupRecord, NodeSpec

__all__ = ["Cluster", "NodeState"]


class NodeState:
    """Mutable occupancy of one node; placement reads it, only Cluster writes it.

    ``free_mask`` (wholly free healthy GPUs), ``used_milli`` (GPU capacity held) and
    ``partial_gpus`` (healthy GPUs shared and not full) are kept up to date by ``add``
    as devices change, so placement reads them without a pass over the GPUs.
    """

    __slots__ = (
        "_picks",
        "_whole",
        "all_mask",
        "cordoned",
        "cpu_used",
        "free_mask",
        "gpu_mem_used",
        "gpu_used",
        "has_mig",
        "mem_used",
        "ordinal",
        "partial_gpus",
        "spec",
        "topology",
        "unhealthy_mask",
        "used_milli",
    )

    def __init__(self, spec: NodeSpec, ordinal: int) -> None:
        self.spec = spec
        self.ordinal = ordinal
        n = len(spec.gpus)
        self.gpu_used = [0] * n  # thousandths of each GPU held
        self.gpu_mem_used = [0] * n  # MiB of each GPU held
        self.used_milli = 0  # sum of gpu_used
        self.partial_gpus = 0  # healthy GPUs with 0 < used < MILLI
        self.cpu_used = 0
        self.mem_used = 0
        self.unhealthy_mask = 0
        self.cordoned = False
        self.has_mig = any(g.mig_profile for g in spec.gpus)
        self.all_mask = (1 << n) - 1  # every GPU of the node
        self.free_mask = self.all_mask  # wholly free and healthy GPUs
        self.topology = spec.effective_topology
        self._whole: tuple[DeviceShare, ...] | None = None
        self._picks: Memo[tuple[int, ...], tuple[DeviceShare, ...]] | None = None

    @property
    def gpu_count(self) -> int:
        return len(self.gpu_used)

    @property
    def free_count(self) -> int:
        return self.free_mask.bit_count()

    @property
    def cpu_free(self) -> int:
        return self.spec.cpus_milli - self.cpu_used

    @property
    def mem_free(self) -> int:
        return self.spec.memory_mib - self.mem_used

    def whole(self, index: int) -> DeviceShare:
        """The share that holds all of GPU ``index`` (made once per node, on first use)."""
        if self._whole is None:
            self._whole = tuple(DeviceShare(g.index, g.uuid, MILLI, g.memory_mib) for g in self.spec.gpus)
        return self._whole[index]

    def whole_gpus(self, indices: tuple[int, ...]) -> tuple[DeviceShare, ...]:
        """The shares that hold all of the GPUs ``indices`` (remembered: a node has few useful sets)."""
        picks = self._picks
        if picks is None:
            picks = self._picks = Memo("GPU indices of this node", 256)
        shares = picks.get(indices)
        if shares is None:
            shares = picks.put(indices, tuple(self.whole(i) for i in indices))
        return shares

    def has_partial(self) -> bool:
        """Whether some healthy GPU is shared and not full."""
        return self.partial_gpus > 0

    def gpus_free(self) -> float:
        """Free GPU capacity, in GPUs, over healthy GPUs."""
        return sum(MILLI - u for i, u in enumerate(self.gpu_used) if not self.unhealthy_mask >> i & 1) / MILLI

    def add(self, record: GroupRecord, sign: int = 1) -> None:
        """Count a group's devices and host resources as held (sign=1) or released (sign=-1).

        Memory is tracked per GPU for shares only: a GPU held whole has no room left to share.
        """
        used = self.gpu_used
        n = len(used)
        mask = self.free_mask
        partial = self.partial_gpus
        total = self.used_milli
        bad = self.unhealthy_mask
        for d in record.devices:
            i = d.index
            if i >= n:
                continue
            share = d.share_milli
            before = used[i]
            after = used[i] = before + sign * share
            total += after - before
            if share != MILLI or before % MILLI:
                if share != MILLI:
                    self.gpu_mem_used[i] += sign * d.memory_mib
                if not bad >> i & 1:
                    partial += (0 < after < MILLI) - (0 < before < MILLI)
            if after == 0:
                if not bad >> i & 1:
                    mask |= 1 << i
            else:
                mask &= ~(1 << i)
        self.free_mask = mask
        self.partial_gpus = partial
        self.used_milli = total
        self.cpu_used += sign * record.cpus_milli
        self.mem_used += sign * record.memory_mib

    def without(self, records: Iterable[GroupRecord]) -> NodeState:
        """A copy of this node as it would be with ``records`` released (for what-if questions)."""
        copy = NodeState(self.spec, self.ordinal)
        copy.gpu_used = list(self.gpu_used)
        copy.gpu_mem_used = list(self.gpu_mem_used)
        copy.cpu_used = self.cpu_used
        copy.mem_used = self.mem_used
        copy.unhealthy_mask = self.unhealthy_mask
        copy.cordoned = self.cordoned
        copy.has_mig = self.has_mig
        copy.recompute()
        for r in records:
            copy.add(r, -1)
        return copy

    def limited_to(self, mask: int, released: Iterable[GroupRecord] = ()) -> NodeState:
        """This node as a group holding the GPUs ``mask`` sees it: ``released`` no longer counted and
        every other GPU unavailable, so the filters judge exactly those devices."""
        view = self.without(released)
        view.unhealthy_mask |= view.all_mask & ~mask
        view.recompute()
        return view

    def recompute(self) -> None:
        """Derive the free mask and the shared-GPU counts from the GPUs (after a health change)."""
        mask = partial = 0
        for i, u in enumerate(self.gpu_used):
            if self.unhealthy_mask >> i & 1:
                continue
            if u == 0:
                mask |= 1 << i
            elif u < MILLI:
                partial += 1
        self.free_mask = mask
        self.partial_gpus = partial
        self.used_milli = sum(self.gpu_used)


class _Bucket:
    """Node ordinals kept sorted (so iteration order is deterministic), in blocks.

    A block holds at most ``2 * load`` ordinals, so adding or removing one moves a
    block's worth of memory, not the whole bucket's (which at 10,000 nodes is most
    of the fleet).
    """

    __slots__ = ("blocks", "load", "maxes")

    def __init__(self, load: int = 256) -> None:
        self.load = load
        self.blocks: list[list[int]] = []  # sorted, non-empty, each after the one before
        self.maxes: list[int] = []  # the last ordinal of each block

    def __iter__(self) -> Iterator[int]:
        for block in self.blocks:
            yield from block

    def __len__(self) -> int:
        return sum(len(b) for b in self.blocks)

    def add(self, ordinal: int) -> None:
        blocks, maxes = self.blocks, self.maxes
        if not maxes:
            blocks.append([ordinal])
            maxes.append(ordinal)
            return
        k = bisect_left(maxes, ordinal)
        if k == len(maxes):
            k -= 1
            block = blocks[k]
            block.append(ordinal)
            maxes[k] = ordinal
        else:
            block = blocks[k]
            insort(block, ordinal)
        if len(block) > 2 * self.load:
            tail = block[self.load :]
            del block[self.load :]
            blocks.insert(k + 1, tail)
            maxes[k] = block[-1]
            maxes.insert(k + 1, tail[-1])

    def discard(self, ordinal: int) -> None:
        blocks, maxes = self.blocks, self.maxes
        k = bisect_left(maxes, ordinal)
        if k == len(maxes):
            return
        block = blocks[k]
        i = bisect_left(block, ordinal)
        if i == len(block) or block[i] != ordinal:
            return
        del block[i]
        if not block:
            del blocks[k]
            del maxes[k]
        elif i == len(block):
            maxes[k] = block[-1]


class Cluster:
    """Occupancy of every node plus indexes by free capacity."""

    def __init__(self, nodes: Iterable[NodeSpec]) -> None:
        self.nodes: list[NodeState] = []
        self.by_id: dict[str, NodeState] = {}
        self.max_gpus = 0
        #: ids of cordoned nodes (they take nothing new)
        self.cordoned: set[str] = set()
        for spec in nodes:
            if spec.id in self.by_id:
                raise ValueError(f"duplicate node id {spec.id!r}")
            st = NodeState(spec, len(self.nodes))
            self.nodes.append(st)
            self.by_id[spec.id] = st
            self.max_gpus = max(self.max_gpus, st.gpu_count)
        self._buckets = [_Bucket() for _ in range(self.max_gpus + 1)]
        self._partial = _Bucket()
        self._where: list[int] = []
        self._in_partial: list[bool] = []
        for st in self.nodes:  # in ordinal order
            self._where.append(st.free_count)
            self._buckets[st.free_count].add(st.ordinal)
            self._in_partial.append(False)

    # -- totals ---------------------------------------------------------------
    def total_gpus(self) -> int:
        return sum(st.gpu_count for st in self.nodes)

    # -- indexes --------------------------------------------------------------
    def bucket(self, free: int) -> list[int]:
        """Ordinals of nodes with exactly ``free`` wholly free GPUs, sorted."""
        return list(self._buckets[free])

    def partial(self) -> list[int]:
        """Ordinals of nodes with a shared GPU that has room, sorted."""
        return list(self._partial)

    def iter_partial(self) -> Iterator[NodeState]:
        """Nodes with a shared GPU that has room, in ordinal order."""
        nodes = self.nodes
        for block in self._partial.blocks:
            for ordinal in block:
                yield nodes[ordinal]

    def is_partial(self, ordinal: int) -> bool:
        """Whether the node has a shared GPU with room."""
        return self._in_partial[ordinal]

    def iter_by_free(self, lowest: int, *, descending: bool = False) -> Iterator[NodeState]:
        """Nodes with at least ``lowest`` free GPUs: fullest first (or emptiest first)."""
        rng = range(self.max_gpus, lowest - 1, -1) if descending else range(lowest, self.max_gpus + 1)
        nodes = self.nodes
        buckets = self._buckets
        for free in rng:
            for block in buckets[free].blocks:
                for ordinal in block:
                    yield nodes[ordinal]

    def _reindex(self, st: NodeState) -> None:
        """Move a node between buckets after its mask changed (callers recompute the mask)."""
        o = st.ordinal
        new = st.free_mask.bit_count()
        old = self._where[o]
        if old != new:
            self._buckets[old].discard(o)
            self._buckets[new].add(o)
            self._where[o] = new
        part = st.partial_gpus > 0
        if part != self._in_partial[o]:
            (self._partial.add if part else self._partial.discard)(o)
            self._in_partial[o] = part

    # -- mutation ---------------------------------------------------------------
    def apply(self, record: GroupRecord, sign: int = 1) -> None:
        """Count a group's devices as held (sign=1) or no longer held (sign=-1)."""
        if not record.holds_capacity:
            return
        st = self.by_id.get(record.node_id)
        if st is None:
            return  # the node vanished; reconciliation reports such groups
        st.add(record, sign)
        self._reindex(st)

    def remove(self, record: GroupRecord) -> None:
        """Stop counting a group's devices."""
        self.apply(record, -1)

    def set_unhealthy(self, node_id: str, index: int, unhealthy: bool) -> bool:
        """Mark one GPU unhealthy (nothing new goes there) or healthy again; True if it changed."""
        st = self.by_id.get(node_id)
        if st is None or index >= st.gpu_count:
            return False
        bit = 1 << index
        was = bool(st.unhealthy_mask & bit)
        if was == unhealthy:
            return False
        st.unhealthy_mask = st.unhealthy_mask | bit if unhealthy else st.unhealthy_mask & ~bit
        st.recompute()
        self._reindex(st)
        return True

    def set_cordoned(self, node_id: str, cordoned: bool) -> None:
        """A cordoned node takes no new groups."""
        st = self.by_id.get(node_id)
        if st is not None:
            st.cordoned = cordoned
            (self.cordoned.add if cordoned else self.cordoned.discard)(node_id)
