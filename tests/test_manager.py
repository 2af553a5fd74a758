"""The manager's lifecycle: create, allocate, drain, release, delete, idempotency, summary, views."""

from __future__ import annotations

import pytest

from computegroups import (
    ComputeGroupManager,
    ConflictError,
    InsufficientResourcesError,
    LocalComputeResourceProvider,
    SimulatedComputeResourceProvider,
)
from computegroups.providers.nvml import NvmlUnavailable


async def test_env_isolates_to_gpu_uuids(fleet: ComputeGroupManager) -> None:
    g = await fleet.allocate_compute_group("decode", {"gpus": 2}, {"node_id": "dgx-1"})
    assert g.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert g.env["CUDA_VISIBLE_DEVICES"].split(",") == g.resources["gpu_uuids"]
    assert all(u.startswith("GPU-") for u in g.resources["gpu_uuids"])
    assert g.resources["node_id"] == g.node_id == "dgx-1"
    assert g.resources["gpus"] == 2 and len(g.resources["gpu_indices"]) == 2
    assert g.component == "decode" and g.allocation_state == "allocated"


async def test_cpu_and_memory_are_reported_where_requested(fleet: ComputeGroupManager) -> None:
    g = await fleet.allocate_compute_group("router", {"cpus": 4, "memory_mib": 2048})
    assert g.resources["cpus"] == 4 and g.resources["memory_mib"] == 2048 and g.resources["gpus"] == 0
    assert g.env["CUDA_VISIBLE_DEVICES"] == ""


async def test_request_id_makes_allocation_idempotent(fleet: ComputeGroupManager) -> None:
    a = await fleet.allocate_compute_group("p", {"gpus": 4}, {"request_id": "scale-7"})
    b = await fleet.allocate_compute_group("p", {"gpus": 4}, {"request_id": "scale-7"})
    assert a.id == b.id
    assert (await fleet.get_allocation_summary())["components"] == {"p": 4}


async def test_drain_blocks_new_owners_of_carved_groups(a6000: ComputeGroupManager) -> None:
    carved = [await a6000.create_compute_group({"gpus": 2}) for _ in range(4)]
    assert all(c.allocation_state == "free" and c.component is None for c in carved)
    assert await a6000.drain_compute_group(carved[0].id) is True
    assert await a6000.drain_compute_group(carved[0].id) is False
    got = [await a6000.allocate_compute_group("w", {"gpus": 2}) for _ in range(3)]
    assert {g.id for g in got} == {c.id for c in carved[1:]}  # pre-carved groups handed out
    with pytest.raises(InsufficientResourcesError):
        await a6000.allocate_compute_group("w", {"gpus": 2})  # the drained one is not
    # An allocated group cannot be deleted; a released carved group returns to free and can be.
    with pytest.raises(ConflictError):
        await a6000.delete_compute_group(got[0].id)
    assert await a6000.deallocate_compute_group(got[0].id) is True
    assert (await a6000.get_compute_group(got[0].id)).allocation_state == "free"
    assert await a6000.delete_compute_group(got[0].id) is True
    assert await a6000.delete_compute_group(carved[0].id) is True
    again = await a6000.allocate_compute_group("w", {"gpus": 2})
    assert again.id not in {c.id for c in carved}


async def test_drained_allocated_group_keeps_its_owner_until_release(fleet: ComputeGroupManager) -> None:
    g = await fleet.allocate_compute_group("d", {"gpus": 1})
    assert await fleet.drain_compute_group(g.id)
    d = await fleet.get_compute_group(g.id)
    assert d.allocation_state == "draining" and d.component == "d"
    assert [x.id for x in await fleet.get_component_allocations("d")] == [g.id]
    assert await fleet.deallocate_compute_group(g.id)
    assert (await fleet.get_compute_group(g.id)).allocation_state == "released"
    with pytest.raises(ConflictError):
        await fleet.drain_compute_group(g.id)
    assert await fleet.get_component_allocations("d") == []


async def test_summary_and_nodes(fleet: ComputeGroupManager) -> None:
    s0 = await fleet.get_allocation_summary()
    assert (s0["total_gpus"], s0["allocated_gpus"], s0["free_gpus"]) == (32, 0, 32)
    await fleet.allocate_compute_group("prefill", {"gpus": 8})
    await fleet.allocate_compute_group("decode", {"gpus": 2})
    await fleet.allocate_compute_group("embed", {"gpus": 0.5})
    await fleet.create_compute_group({"gpus": 1})
    s = await fleet.get_allocation_summary()
    assert s["allocated_gpus"] == 10.5 and s["reserved_gpus"] == 1 and s["free_gpus"] == 20.5
    assert s["components"] == {"decode": 2, "embed": 0.5, "prefill": 8}
    nodes = {n.id: n for n in await fleet.list_compute_nodes()}
    assert set(nodes) == {"dgx-0", "dgx-1", "a6000-0", "a6000-1", "cpu"}
    assert sum(len(n.compute_groups) for n in nodes.values()) == 4
    assert nodes["cpu"].resources["gpus"] == 0 and nodes["cpu"].resources["cpus"] == 64
    full = [n for n in nodes.values() if n.utilization.get("gpus_allocated") == 1.0]
    assert len(full) == 1
    listed = await fleet.list_compute_groups({"component": "decode"})
    assert [g.resources["gpus"] for g in listed] == [2]


async def test_two_managers_on_one_memory_store_never_share_a_gpu() -> None:
    from computegroups import MemoryStateStore

    store = MemoryStateStore()
    spec = {"nodes": [{"id": "n", "preset": "dgx-h100"}]}
    async with (
        ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(spec), store) as a,
        ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(spec), store) as b,
    ):
        ga = [await a.allocate_compute_group("a", {"gpus": 1}) for _ in range(4)]
        gb = [await b.allocate_compute_group("b", {"gpus": 1}) for _ in range(4)]
        used = [i for g in ga + gb for i in g.resources["gpu_indices"]]
        assert sorted(used) == list(range(8))
        with pytest.raises(InsufficientResourcesError):
            await a.allocate_compute_group("a", {"gpus": 1})


async def test_local_provider_without_driver_is_one_cpu_node(tmp_path: object) -> None:
    def no_nvml() -> object:
        raise NvmlUnavailable("NVML Shared Library Not Found")

    provider = LocalComputeResourceProvider(node_id="here", nvml=no_nvml)  # type: ignore[arg-type]
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        (node,) = await mgr.list_compute_nodes()
        assert node.id == "here" and node.resources["gpus"] == 0
        assert node.resources["cpus"] >= 1 and node.resources["memory_mib"] > 0
        assert any("no NVIDIA GPU found" in n for n in mgr.inventory.notes)
        g = await mgr.allocate_compute_group("tool", {"cpus": 1})
        assert g.node_id == "here"
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("tool", {"gpus": 1})


async def test_local_provider_on_this_machine_comes_up() -> None:
    async with ComputeGroupManager(LocalComputeResourceProvider(), ":memory:") as mgr:
        (node,) = await mgr.list_compute_nodes()
        if node.resources["gpus"] == 0:
            assert mgr.inventory.notes  # it says why no GPU was found


async def test_tombstones_are_pruned() -> None:
    provider = SimulatedComputeResourceProvider.from_spec({"nodes": [{"id": "n", "preset": "dgx-h100"}]})
    async with ComputeGroupManager(provider, ":memory:", tombstone_limit=5) as mgr:
        for _ in range(20):
            g = await mgr.allocate_compute_group("c", {"gpus": 1})
            await mgr.deallocate_compute_group(g.id)
        released = await mgr.list_compute_groups({"state": "released"})
        assert 1 <= len(released) <= 6


async def test_manager_must_be_entered() -> None:
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(None), ":memory:")
    with pytest.raises(ConflictError):
        await mgr.list_compute_nodes()


async def test_event_stream_sees_allocations(fleet: ComputeGroupManager) -> None:
    import asyncio

    stream = fleet.events()
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    g = await fleet.allocate_compute_group("c", {"gpus": 1})
    event = await asyncio.wait_for(first, 1)
    assert (event.kind, event.group_id) == ("allocated", g.id)
    await stream.aclose()
