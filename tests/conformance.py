"""One conformance suite, written once, run against every provider and state store.

Each ``check_*`` coroutine takes ``open_manager``: a callable returning a fresh
``async with``-able :class:`ComputeGroupManager` over the *same* nodes and the *same*
shared state each time it is called (two calls = two managers, as two processes
would have), and the ids of two 8-GPU nodes of the same shape on every backend.
``decision_transcript`` returns the decisions (node, GPU indices) of a fixed request
sequence; backends given nodes of the same shape must return equal transcripts.

Run by ``tests/test_conformance_simulated.py`` (simulated provider + SQLite, and the
memory store) and ``tests/k8s/test_conformance_kubernetes.py`` (the Kubernetes provider
and custom-resource store against a real API server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from computegroups import ComputeGroupManager, GpuSpec, InsufficientResourcesError, NodeSpec, NotFoundError
from computegroups.errors import ConflictError
from computegroups.model import GroupRecord
from computegroups.state.base import RevisionConflict, StateStore
from computegroups.topology import Topology

OpenManager = Callable[[], AbstractAsyncContextManager[ComputeGroupManager]]
GPU_MODEL = "NVIDIA H100 80GB HBM3"
GPU_MEMORY = 81559


def pcie_pairs_topology(n: int = 8) -> Topology:
    """The topology the Kubernetes provider derives from DRA slices whose GPUs share a PCIe root in pairs."""
    return Topology([["X" if i == j else ("PXB" if i // 2 == j // 2 else "SYS") for j in range(n)] for i in range(n)])


def node_specs(
    names: Sequence[str], shape: str = "uniform", uuid: Callable[[str, int], str] | None = None
) -> list[NodeSpec]:
    """Nodes of the suite's shape: 8 GPUs; ``uniform`` (no topology known) or ``pcie-pairs``."""
    topo = pcie_pairs_topology() if shape == "pcie-pairs" else None
    return [
        NodeSpec(
            id=name,
            gpus=tuple(
                GpuSpec(i, uuid(name, i) if uuid else f"k8s-{name}-gpu{i}", GPU_MODEL, GPU_MEMORY) for i in range(8)
            ),
            topology=topo,
            cpus_milli=128_000,
            memory_mib=2 * 1024 * 1024,
        )
        for name in names
    ]


def _taken(groups: Sequence[Any]) -> list[tuple[str, int]]:
    return [(g.node_id, i) for g in groups for i in g.resources["gpu_indices"]]


async def check_lifecycle(open_manager: OpenManager, nodes: Sequence[str]) -> None:
    async with open_manager() as mgr:
        g = await mgr.allocate_compute_group("decode", {"gpus": 2})
        assert g.allocation_state == "allocated" and g.component == "decode"
        assert g.node_id in nodes and len(g.resources["gpu_indices"]) == 2
        assert (await mgr.get_compute_group(g.id)).id == g.id
        assert [x.id for x in await mgr.get_component_allocations("decode")] == [g.id]
        assert await mgr.deallocate_compute_group(g.id) is True
        assert await mgr.deallocate_compute_group(g.id) is False
        with pytest.raises(NotFoundError):
            await mgr.get_compute_group("cg-does-not-exist")
        a = await mgr.allocate_compute_group("prefill", {"gpus": 1}, {"request_id": "r-1"})
        b = await mgr.allocate_compute_group("prefill", {"gpus": 1}, {"request_id": "r-1"})
        assert a.id == b.id
        with pytest.raises(ConflictError):
            await mgr.allocate_compute_group("other", {"gpus": 1}, {"request_id": "r-1"})
        await mgr.deallocate_compute_group(a.id)
        summary = await mgr.get_allocation_summary()
        assert summary["total_gpus"] == 16 and summary["allocated_gpus"] == 0


async def check_capacity(open_manager: OpenManager, nodes: Sequence[str]) -> None:
    async with open_manager() as mgr:
        groups = [await mgr.allocate_compute_group(f"c{n}", {"gpus": 4}) for n in range(4)]
        taken = _taken(groups)
        assert len(taken) == len(set(taken)) == 16
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("late", {"gpus": 1})
        await mgr.deallocate_compute_group(groups[1].id)
        again = await mgr.allocate_compute_group("late", {"gpus": 4})
        assert sorted(_taken([again])) == sorted(_taken([groups[1]]))
        for g in (groups[0], groups[2], groups[3], again):
            await mgr.deallocate_compute_group(g.id)


async def check_drain_and_carve(open_manager: OpenManager, nodes: Sequence[str]) -> None:
    async with open_manager() as mgr:
        carved = await mgr.create_compute_group({"gpus": 2}, node_id=nodes[1])
        assert carved.allocation_state == "free" and carved.node_id == nodes[1]
        got = await mgr.allocate_compute_group("x", {"gpus": 2})
        assert got.id == carved.id  # a pre-carved free group is handed out first
        assert await mgr.drain_compute_group(got.id) is True
        assert (await mgr.get_compute_group(got.id)).allocation_state == "draining"
        await mgr.deallocate_compute_group(got.id)
        assert (await mgr.get_compute_group(got.id)).allocation_state == "draining"  # carved, draining: not free
        other = await mgr.allocate_compute_group("y", {"gpus": 2}, {"node_id": nodes[1]})
        assert other.id != carved.id and not set(_taken([other])) & set(_taken([carved]))
        await mgr.deallocate_compute_group(other.id)
        assert await mgr.delete_compute_group(carved.id) is True


async def check_persistence(open_manager: OpenManager, nodes: Sequence[str]) -> None:
    async with open_manager() as first:
        g = await first.allocate_compute_group("keep", {"gpus": 3})
    async with open_manager() as second:
        again = await second.get_compute_group(g.id)
        assert again.record == g.record
        assert (await second.get_allocation_summary())["allocated_gpus"] == 3
        await second.deallocate_compute_group(g.id)


async def check_two_managers(open_manager: OpenManager, nodes: Sequence[str]) -> None:
    """Two managers on one state, racing: every GPU handed out once, none twice."""
    async with open_manager() as a, open_manager() as b:

        async def grab(mgr: ComputeGroupManager, who: str) -> list[Any]:
            out = []
            for n in range(8):
                try:
                    out.append(await mgr.allocate_compute_group(f"{who}{n}", {"gpus": 1}))
                except InsufficientResourcesError:
                    break
            return out

        got_a, got_b = await asyncio.gather(grab(a, "a"), grab(b, "b"))
        taken = _taken(got_a + got_b)
        assert len(taken) == len(set(taken)) == 16
        for g in got_a:
            await a.deallocate_compute_group(g.id)
        for g in got_b:
            await b.deallocate_compute_group(g.id)


async def check_cordon(open_manager: OpenManager, nodes: Sequence[str]) -> None:
    """A node cordoned or drained by one manager takes nothing new in another; its groups keep their owners."""
    async with open_manager() as a, open_manager() as b:
        held = await a.allocate_compute_group("decode", {"gpus": 2}, {"node_id": nodes[0]})
        assert await a.cordon_node(nodes[0], "maintenance") is True
        assert await b.cordon_node(nodes[0]) is False  # cordoned already, with its reason
        with pytest.raises(InsufficientResourcesError):
            await b.allocate_compute_group("x", {"gpus": 1}, {"node_id": nodes[0]})
        other = await b.allocate_compute_group("x", {"gpus": 1})
        assert other.node_id == nodes[1]  # binpack would have filled the first node
        assert [g.id for g in await b.drain_node(nodes[0])] == [held.id]
        assert (await a.get_compute_group(held.id)).allocation_state == "draining"
        assert await a.uncordon_node(nodes[0]) is True
        again = await b.allocate_compute_group("y", {"gpus": 1}, {"node_id": nodes[0]})
        for g in (held, other, again):
            await a.deallocate_compute_group(g.id)


async def decision_transcript(
    open_manager: OpenManager, nodes: Sequence[str]
) -> list[tuple[str, int, tuple[int, ...]]]:
    """A fixed sequence; returns (action, node position, GPU indices) per step."""
    out: list[tuple[str, int, tuple[int, ...]]] = []
    async with open_manager() as mgr:
        held = []
        for n, (gpus, cons) in enumerate(
            [(1, {}), (2, {}), (4, {}), (2, {"strategy": "spread"}), (1, {}), (3, {"strategy": "spread"}), (2, {})]
        ):
            g = await mgr.allocate_compute_group(f"t{n}", {"gpus": gpus}, cons)
            held.append(g)
            out.append(("allocate", list(nodes).index(g.node_id), tuple(g.resources["gpu_indices"])))
        await mgr.deallocate_compute_group(held[1].id)
        await mgr.deallocate_compute_group(held[4].id)
        for n, gpus in enumerate((2, 1, 3)):
            try:
                g = await mgr.allocate_compute_group(f"u{n}", {"gpus": gpus})
                held.append(g)
                out.append(("allocate", list(nodes).index(g.node_id), tuple(g.resources["gpu_indices"])))
            except InsufficientResourcesError:
                out.append(("full", -1, ()))
        for g in held:
            await mgr.deallocate_compute_group(g.id)
    return out


MANAGER_CHECKS = (
    check_lifecycle,
    check_capacity,
    check_drain_and_carve,
    check_persistence,
    check_two_managers,
    check_cordon,
)


# -- the state store contract, on the store alone ---------------------------------------
def _record(gid: str, node: str = "n0", index: int = 0) -> GroupRecord:
    from computegroups.model import AllocationState, DeviceShare

    return GroupRecord(gid, node, AllocationState.ALLOCATED, "c", (DeviceShare(index, f"u{index}", 1000, 80),))


async def check_store(open_store: Callable[[], StateStore]) -> None:
    """commit/changes_since/RevisionConflict semantics, with two handles on one store."""
    a, b = open_store(), open_store()
    await a.open()
    await b.open()
    try:
        start = await a.changes_since(-1)
        assert start.full
        rev = start.revision
        r1 = await a.commit(rev, [_record("g1")])
        assert r1 > rev
        with pytest.raises(RevisionConflict):
            await b.commit(rev, [_record("g2")])  # b decided against an old revision: nothing written
        seen = await b.changes_since(rev)
        assert seen.revision == r1 and [r.id for r in seen.upserts] == ["g1"]
        r2 = await b.commit(r1, [_record("g2", index=1)], ["g1"])
        inc = await a.changes_since(r1)
        assert inc.revision == r2 and [r.id for r in inc.upserts] == ["g2"] and list(inc.deletes) == ["g1"]
        assert (await a.changes_since(r2)).upserts == ()
        full = await a.changes_since(-1)
        assert full.full and sorted(r.id for r in full.upserts) == ["g2"]
        await a.close()
        await a.close()  # idempotent
    finally:
        await a.close()
        await b.close()
