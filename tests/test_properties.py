"""Property tests: random sequences of operations (and restarts) against the invariants.

Invariants checked after every step:
  * no device is allocated beyond its capacity, and a whole GPU has at most one group;
  * the manager's occupancy indexes equal occupancy recomputed from the records;
  * owned groups have a component, free pre-carved groups have none, draining groups get no new owner;
  * reservations and allocations never count the same capacity twice; expired reservations are released;
  * quotas are never exceeded; preemption never touches a non-preemptible group;
  * totals add up: allocated + reserved + free == total GPUs;
  * a restart on the same store sees exactly the same groups (SQLite runs).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from computegroups import (
    ComputeGroupManager,
    ConflictError,
    InsufficientResourcesError,
    SimulatedComputeResourceProvider,
)
from computegroups.errors import PreemptionPendingError
from computegroups.model import MILLI, AllocationState
from computegroups.placement.cluster import Cluster, _Bucket

SPEC = {
    "nodes": [
        {
            "id": "pairs",
            "preset": "pcie-a6000-nvlink-pairs",
            "cpus": 16,
            "memory_mib": 65536,
            "labels": {"tier": "gold"},
        },
        {"id": "dgx", "preset": "dgx-h100", "cpus": 16, "memory_mib": 65536, "labels": {"tier": "gold"}},
        {"id": "cpu", "preset": "cpu-only", "cpus": 8, "memory_mib": 32768},
    ]
}
POOLS = [
    {
        "name": "gold",
        "selector": {"tier": "gold"},
        "quotas": {
            "components": {"a": {"max_gpus": 5}},
            "tenants": {"t": {"max_share": 0.25}},
            "default_component": {"max_gpus": 9},
        },
    }
]
QUOTA_LIMITS = {
    ("gold", "component", "a"): 5000,
    ("gold", "component", "b"): 9000,
    ("gold", "component", "c"): 9000,
    ("gold", "tenant", "t"): 4000,
}

sizes = st.sampled_from([1, 1, 2, 2, 4, 8, 0.25, 0.5, 0.75, 0.125])
constraints = st.fixed_dictionaries(
    {},
    optional={
        "nvlink": st.booleans(),
        "same_numa": st.booleans(),
        "nic": st.sampled_from(["any", "mlx5_1"]),
        "strategy": st.sampled_from(["binpack", "spread"]),
        "node_id": st.sampled_from(["pairs", "dgx", "cpu"]),
        "pool": st.just("gold"),
        "tenant": st.just("t"),
        "priority": st.integers(0, 3),
        "preemptible": st.booleans(),
        "affinity": st.sampled_from([["a"], [{"component": "b", "required": False}]]),
        "anti_affinity": st.sampled_from([["c"], [{"component": "a", "scope": "nvlink_domain"}]]),
    },
)


class Machine(RuleBasedStateMachine):
    """Drive one manager; ``persistent`` runs use a SQLite file and restart the manager."""

    persistent = False
    groups = Bundle("groups")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.tmp = tempfile.TemporaryDirectory()
        self.state: Any = str(Path(self.tmp.name) / "s.db") if self.persistent else ":memory:"
        self.now = 1_000_000.0
        self.mgr = self._open()

    def _open(self) -> ComputeGroupManager:
        mgr = ComputeGroupManager(
            SimulatedComputeResourceProvider.from_spec(SPEC),
            self.state,
            tombstone_limit=20,
            pools=POOLS,
            clock=lambda: self.now,
        )
        self.loop.run_until_complete(mgr.__aenter__())
        return mgr

    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        self.run(self.mgr.__aexit__(None, None, None))
        self.loop.close()
        self.tmp.cleanup()

    @rule(
        target=groups,
        component=st.sampled_from(["a", "b", "c"]),
        gpus=sizes,
        cons=constraints,
        cpus=st.sampled_from([0, 0, 1, 4]),
    )
    def allocate(self, component: str, gpus: float, cons: dict[str, Any], cpus: int) -> str:
        before = self.run(self.mgr.get_allocation_summary())
        try:
            g = self.run(self.mgr.allocate_compute_group(component, {"gpus": gpus, "cpus": cpus}, cons))
        except PreemptionPendingError as exc:
            for vid in exc.victims:
                v = self.run(self.mgr.get_compute_group(vid))
                assert v.record.preemptible and v.record.priority < cons.get("priority", 0)
                assert v.allocation_state == "draining"
            return exc.group_id
        except InsufficientResourcesError:
            assert self.run(self.mgr.get_allocation_summary()) == before
            return "none"
        assert g.component == component and g.allocation_state == "allocated"
        if cons.get("nvlink") and gpus >= 2:
            assert g.topology["nvlink"]
        if cons.get("same_numa"):
            assert len(g.topology["numa_nodes"]) <= 1
        if cons.get("nic") and g.resources["gpu_indices"]:  # every GPU within NODE of one NIC
            near = {"PIX", "PXB", "PHB", "NODE"}
            assert any(set(links) <= near for links in g.topology["nics"].values()), g.topology
        return g.id

    @rule(target=groups, component=st.sampled_from(["a", "b"]), gpus=sizes, ttl=st.sampled_from([5, 30, 300]))
    def reserve(self, component: str, gpus: float, ttl: int) -> str:
        try:
            g = self.run(self.mgr.reserve_compute_group(component, {"gpus": gpus}, ttl_seconds=ttl))
        except InsufficientResourcesError:
            return "none"
        assert g.allocation_state == "reserved" and g.record.expires_at == self.now + ttl
        return g.id

    @rule(target=groups, gpus=st.sampled_from([1, 4, 8]))
    def gang(self, gpus: int) -> str:
        try:
            g = self.run(self.mgr.allocate_compute_group("c", {"gpus": gpus, "nodes": 2}))
        except InsufficientResourcesError:
            return "none"
        assert len(set(g.resources["node_ids"])) == 2
        return g.id

    @rule(seconds=st.sampled_from([1, 10, 100]))
    def time_passes(self, seconds: int) -> None:
        self.now += seconds
        self.run(self.mgr.expire_reservations())
        for r in self.mgr.ledger.records.values():
            if r.state in (AllocationState.RESERVED, AllocationState.DRAINING) and r.expires_at is not None:
                assert r.expires_at > self.now

    @rule(target=groups, gpus=st.sampled_from([1, 2, 0.5]))
    def create(self, gpus: float) -> str:
        try:
            g = self.run(self.mgr.create_compute_group({"gpus": gpus}))
        except InsufficientResourcesError:
            return "none"
        assert g.allocation_state == "free" and g.component is None
        return g.id

    @rule(gid=consumes(groups))
    def release(self, gid: str) -> None:
        if gid == "none":
            return
        g = self.run(self.mgr.get_compute_group(gid))
        was_owned = g.component is not None and g.allocation_state != "released"
        assert self.run(self.mgr.deallocate_compute_group(gid)) is was_owned
        assert self.run(self.mgr.deallocate_compute_group(gid)) is False  # idempotent

    @rule(gid=groups)
    def drain(self, gid: str) -> None:
        if gid == "none":
            return
        try:
            self.run(self.mgr.drain_compute_group(gid))
        except ConflictError:
            g = self.run(self.mgr.get_compute_group(gid))
            assert g.allocation_state == "released" or g.record.pending
            return
        g = self.run(self.mgr.get_compute_group(gid))
        assert g.allocation_state == "draining"

    @rule(gid=consumes(groups))
    def delete(self, gid: str) -> None:
        if gid == "none":
            return
        g = self.run(self.mgr.get_compute_group(gid))
        try:
            done = self.run(self.mgr.delete_compute_group(gid))
        except ConflictError:
            assert g.component is not None and g.allocation_state != "released"
            return
        assert done is (g.allocation_state != "released")
        assert g.component is None or not done

    @rule()
    def restart(self) -> None:
        before = sorted(g.to_dict()["id"] for g in self.run(self.mgr.list_compute_groups()))
        summary = self.run(self.mgr.get_allocation_summary())
        if not self.persistent:
            return
        self.run(self.mgr.__aexit__(None, None, None))
        self.mgr = self._open()
        assert sorted(g.id for g in self.run(self.mgr.list_compute_groups())) == before
        assert self.run(self.mgr.get_allocation_summary()) == summary

    @invariant()
    def capacity_and_indexes(self) -> None:
        mgr = self.mgr
        records = [r for r in mgr.ledger.records.values() if r.holds_capacity]
        used: dict[tuple[str, int], int] = defaultdict(int)
        whole: dict[tuple[str, int], int] = defaultdict(int)
        for r in records:
            for d in r.devices:
                used[(r.node_id, d.index)] += d.share_milli
                whole[(r.node_id, d.index)] += d.share_milli == MILLI
            if r.state in (AllocationState.ALLOCATED, AllocationState.RESERVED):
                assert r.component is not None
            if r.state is AllocationState.FREE:
                assert r.component is None and r.carved
        assert all(v <= MILLI for v in used.values())
        assert all(v <= 1 for v in whole.values())
        fresh = Cluster(mgr.inventory.nodes)
        for r in records:
            fresh.apply(r)
        for a, b in zip(fresh.nodes, mgr.ledger.cluster.nodes, strict=True):
            assert (a.gpu_used, a.gpu_mem_used, a.cpu_used, a.mem_used, a.free_mask, a.partial_gpus, a.used_milli) == (
                b.gpu_used,
                b.gpu_mem_used,
                b.cpu_used,
                b.mem_used,
                b.free_mask,
                b.partial_gpus,
                b.used_milli,
            )
        for key, cached in list(mgr.ledger.near.items()):  # remembered affinity sets match a fresh look
            del mgr.ledger.near[key]
            assert mgr.ledger.nodes_near(*key) == cached
        for free in range(fresh.max_gpus + 1):
            assert fresh.bucket(free) == mgr.ledger.cluster.bucket(free)
        assert fresh.partial() == mgr.ledger.cluster.partial()
        for r in mgr.ledger.records.values():
            if r.preempted_by is not None:
                assert r.preemptible, "preemption touched a non-preemptible group"
            if r.pending and r.state is not AllocationState.RELEASED:
                assert r.state is AllocationState.RESERVED
        # Quotas are never exceeded: recompute usage from the records.
        usage: dict[tuple[str, str, str], int] = defaultdict(int)
        for r in mgr.ledger.records.values():
            if r.state is AllocationState.RELEASED or r.pool is None or r.component is None:
                continue
            milli = sum(d.share_milli for d in r.devices)
            usage[(r.pool, "component", r.component)] += milli
            if r.tenant:
                usage[(r.pool, "tenant", r.tenant)] += milli
        for key, used_milli in usage.items():
            assert used_milli <= QUOTA_LIMITS[key], key
            assert mgr.ledger.usage[key] == used_milli

    @invariant()
    def totals_add_up(self) -> None:
        s = self.run(self.mgr.get_allocation_summary())
        assert abs(s["allocated_gpus"] + s["reserved_gpus"] + s["free_gpus"] - s["total_gpus"]) < 1e-9


class PersistentMachine(Machine):
    persistent = True


TestInMemory = Machine.TestCase
TestInMemory.settings = settings(
    max_examples=1000, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestSqliteWithRestarts = PersistentMachine.TestCase
TestSqliteWithRestarts.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 60)), max_size=400))
def test_bucket_stays_sorted_through_block_splits_and_removals(ops: list[tuple[bool, int]]) -> None:
    """The blocked bucket behaves as a sorted set, whatever order ordinals come and go in."""
    bucket = _Bucket(load=3)  # tiny blocks: every few additions split one
    model: set[int] = set()
    for add, ordinal in ops:
        if add and ordinal not in model:
            bucket.add(ordinal)
            model.add(ordinal)
        elif not add:
            bucket.discard(ordinal)
            model.discard(ordinal)
        assert list(bucket) == sorted(model)
        assert all(bucket.blocks) and bucket.maxes == [b[-1] for b in bucket.blocks]
        assert all(len(b) <= 2 * bucket.load for b in bucket.blocks)
