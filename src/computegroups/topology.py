"""GPU interconnect topology: parsing ``nvidia-smi topo -m`` and choosing GPU sets.

A :class:`Topology` is the link matrix of one node plus the NUMA node and CPU
affinity of each GPU, and the NICs ``nvidia-smi topo -m`` lists with their link
to each GPU (:class:`Nic`; NVML sees no NICs, so a topology discovered through
it has none). Links are named as nvidia-smi names them and ranked (best first)::

    NV<n> (more bonded links is better) > PIX > PXB > PHB > NODE > SYS

:meth:`Topology.best_subset` picks the k free GPUs with the best bottleneck
link, then the best total, then NUMA locality, then the choice that leaves the
best-connected GPUs free. Small searches (every request on an 8-GPU node)
evaluate every subset; larger ones run a branch and bound that is exact up to
:data:`EXACT_DEVICES` free devices and beyond stops after a budget of search
nodes that shrinks as the node grows (:func:`search_budget`; 64 GPUs or 56 MIG
slices: a few milliseconds at most). Results are cached by the free-device
mask, and nodes of one type share one Topology object (and so one cache).
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from computegroups.errors import InvalidRequestError
from computegroups.memo import Memo

__all__ = ["LINK_RANKS", "NIC_LINKS", "Nic", "Topology", "link_rank", "parse_nvidia_smi_topo", "search_budget"]

#: Rank of each PCIe/SMP link class; NVLink ranks are ``NV_BASE + links``.
LINK_RANKS: dict[str, int] = {"SYS": 1, "SOC": 1, "NODE": 2, "PHB": 3, "PXB": 4, "PIX": 5}
NV_BASE = 100
#: The links a GPU can have to a NIC, nearest first: the same PCIe switch (PIX, PXB), the same PCIe host
#: bridge (PHB), the same NUMA node (NODE), across the SMP interconnect (SYS).
NIC_LINKS = ("PIX", "PXB", "PHB", "NODE", "SYS")
#: Searches of at most this many links over all subsets (subsets x pairs in one) evaluate every subset
#: (every request on an 8-GPU node: at most 560).
ENUMERATE_WORK = 2_000
#: Nodes with at most this many free devices are searched exactly (branch and bound, no budget).
EXACT_DEVICES = 16
#: Beyond that, the branch and bound visits at most this many search nodes per phase, times 16 over
#: the free devices (a search node costs about one step per free device), then takes the best set
#: found (always one with the best bottleneck it could prove exists).
SEARCH_BUDGET = 400


def search_budget(free: int) -> int:
    """Search nodes per phase for ``free`` free devices; 0 (no budget) where the search stays exact."""
    return 0 if free <= EXACT_DEVICES else max(1, SEARCH_BUDGET * EXACT_DEVICES // free)


_NV = re.compile(r"^NV(\d+)$")


def link_rank(name: str) -> int:
    """Rank a link name; higher is better. Unknown names rank 0 (worst)."""
    m = _NV.match(name)
    if m:
        return NV_BASE + int(m.group(1))
    return LINK_RANKS.get(name, 0)


MAX_CPU_ID = 65_535  # CPU ids of one machine in a CPU affinity list
_CPU_PART = re.compile(r"([0-9]{1,6})(?:-([0-9]{1,6}))?")


def _parse_cpu_list(text: str) -> frozenset[int]:
    """Parse ``0-23,48-71`` into a set of CPU ids; ``N/A`` gives the empty set.

    Raises InvalidRequestError for anything else, or a CPU id above :data:`MAX_CPU_ID` (checked
    before a range is expanded).
    """
    cpus: set[int] = set()
    if text in ("N/A", "", "[N/A]"):
        return frozenset()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = _CPU_PART.fullmatch(part)
        lo = int(m.group(1)) if m else -1
        hi = int(m.group(2)) if m and m.group(2) is not None else lo
        if m is None or not 0 <= lo <= hi <= MAX_CPU_ID:
            raise InvalidRequestError(
                f"nvidia-smi topo: CPU affinity {text[:40]!r} is not a list of CPU ids and ranges in 0-{MAX_CPU_ID}",
                key="topology",
            )
        cpus.update(range(lo, hi + 1))
    return frozenset(cpus)


def _parse_numa(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class SubsetChoice:
    """A chosen set of GPUs and why it was chosen (the comparison key)."""

    indices: tuple[int, ...]
    bottleneck: int  # rank of the worst link inside the set (NV_BASE+ for NVLink)
    total: int  # sum of link ranks over all pairs in the set
    numa_nodes: int  # distinct NUMA nodes spanned


@dataclass(frozen=True, slots=True)
class Nic:
    """A network interface of the node: its link to each GPU, as ``nvidia-smi topo -m`` shows it.

    ``name``: the column name (``NIC0``; older drivers print the device name there). ``device``:
    the device name from the NIC legend (``mlx5_0``), where given. ``links[i]``: the link to GPU i
    (``PIX`` ... ``SYS``). ``numa_node``: the host NUMA node, where known.
    """

    name: str
    links: tuple[str, ...]
    device: str = ""
    numa_node: int | None = None

    def matches(self, name: str) -> bool:
        """Whether ``name`` names this NIC (its column name or its device name)."""
        return name == self.name or (bool(self.device) and name == self.device)


class Topology:
    """Link matrix, NUMA nodes and CPU affinity of the GPUs of one node, and its NICs.

    Immutable after construction except for internal decision caches.
    """

    __slots__ = (
        "_affinity",
        "_best_full",
        "_cache",
        "_links",
        "_near_nic",
        "_nic_ranks",
        "_nics",
        "_numa",
        "_ranks",
        "gpu_count",
        "name",
    )

    def __init__(
        self,
        links: Sequence[Sequence[str]],
        numa_nodes: Sequence[int | None] | None = None,
        cpu_affinity: Sequence[Iterable[int]] | None = None,
        *,
        name: str = "",
        nics: Sequence[Nic] = (),
    ) -> None:
        n = len(links)
        if any(len(row) != n for row in links):
            raise InvalidRequestError("topology: link matrix is not square", key="topology")
        for i in range(n):
            for j in range(n):
                if i != j and links[i][j] != links[j][i]:
                    raise InvalidRequestError(
                        f"topology: link GPU{i}-GPU{j} is {links[i][j]!r} but GPU{j}-GPU{i} is {links[j][i]!r}",
                        key="topology",
                    )
        self.name = name
        self.gpu_count = n
        self._links = tuple(tuple("X" if i == j else links[i][j] for j in range(n)) for i in range(n))
        self._ranks = tuple(tuple(0 if i == j else link_rank(links[i][j]) for j in range(n)) for i in range(n))
        self._numa: tuple[int | None, ...] = tuple(numa_nodes) if numa_nodes is not None else (None,) * n
        self._affinity = tuple(frozenset(a) for a in cpu_affinity) if cpu_affinity is not None else (frozenset(),) * n
        if len(self._numa) != n or len(self._affinity) != n:
            raise InvalidRequestError("topology: NUMA/affinity length differs from GPU count", key="topology")
        self._cache: Memo[tuple[int, int, bool, bool], SubsetChoice | None] = Memo(
            "free mask, GPUs wanted, nvlink, same_numa", 65536
        )
        self._best_full: dict[int, int] = {}
        self._nics = tuple(nics)
        names: set[str] = set()
        for nic in self._nics:
            if not isinstance(nic, Nic) or len(nic.links) != n:
                raise InvalidRequestError(f"topology: NIC {nic!r} does not give one link per GPU", key="topology")
            if not nic.name or nic.name in names or (nic.device and nic.device in names):
                raise InvalidRequestError(f"topology: NIC name {nic.name!r} is empty or not unique", key="topology")
            names.update((nic.name, nic.device) if nic.device else (nic.name,))
        self._nic_ranks = tuple(tuple(link_rank(x) for x in nic.links) for nic in self._nics)
        self._near_nic: dict[tuple[int, int], int] = {}

    # -- construction helpers -------------------------------------------------
    @classmethod
    def uniform(cls, n: int, link: str = "SYS", *, numa_node: int | None = None, name: str = "") -> Topology:
        """A node whose GPUs are all joined by the same link (or unknown topology)."""
        links = [[link] * n for _ in range(n)]
        return cls(links, [numa_node] * n, None, name=name or f"uniform-{n}-{link}")

    def project(self, parents: Sequence[int], *, name: str = "") -> Topology:
        """The topology of devices carved from these GPUs (device k lives on GPU ``parents[k]``).

        Two devices on one GPU (MIG devices) are joined as PIX, the nearest link without
        NVLink; devices on different GPUs inherit their GPUs' link.
        """
        links = [
            ["X" if a == b else ("PIX" if pa == pb else self.link(pa, pb)) for b, pb in enumerate(parents)]
            for a, pa in enumerate(parents)
        ]
        return Topology(
            links,
            [self.numa_node(p) for p in parents],
            [self.cpu_affinity(p) for p in parents],
            name=name or f"{self.name}-projected",
            nics=[Nic(c.name, tuple(c.links[p] for p in parents), c.device, c.numa_node) for c in self._nics],
        )

    def without_nics(self) -> Topology:
        """The same GPUs without the NICs (what NVML, which sees no NICs, discovers)."""
        return Topology(self._links, self._numa, self._affinity, name=self.name)

    # -- queries --------------------------------------------------------------
    def link(self, i: int, j: int) -> str:
        """The link between GPUs i and j as nvidia-smi names it (``"X"`` for i == j)."""
        return self._links[i][j]

    def rank(self, i: int, j: int) -> int:
        """Rank of the link between i and j (see :func:`link_rank`)."""
        return self._ranks[i][j]

    def numa_node(self, i: int) -> int | None:
        """Host NUMA node of GPU i, or None where unknown."""
        return self._numa[i]

    def cpu_affinity(self, i: int) -> frozenset[int]:
        """CPU ids close to GPU i (empty where unknown)."""
        return self._affinity[i]

    def is_nvlink(self, i: int, j: int) -> bool:
        """Whether GPUs i and j are joined by NVLink."""
        return self._ranks[i][j] >= NV_BASE

    def matrix(self) -> list[list[str]]:
        """The link matrix as nvidia-smi prints it."""
        return [list(row) for row in self._links]

    @property
    def nics(self) -> tuple[Nic, ...]:
        """The NICs, in nvidia-smi's order (none where the source lists none, as NVML)."""
        return self._nics

    def nic_indices(self, name: str) -> tuple[int, ...]:
        """Positions in :attr:`nics` of the NIC ``name`` names (its name or device), or of every NIC for ``"any"``."""
        return tuple(n for n, nic in enumerate(self._nics) if name == "any" or nic.matches(name))

    def nic_rank(self, nic: int, gpu: int) -> int:
        """Rank of the link between NIC ``nic`` (a position in :attr:`nics`) and a GPU (see :func:`link_rank`)."""
        return self._nic_ranks[nic][gpu]

    def near_nic(self, nic: int, worst: int) -> int:
        """Mask of the GPUs joined to NIC ``nic`` by a link ranked ``worst`` or better (remembered)."""
        key = (nic, worst)
        mask = self._near_nic.get(key)
        if mask is None:
            mask = sum(1 << i for i, r in enumerate(self._nic_ranks[nic]) if r >= worst)
            self._near_nic[key] = mask
        return mask

    def signature(self) -> tuple[object, ...]:
        """A value equal for two topologies with the same links, NUMA, affinity and NICs."""
        return (self._links, self._numa, self._affinity, self._nics)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topology) and self.signature() == other.signature()

    def __hash__(self) -> int:
        return hash(self._links)

    def __repr__(self) -> str:
        return f"Topology(name={self.name!r}, gpu_count={self.gpu_count})"

    # -- choosing GPUs --------------------------------------------------------
    def evaluate(self, indices: Sequence[int]) -> SubsetChoice:
        """Bottleneck, total and NUMA spread of one set of GPUs."""
        ranks = self._ranks
        bottleneck = NV_BASE * 10  # a single GPU has no link to be limited by
        total = 0
        for a, b in itertools.combinations(indices, 2):
            r = ranks[a][b]
            total += r
            if r < bottleneck:
                bottleneck = r
        numa = len({self._numa[i] for i in indices})
        return SubsetChoice(tuple(indices), bottleneck, total, numa)

    def best_bottleneck(self, k: int) -> int:
        """The best bottleneck rank any k GPUs of this node can have when all are free."""
        if k not in self._best_full:
            choice = self.best_subset((1 << self.gpu_count) - 1, k)
            self._best_full[k] = choice.bottleneck if choice else 0
        return self._best_full[k]

    def best_subset(
        self, free_mask: int, k: int, *, nvlink: bool = False, same_numa: bool = False
    ) -> SubsetChoice | None:
        """Choose k GPUs among ``free_mask`` (bit i = GPU i free), or None if impossible.

        Order of preference: best bottleneck link; best total of links; fewest
        NUMA nodes; then the choice that leaves the remaining free GPUs best
        connected (so a single GPU takes the free partner of a used GPU rather
        than split an intact NVLink pair); then the lowest indices.
        ``nvlink`` requires every pair to be joined by NVLink; ``same_numa``
        requires one NUMA node.
        """
        key = (free_mask, k, nvlink, same_numa)
        cache = self._cache
        if key in cache:
            return cache.data[key]  # None is a remembered answer too
        return cache.put(key, self._search(free_mask, k, nvlink, same_numa))

    def _search(self, free_mask: int, k: int, nvlink: bool, same_numa: bool) -> SubsetChoice | None:
        free = [i for i in range(self.gpu_count) if free_mask >> i & 1]
        if k <= 0 or k > len(free):
            return None
        if math.comb(len(free), k) * max(1, k * (k - 1) // 2) > ENUMERATE_WORK:
            found = _SubsetSearch(self._ranks, self._numa, free, k, nvlink, same_numa, search_budget(len(free))).run()
            return None if found is None else self.evaluate(found)
        return self._enumerate(free, k, nvlink, same_numa)

    def _enumerate(self, free: list[int], k: int, nvlink: bool, same_numa: bool) -> SubsetChoice | None:
        """Every k-subset of ``free``, the best by :meth:`best_subset`'s order (small searches)."""
        ranks = self._ranks
        # Connectivity each free GPU contributes to the free set; what a choice
        # removes from the remaining set is the sum over its members minus the
        # links counted twice inside it.
        contrib = {i: sum(ranks[i][j] for j in free if j != i) for i in free}
        best_key: tuple[int, int, int, int] | None = None
        best: SubsetChoice | None = None
        for combo in itertools.combinations(free, k):
            choice = self.evaluate(combo)
            if nvlink and k > 1 and choice.bottleneck < NV_BASE:
                continue
            if same_numa and choice.numa_nodes > 1:
                continue
            removed = sum(contrib[i] for i in combo) - choice.total
            cand = (choice.bottleneck, choice.total, -choice.numa_nodes, -removed)
            if best_key is None or cand > best_key:
                best_key, best = cand, choice
        return best


class _SubsetSearch:
    """Branch and bound over k-subsets of free devices, in the order of :meth:`Topology.best_subset`.

    Phase 1 finds the best bottleneck: the highest link rank b such that k free devices are pairwise
    joined by links of rank >= b (a k-clique of that graph; cliques are bounded by a greedy colouring).
    Phase 2 searches the cliques of that graph in lexicographic order for the best (total, fewest NUMA
    nodes, connectivity left), pruning a branch when its upper bound cannot beat the best found (ties
    lose, so the lowest indices win, as in the exhaustive search). With a budget (0: none) each phase
    stops after that many search nodes, and phase 2 starts from greedy sets: the answer is the best
    of them and of what the search found, with the best bottleneck phase 1 proved.
    """

    def __init__(
        self,
        ranks: tuple[tuple[int, ...], ...],
        numa: tuple[int | None, ...],
        free: list[int],
        k: int,
        nvlink: bool,
        same_numa: bool,
        budget: int,
    ) -> None:
        n = len(free)
        self.free = free
        self.k = k
        self.n = n
        self.r = [[ranks[a][b] for b in free] for a in free]
        self.contrib = [sum(row) for row in self.r]
        groups: dict[int | None, int] = {}
        for p, i in enumerate(free):
            groups[numa[i]] = groups.get(numa[i], 0) | 1 << p
        self.group_masks = list(groups.values())
        self.group_of = [0] * n
        for g, m in enumerate(self.group_masks):
            for p in range(n):
                if m >> p & 1:
                    self.group_of[p] = g
        self.nvlink = nvlink
        self.same_numa = same_numa
        self.budget = budget
        # The link levels present, best first, and per device the devices joined to it at each level or
        # better (one pass over the matrix, so trying a level costs a row per device, not the matrix).
        self.levels = sorted(
            {rank for p, row in enumerate(self.r) for q, rank in enumerate(row) if q != p}, reverse=True
        )
        at = {level: x for x, level in enumerate(self.levels)}
        self.joined: list[list[int]] = []
        for p, row in enumerate(self.r):
            masks = [0] * len(self.levels)
            for q, rank in enumerate(row):
                if q != p:
                    masks[at[rank]] |= 1 << q
            for x in range(1, len(masks)):
                masks[x] |= masks[x - 1]
            self.joined.append(masks)
        # Greedy choices compare (links to the chosen, fewest NUMA nodes, fewest links) as one integer.
        self.contrib_bits = max(self.contrib, default=0).bit_length()
        self.group_bits = (len(self.group_masks) + 1).bit_length()
        self.nodes = 0
        self.adj: list[int] = []
        self.best_link = [0] * n  # per device, its best link inside the phase-2 graph
        self.gain = [0] * n  # per device, the ranks of its links to the chosen devices
        self.chosen: list[int] = []
        self.best: tuple[int, int, int] | None = None
        self.best_set: list[int] = []

    def _forget(self) -> None:
        """Start a level afresh (a method, so that no caller's view of ``best`` is narrowed to None)."""
        self.nodes = 0
        self.best = None
        self.best_set = []

    def _spent(self) -> bool:
        self.nodes += 1
        return self.budget > 0 and self.nodes > self.budget

    def _colours(self, cand: int, enough: int) -> int:
        """Colours of a greedy colouring of ``cand`` (at least its largest clique), counted up to ``enough``."""
        adj = self.adj
        colours = 0
        rest = cand
        while rest:
            colours += 1
            if colours >= enough:
                return colours
            avail = rest
            while avail:
                low = avail & -avail
                rest &= ~low
                avail &= ~low & ~adj[low.bit_length() - 1]
        return colours

    def _domain(self, p: int) -> int:
        """The devices ``p`` may be chosen with."""
        return self.group_masks[self.group_of[p]] if self.same_numa else (1 << self.n) - 1

    def _clique(self, chosen: list[int], cand: int, need: int) -> list[int] | None:
        if need == 0:
            return chosen
        if self._spent() or cand.bit_count() < need or self._colours(cand, need) < need:
            return None
        while cand and cand.bit_count() >= need:
            low = cand & -cand
            cand &= ~low
            v = low.bit_length() - 1
            found = self._clique([*chosen, v], cand & self.adj[v], need - 1)
            if found is not None:
                return found
        return None

    def run(self) -> tuple[int, ...] | None:
        n, k, r = self.n, self.k, self.r
        for x, level in enumerate(self.levels):
            if self.nvlink and level < NV_BASE:
                break
            # Devices joined at this level or better (and, for same_numa, on the same NUMA node).
            self.adj = [self.joined[p][x] & self._domain(p) for p in range(n)]
            self._forget()
            clique = self._clique([], (1 << n) - 1, k)
            if clique is None and self.budget > 0 and self.nodes > self.budget:
                # Out of budget before an answer: greedy sets from the best-connected devices decide.
                for start in sorted(range(n), key=lambda p: -self.adj[p].bit_count())[:8]:
                    self._greedy(start)
                clique = self.best_set if self.best is not None else None
            if clique is None:
                continue
            self.best_link = [max([r[p][q] for q in range(n) if self.adj[p] >> q & 1], default=0) for p in range(n)]
            self.nodes = 0
            if self.budget > 0:  # bounded: start from greedy sets, so that the budget only improves on them
                for start in clique[:4]:
                    self._greedy(start)
            self._optimise((1 << n) - 1, 0, 0, 0)
            if self.best is None:  # the budget ran out before any set: the clique of phase 1
                self.best_set = clique
            return tuple(self.free[p] for p in sorted(self.best_set))
        return None

    def _greedy(self, start: int) -> None:
        """A set grown from ``start`` by the best next device (links to the chosen ones, NUMA, fewest links)."""
        r, k, adj, contrib, group_of = self.r, self.k, self.adj, self.contrib, self.group_of
        shift_c, shift_g = self.contrib_bits, self.contrib_bits + self.group_bits
        spare_g, spare_c = (1 << self.group_bits) - 1, (1 << shift_c) - 1
        gain = list(r[start])
        chosen, cand = [start], adj[start]
        members = [q for q in range(self.n) if cand >> q & 1]
        total, csum, groups = 0, contrib[start], 1 << group_of[start]
        spanned = 1
        while len(chosen) < k and members:
            pick, pick_key = -1, -1
            for q in members:
                wider = 0 if groups >> group_of[q] & 1 else 1
                rank = gain[q] << shift_g | (spare_g - spanned - wider) << shift_c | (spare_c - contrib[q])
                if rank > pick_key:
                    pick, pick_key = q, rank
            chosen.append(pick)
            total += gain[pick]
            csum += contrib[pick]
            if not groups >> group_of[pick] & 1:
                groups |= 1 << group_of[pick]
                spanned += 1
            near = adj[pick]
            row = r[pick]
            members = [q for q in members if near >> q & 1]
            for q in members:
                gain[q] += row[q]
        if len(chosen) == k:
            key = (total, -groups.bit_count(), total - csum)
            if self.best is None or key > self.best:
                self.best, self.best_set = key, chosen

    def _optimise(self, cand: int, total: int, csum: int, groups: int) -> None:
        """Extend ``self.chosen`` (pairwise joined, total link rank ``total``) from ``cand``."""
        need = self.k - len(self.chosen)
        if need == 0:
            key = (total, -groups.bit_count(), total - csum)
            if self.best is None or key > self.best:
                self.best, self.best_set = key, list(self.chosen)
            return
        if self._spent() or cand.bit_count() < need or self._colours(cand, need) < need:
            return
        if self.best is not None and not self._may_beat(cand, need, total, csum, groups):
            return
        r, gain = self.r, self.gain
        while cand and cand.bit_count() >= need:
            low = cand & -cand
            cand &= ~low
            v = low.bit_length() - 1
            row = r[v]
            for q in range(self.n):
                gain[q] += row[q]
            self.chosen.append(v)
            self._optimise(
                cand & self.adj[v], total + gain[v] - row[v], csum + self.contrib[v], groups | 1 << self.group_of[v]
            )
            self.chosen.pop()
            for q in range(self.n):
                gain[q] -= row[q]
            if self.budget > 0 and self.nodes > self.budget:
                return

    def _may_beat(self, cand: int, need: int, total: int, csum: int, groups: int) -> bool:
        """Whether some completion from ``cand`` could rank above the best found (ties lose)."""
        assert self.best is not None
        best_total, best_numa, best_left = self.best
        members = [q for q in range(self.n) if cand >> q & 1]
        # A new device adds its links to the chosen ones, and to each other new one at most its best link.
        doubled = sorted((2 * self.gain[q] + (need - 1) * self.best_link[q] for q in members), reverse=True)
        bound = total + sum(doubled[:need]) // 2
        if bound != best_total:
            return bound > best_total
        numa = groups.bit_count()
        inside = 0
        for g, m in enumerate(self.group_masks):
            if groups >> g & 1:
                inside |= m
        if numa == 0 or self._colours(cand & inside, need) < need:
            numa += 1  # the rest cannot all come from the NUMA nodes already spanned
        if -numa != best_numa:
            return -numa > best_numa
        cheapest = sorted(self.contrib[q] for q in members)[:need]
        return best_total - csum - sum(cheapest) > best_left


# -- parsing nvidia-smi topo -m -------------------------------------------------
_DEVICE_HEADER = re.compile(r"^(GPU\d+|NIC\d+|mlx\d+_\d+|[A-Za-z]+\d*_\d+)$")


_NIC_LEGEND = re.compile(r"^\s*(NIC\d+)\s*:\s*(\S+)\s*$")


def parse_nvidia_smi_topo(text: str) -> Topology:
    """Parse the output of ``nvidia-smi topo -m``.

    Accepts raw output (tab-separated, self cell `` X ``) and terminal copies
    (runs of spaces); with or without NIC rows and the NIC legend; old drivers
    without the NUMA Affinity column. NICs are kept (:class:`Nic`): the link to
    each GPU from the GPU rows, the device name from the NIC legend, and the NUMA
    node of the GPUs it reaches without crossing the SMP interconnect (NODE or
    nearer), where they agree on one. Raises :class:`InvalidRequestError` when
    the text has no GPU matrix, or a NIC row contradicts the GPU rows.
    """
    lines = text.splitlines()
    header_at = None
    for n, line in enumerate(lines):
        toks = line.split()
        # The header starts with GPU0 followed by another column name; the GPU0
        # row starts with GPU0 followed by its self cell "X".
        if len(toks) > 1 and toks[0] == "GPU0" and toks[1] != "X":
            header_at = n
            break
    if header_at is None:
        raise InvalidRequestError("nvidia-smi topo: no header line with GPU0 found", key="topology")
    header = lines[header_at]
    tokens = header.split()
    devices: list[str] = []
    for tok in tokens:
        if _DEVICE_HEADER.match(tok):
            devices.append(tok)
        else:
            break
    has_cpu = "CPU Affinity" in header or "CPU" in tokens[len(devices) : len(devices) + 1]
    has_numa = "NUMA Affinity" in header
    gpu_names = [d for d in devices if d.startswith("GPU")]
    nic_names = [d for d in devices if not d.startswith("GPU")]
    col_of = {d: c for c, d in enumerate(devices)}
    links: dict[str, list[str]] = {}
    cpu: dict[str, frozenset[int]] = {}
    numa: dict[str, int | None] = {}
    for line in lines[header_at + 1 :]:
        stripped = line.strip()
        if not stripped:
            if links:
                break
            continue
        if stripped.startswith("Legend"):
            break
        cells = stripped.split()
        label = cells[0]
        if label not in col_of:
            continue
        values = cells[1:]
        if len(values) < len(devices):
            raise InvalidRequestError(
                f"nvidia-smi topo: row {label} has {len(values)} cells, expected {len(devices)}",
                key="topology",
            )
        links[label] = values[: len(devices)]
        rest = values[len(devices) :]
        if label.startswith("GPU"):
            cpu[label] = _parse_cpu_list(rest[0]) if has_cpu and rest else frozenset()
            numa[label] = _parse_numa(rest[1]) if has_numa and len(rest) > 1 else None
    missing = [g for g in gpu_names if g not in links]
    if missing:
        raise InvalidRequestError(f"nvidia-smi topo: no row for {', '.join(missing)}", key="topology")
    matrix = [[links[a][col_of[b]] for b in gpu_names] for a in gpu_names]
    legend: dict[str, str] = {}
    for line in lines[header_at + 1 :]:
        m = _NIC_LEGEND.match(line)
        if m:
            legend[m.group(1)] = m.group(2)
    gpu_numa = [numa[g] for g in gpu_names]
    nics = []
    for nic in nic_names:
        to_gpus = tuple(links[g][col_of[nic]] for g in gpu_names)
        row = links.get(nic)
        if row is not None:
            for g, seen in zip(gpu_names, to_gpus, strict=True):
                if row[col_of[g]] != seen:
                    raise InvalidRequestError(
                        f"nvidia-smi topo: link {g}-{nic} is {seen!r} but {nic}-{g} is {row[col_of[g]]!r}",
                        key="topology",
                    )
        local = {gpu_numa[i] for i, link in enumerate(to_gpus) if link_rank(link) >= LINK_RANKS["NODE"]}
        home = next(iter(local)) if len(local) == 1 else None
        nics.append(Nic(nic, to_gpus, legend.get(nic, ""), home))
    return Topology(matrix, gpu_numa, [cpu[g] for g in gpu_names], name="nvidia-smi", nics=nics)
