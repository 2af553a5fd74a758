"""The ledger: the committed records, the occupancy they imply and every index derived from them.

A :class:`Ledger` is what the decision layer reads. It changes in exactly two ways: ``reload``
(everything, from a full read of the store) and ``apply`` (one committed change set, in commit
order, whoever committed it). A change set of this process's own is staged before its commit
(``stage``: the next decision of a group commit sees it) and then settled or, if the commit was
lost, unstaged, which leaves the ledger as it was. Every index is derived from the records by
``_count`` (a record enters) and ``_uncount`` (it leaves), so the two always agree; the workload
mix that fragmentation scoring needs is one of them, updated from committed groups only. Health marks and cordons are
facts about devices, not records; they are set on the ledger too, so placement sees one picture.

Pure and synchronous: no awaits, no I/O.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter, deque
from collections.abc import Iterable, Mapping, Sequence

from computegroups.decide.plan import Plan
from computegroups.errors import NotFoundError
from computegroups.events import Event
from computegroups.model import AllocationState, GroupRecord, NodeSpec, Scope
from computegroups.placement.cluster import Cluster
from computegroups.placement.fragmentation import FragmentationScore, WorkloadMix
from computegroups.pools import Pool

__all__ = ["CLIQUE_LABEL", "Ledger", "Staged"]

CLIQUE_LABEL = "nvidia.com/gpu.clique"
_RELEASED = AllocationState.RELEASED


class Staged:
    """Decisions applied to the ledger before their commit (see ``Ledger.stage``): their change set,
    merged in order, and what ``Ledger.unstage`` needs to take them back out."""

    __slots__ = ("cordons", "deletes", "events", "marks_prior", "owners", "prior", "tombstones", "upserts")

    def __init__(self, tombstones: int) -> None:
        self.tombstones = tombstones  # released groups queued before staging
        self.prior: dict[str, GroupRecord | None] = {}  # id -> its committed record (None: there was none)
        self.marks_prior: dict[str, str | None] = {}  # node -> its committed cordon reason
        self.owners: list[GroupRecord] = []  # groups that got an owner (the workload mix counts them once committed)
        self.upserts: dict[str, GroupRecord] = {}
        self.deletes: dict[str, None] = {}
        self.cordons: dict[str, str | None] = {}
        self.events: list[Event] = []

    @property
    def empty(self) -> bool:
        """Nothing to commit."""
        return not (self.upserts or self.deletes or self.cordons)


class Ledger:
    """Committed records and their indexes at ``revision`` (see the module docstring)."""

    def __init__(
        self,
        nodes: Sequence[NodeSpec],
        pools: Iterable[Pool] = (),
        cordoned: Iterable[str] = (),
        unhealthy: Mapping[tuple[str, int], str] | None = None,
    ) -> None:
        self.nodes = tuple(nodes)
        self.specs = {n.id: n for n in self.nodes}
        self.cordoned = frozenset(cordoned)  # by the provider (a Kubernetes node cordoned or tainted)
        self.cordons: dict[str, str] = {}  # by an operator, committed in the state: node -> reason
        self.pools = {p.name: p for p in pools}
        self.pool_members = {name: p.members(self.nodes) for name, p in self.pools.items()}
        self.pool_gpus = {
            name: sum(len(self.specs[n].gpus) for n in members) for name, members in self.pool_members.items()
        }
        self.domain_of: dict[str, str] = {}
        self.domain_nodes: dict[str, set[str]] = {}
        for n in self.nodes:
            domain = n.labels.get(CLIQUE_LABEL) or f"node:{n.id}"
            self.domain_of[n.id] = domain
            self.domain_nodes.setdefault(domain, set()).add(n.id)
        self.unhealthy: dict[tuple[str, int], str] = dict(unhealthy or {})  # (node, GPU index) -> reason
        self.revision = -1
        self._reset()

    def _reset(self) -> None:
        self.cluster = Cluster(self.nodes)
        for node_id in (*self.cordoned, *self.cordons):
            self.cluster.set_cordoned(node_id, True)
        for node_id, index in self.unhealthy:
            self.cluster.set_unhealthy(node_id, index, True)
        self.records: dict[str, GroupRecord] = {}
        self.by_request: dict[str, str] = {}  # request id -> the group it made (a live one first)
        self.by_node: dict[str, set[str]] = {}
        self.carved_free: dict[str, None] = {}  # ordered set of allocatable pre-carved groups
        self.tombstones: deque[str] = deque()  # released groups, oldest first
        self.usage: Counter[tuple[str, str, str]] = Counter()  # (pool, "component"|"tenant", name) -> milli
        self.component_nodes: dict[str, dict[str, int]] = {}  # component -> node id -> groups held there
        self.near: dict[tuple[str, Scope], frozenset[str]] = {}  # (component, scope) -> nodes near it
        self.reservations: dict[str, dict[str, None]] = {}  # component -> its unclaimed reservations
        self.expiry: list[tuple[float, str]] = []  # heap of (expires_at, group id)
        self.victims: dict[str, set[str]] = {}  # waiting preemptor -> victims still holding capacity
        self.nominated: dict[str, dict[str, tuple[int, int]]] = {}  # node -> preemptor -> (gpu mask, priority)
        self.preemptible: dict[str, dict[str, None]] = {}  # node -> preemptible allocated groups
        self.gangs: dict[str, list[str]] = {}  # gang id -> part ids
        self.demand = FragmentationScore(WorkloadMix())  # the workload mix of committed groups

    # -- change ------------------------------------------------------------------------
    def reload(
        self, revision: int, records: Iterable[GroupRecord], cordons: Mapping[str, str | None] | None = None
    ) -> None:
        """Forget everything and count ``records`` (a full read of the store at ``revision``, with
        every node an operator cordoned)."""
        self.cordons = {n: why for n, why in (cordons or {}).items() if why is not None}
        self._reset()
        for r in sorted(records, key=lambda r: (r.updated_at, r.id)):
            self._count(r, None)
        self.revision = revision

    def apply(
        self,
        revision: int,
        upserts: Sequence[GroupRecord],
        deletes: Sequence[str],
        cordons: Mapping[str, str | None] | None = None,
    ) -> None:
        """Apply one committed change set (records written, ids deleted, nodes cordoned with a reason
        or uncordoned with None) that took the state to ``revision``."""
        self._put(upserts, deletes, cordons, None)
        tombstones = self.tombstones
        records = self.records
        while tombstones:  # forget pruned groups from the oldest end
            oldest = records.get(tombstones[0])
            if oldest is not None and oldest.state is _RELEASED:
                break
            tombstones.popleft()
        self.revision = revision

    def stage(self, staged: Staged, plan: Plan) -> None:
        """Apply ``plan``'s change set before it is committed, adding it to ``staged`` (a group commit:
        the next decision sees this one). ``unstage`` takes it back out, ``settle`` keeps it."""
        if plan.cordons:
            for node_id, why in plan.cordons.items():
                if node_id not in staged.marks_prior:
                    staged.marks_prior[node_id] = self.cordons.get(node_id)
                staged.cordons[node_id] = why
        self._put(plan.upserts, plan.deletes, plan.cordons, staged)
        staged.events.extend(plan.events)

    def unstage(self, staged: Staged) -> None:
        """Take staged decisions back out (their commit was lost): the ledger is as it was before them."""
        records = self.records
        tombstones = self.tombstones
        for gid, old in staged.prior.items():
            cur = records.get(gid)
            if cur is not None:
                self._uncount(cur)
            if old is not None:
                self._count(old, old)
                if old.state is _RELEASED:
                    tombstones.pop()  # it kept its place in the queue; _count appended it again
        while len(tombstones) > staged.tombstones:  # staging only appends
            tombstones.pop()
        if staged.marks_prior:
            self._mark(staged.marks_prior)

    def settle(self, staged: Staged, revision: int, pruned: Sequence[str] = ()) -> None:
        """The staged decisions, and ``pruned`` (old tombstones deleted with them), were committed as
        ``revision``."""
        for r in staged.owners:
            self.demand.mix.observe(r.requirements)
        self.apply(revision, (), pruned)

    def _mark(self, cordons: Mapping[str, str | None]) -> None:
        for node_id, why in cordons.items():
            if why is None:
                self.cordons.pop(node_id, None)
            else:
                self.cordons[node_id] = why
            self.cluster.set_cordoned(node_id, node_id in self.cordoned or why is not None)

    def _put(
        self,
        upserts: Sequence[GroupRecord],
        deletes: Sequence[str],
        cordons: Mapping[str, str | None] | None,
        staged: Staged | None,
    ) -> None:
        if cordons:
            self._mark(cordons)
        records = self.records
        owners = None if staged is None else staged.owners
        for r in upserts:
            old = records.get(r.id)
            if staged is not None:
                if r.id not in staged.prior:
                    staged.prior[r.id] = old
                staged.upserts[r.id] = r
                staged.deletes.pop(r.id, None)
            if old is not None:
                self._uncount(old)
            self._count(r, old, owners)
        for gid in deletes:
            old = records.get(gid)
            if staged is not None:
                if gid not in staged.prior:
                    staged.prior[gid] = old
                staged.upserts.pop(gid, None)
                staged.deletes[gid] = None
            if old is not None:
                self._uncount(old)

    def _count(self, r: GroupRecord, old: GroupRecord | None, owners: list[GroupRecord] | None = None) -> None:
        gid = r.id
        self.records[gid] = r
        released = r.state is _RELEASED
        self.cluster.apply(r)  # counts only what holds capacity
        if r.request_id:
            if not released:
                self.by_request[r.request_id] = gid
            else:
                self.by_request.setdefault(r.request_id, gid)
        ids = self.by_node.get(r.node_id)
        if ids is None:
            ids = self.by_node[r.node_id] = set()
        ids.add(gid)
        if r.carved and r.state is AllocationState.FREE:
            self.carved_free[gid] = None
        if released:
            self.tombstones.append(gid)
        else:
            self._count_live(r, 1)
        if r.gang_id:
            self.gangs.setdefault(r.gang_id, []).append(gid)
        # A group got an owner: one request served (a multi-node group counts once, at its first part).
        got_owner = r.component is not None and (old is None or old.component is None)
        if got_owner and (r.gang_id is None or gid == f"{r.gang_id}.0"):
            if owners is None:
                self.demand.mix.observe(r.requirements)
            else:  # staged: counted in the mix once committed
                owners.append(r)

    def _uncount(self, old: GroupRecord) -> None:
        gid = old.id
        del self.records[gid]
        self.cluster.remove(old)
        if old.request_id and self.by_request.get(old.request_id) == gid:
            del self.by_request[old.request_id]
        ids = self.by_node.get(old.node_id)
        if ids is not None:
            ids.discard(gid)
        if old.carved:
            self.carved_free.pop(gid, None)
        if old.state is not _RELEASED:
            self._count_live(old, -1)
        if old.gang_id and old.gang_id in self.gangs:
            parts = self.gangs[old.gang_id]
            if gid in parts:
                parts.remove(gid)
            if not parts:
                del self.gangs[old.gang_id]

    def _count_live(self, r: GroupRecord, sign: int) -> None:
        """Indexes over groups that are not released: quotas, affinity, reservations, preemption."""
        component = r.component
        if component is None:
            return  # a free pre-carved group: no owner to count
        if r.pool:
            milli = sign * r.share_milli
            self.usage[(r.pool, "component", component)] += milli
            if r.tenant:
                self.usage[(r.pool, "tenant", r.tenant)] += milli
        state = r.state
        if r.pending:
            noms = self.nominated.setdefault(r.node_id, {})
            if sign > 0:
                noms[r.id] = (sum(1 << d.index for d in r.devices), r.priority)
            else:
                noms.pop(r.id, None)
                if not noms:
                    del self.nominated[r.node_id]
        else:
            nodes = self.component_nodes.setdefault(component, {})
            count = nodes.get(r.node_id, 0) + sign
            if count > 0:
                nodes[r.node_id] = count
            else:
                nodes.pop(r.node_id, None)
            if (count == 1 and sign > 0) or count <= 0:  # the component arrived on or left a node
                self.near.pop((component, Scope.NODE), None)
                self.near.pop((component, Scope.NVLINK_DOMAIN), None)
            if state is AllocationState.RESERVED:
                bucket = self.reservations.setdefault(component, {})
                if sign > 0:
                    bucket[r.id] = None
                else:
                    bucket.pop(r.id, None)
            if sign > 0 and r.expires_at is not None:
                heapq.heappush(self.expiry, (r.expires_at, r.id))  # a drained reservation expires too
            if r.preempted_by:
                victims = self.victims.setdefault(r.preempted_by, set())
                (victims.add if sign > 0 else victims.discard)(r.id)
        if r.preemptible and state is AllocationState.ALLOCATED and not r.carved:
            bucket = self.preemptible.setdefault(r.node_id, {})
            if sign > 0:
                bucket[r.id] = None
            else:
                bucket.pop(r.id, None)

    def prunable(self, limit: int, slack: int, staged: Staged) -> list[str]:
        """The oldest released groups past ``limit`` to delete with ``staged`` (none of its own records);
        a batch at a time, once more than ``min(slack, limit // 8)`` are over, since a delete per
        release would cost every release."""
        excess = len(self.tombstones) - limit
        if excess <= min(slack, limit // 8):
            return []
        written = {*staged.upserts, *staged.deletes}
        out: list[str] = []
        for gid in itertools.islice(self.tombstones, excess):
            r = self.records.get(gid)
            if r is not None and r.state is _RELEASED and gid not in written:
                out.append(gid)
                written.add(gid)
        return out

    # -- device and node facts -----------------------------------------------------------
    def cordon_reason(self, node_id: str) -> str | None:
        """Why a node takes no new groups (an operator's reason first), or None."""
        why = self.cordons.get(node_id)
        if why is None and node_id in self.cordoned:
            return "cordoned where it runs (e.g. kubectl cordon, or a taint)"
        return why

    def set_unhealthy(self, node_id: str, index: int, reason: str | None) -> bool:
        """Mark a GPU unhealthy (``reason``) or healthy again (None); True if that changed anything."""
        key = (node_id, index)
        if reason is None:
            if self.unhealthy.pop(key, None) is None:
                return False
            self.cluster.set_unhealthy(node_id, index, False)
            return True
        if key in self.unhealthy:
            return False
        self.unhealthy[key] = reason
        self.cluster.set_unhealthy(node_id, index, True)
        return True

    # -- reading -------------------------------------------------------------------------
    def parts(self, gid: str) -> list[GroupRecord]:
        """The records behind a group id: one, or every part of a multi-node group (NotFoundError if none)."""
        r = self.records.get(gid)
        gang = gid if gid in self.gangs else (r.gang_id if r is not None else None)
        if gang is not None and gang in self.gangs:
            return sorted((self.records[p] for p in self.gangs[gang]), key=lambda x: x.id)
        if r is None:
            raise NotFoundError(f"group_id: no compute group {gid!r}")
        return [r]

    def nodes_near(self, component: str, scope: Scope) -> frozenset[str]:
        """Nodes that share a node (or an NVLink domain) with a group of ``component`` (remembered)."""
        key = (component, scope)
        nodes = self.near.get(key)
        if nodes is not None:
            return nodes
        hosts = self.component_nodes.get(component) or {}
        if scope is Scope.NODE:
            nodes = frozenset(hosts)
        else:
            out: set[str] = set()
            for n in hosts:
                out |= self.domain_nodes.get(self.domain_of.get(n, f"node:{n}"), {n})
            nodes = frozenset(out)
        self.near[key] = nodes
        return nodes

    def due(self, now: float) -> list[GroupRecord]:
        """Reservations past their deadline (taken off the expiry heap; ``requeue`` puts them back)."""
        heap = self.expiry
        if not heap or heap[0][0] > now:
            return []
        due: list[GroupRecord] = []
        seen: set[str] = set()  # a record counted again (drained, or unstaged) is on the heap twice
        while heap and heap[0][0] <= now:
            at, gid = heapq.heappop(heap)
            r = self.records.get(gid)
            if r is None or r.expires_at != at or r.pending or gid in seen:
                continue
            seen.add(gid)
            if r.state in (AllocationState.RESERVED, AllocationState.DRAINING):
                due.append(r)
        return due

    def requeue(self, records: Iterable[GroupRecord]) -> None:
        """Put reservations ``due`` returned back on the expiry heap (their release was not committed)."""
        for r in records:
            if r.expires_at is not None:
                heapq.heappush(self.expiry, (r.expires_at, r.id))

    def expired(self, r: GroupRecord, now: float) -> bool:
        """Whether ``r`` is a reservation whose deadline has passed (it holds nothing any more)."""
        return (
            r.expires_at is not None
            and r.expires_at <= now
            and not r.pending
            and r.state in (AllocationState.RESERVED, AllocationState.DRAINING)
        )
