"""Property tests: random sequences of operations (and restarts) against the invariants.

Invariants checked after every step:
  * no device is allocated beyond its capacity, and a whole GPU has at most one group;
  * the manager's occupancy indexes equal occupancy recomputed from the records;
  * owned groups have a component, free pre-carved groups have none, draining groups get no new owner;
  * totals add up: allocated + reserved + free == total GPUs;
  * a restart on the same store sees exactly the same groups (SQLite runs).
"""

from __future__ import annotations

import asyncio
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from computegroups import (
    ComputeGroupManager,
    ComputeGroupsError,
    ConflictError,
    InsufficientResourcesError,
    SimulatedComputeResourceProvider,
)
from computegroups.model import MILLI, AllocationState
from computegroups.placement.cluster import Cluster

SPEC = {
    "nodes": [
        {"id": "pairs", "preset": "pcie-a6000-nvlink-pairs", "cpus": 16, "memory_mib": 65536},
        {"id": "dgx", "preset": "dgx-h100", "cpus": 16, "memory_mib": 65536},
        {"id": "cpu", "preset": "cpu-only", "cpus": 8, "memory_mib": 32768},
    ]
}

sizes = st.sampled_from([1, 1, 2, 2, 4, 8, 0.25, 0.5, 0.75, 0.125])
constraints = st.fixed_dictionaries(
    {},
    optional={
        "nvlink": st.booleans(),
        "same_numa": st.booleans(),
        "strategy": st.sampled_from(["binpack", "spread"]),
        "node_id": st.sampled_from(["pairs", "dgx", "cpu"]),
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
        self.mgr = self._open()
        self.owned: dict[str, str] = {}  # group id -> component, as the test expects it

    def _open(self) -> ComputeGroupManager:
        mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), self.state, tombstone_limit=20)
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
        try:
            g = self.run(self.mgr.allocate_compute_group(component, {"gpus": gpus, "cpus": cpus}, cons))
        except InsufficientResourcesError:
            return "none"
        assert g.component == component and g.allocation_state == "allocated"
        if cons.get("nvlink") and gpus >= 2:
            assert g.topology["nvlink"]
        if cons.get("same_numa"):
            assert len(g.topology["numa_nodes"]) <= 1
        assert g.id not in self.owned
        self.owned[g.id] = component
        return g.id

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
        was_owned = gid in self.owned
        assert self.run(self.mgr.deallocate_compute_group(gid)) is was_owned
        self.owned.pop(gid, None)
        assert self.run(self.mgr.deallocate_compute_group(gid)) is False  # idempotent

    @rule(gid=groups)
    def drain(self, gid: str) -> None:
        if gid == "none":
            return
        try:
            self.run(self.mgr.drain_compute_group(gid))
        except ConflictError:
            assert self.run(self.mgr.get_compute_group(gid)).allocation_state == "released"
            return
        g = self.run(self.mgr.get_compute_group(gid))
        assert g.allocation_state == "draining"
        assert g.component == self.owned.get(gid)

    @rule(gid=consumes(groups))
    def delete(self, gid: str) -> None:
        if gid == "none":
            return
        try:
            self.run(self.mgr.delete_compute_group(gid))
        except ConflictError:
            assert gid in self.owned
            return
        except ComputeGroupsError:
            raise
        assert gid not in self.owned

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
        records = [r for r in mgr._records.values() if r.holds_capacity]
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
        for a, b in zip(fresh.nodes, mgr._cluster.nodes, strict=True):
            assert (a.gpu_used, a.gpu_mem_used, a.cpu_used, a.mem_used, a.free_mask) == (
                b.gpu_used,
                b.gpu_mem_used,
                b.cpu_used,
                b.mem_used,
                b.free_mask,
            )
        for free in range(fresh.max_gpus + 1):
            assert fresh.bucket(free) == mgr._cluster.bucket(free)
        assert fresh.partial() == mgr._cluster.partial()
        owned = {r.id: r.component for r in records if r.component is not None}
        assert owned == self.owned

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
