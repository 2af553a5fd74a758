"""Placement decisions on real topologies: NVLink pairs, NUMA, bin-pack, spread, shares."""

from __future__ import annotations

import pytest

from computegroups import (
    ComputeGroupManager,
    InsufficientResourcesError,
    SimulatedComputeResourceProvider,
)
from computegroups.model import Constraints, Requirements
from computegroups.placement import Cluster, place
from computegroups.providers.simulated import nodes_from_spec
from tests.conftest import a6000_spec

BRIDGED = [[0, 1], [2, 3], [4, 5], [6, 7]]


async def test_four_pairs_land_on_the_four_nvlink_bridges(a6000: ComputeGroupManager) -> None:
    groups = [await a6000.allocate_compute_group("tp2", {"gpus": 2}) for _ in range(4)]
    assert sorted(sorted(g.resources["gpu_indices"]) for g in groups) == BRIDGED
    assert all(g.topology["bottleneck"] == "NV4" and g.topology["nvlink"] for g in groups)


async def test_single_gpu_takes_the_partner_of_a_used_gpu(a6000: ComputeGroupManager) -> None:
    first = await a6000.allocate_compute_group("tp1", {"gpus": 1})
    (used,) = first.resources["gpu_indices"]
    second = await a6000.allocate_compute_group("tp1", {"gpus": 1})
    assert second.resources["gpu_indices"] == [used ^ 1]  # its NVLink partner
    # Three pairs stay intact, so three NVLink pairs can still be had.
    pairs = [await a6000.allocate_compute_group("tp2", {"gpus": 2}, {"nvlink": True}) for _ in range(3)]
    assert all(p.topology["bottleneck"] == "NV4" for p in pairs)


async def test_singles_fill_used_pairs_before_breaking_intact_ones(a6000: ComputeGroupManager) -> None:
    # Break two pairs with one single each; two more singles must fill their partners.
    singles = [await a6000.allocate_compute_group("tp1", {"gpus": 1}) for _ in range(4)]
    used = sorted(i for g in singles for i in g.resources["gpu_indices"])
    intact = [p for p in BRIDGED if not set(p) & set(used)]
    assert len(intact) == 2


async def test_nvlink_refused_when_no_pair_is_intact_but_plain_pair_stays_on_one_numa(
    a6000: ComputeGroupManager,
) -> None:
    # Fill the node with singles, then free one GPU of each pair: no intact NVLink pair remains.
    singles = [await a6000.allocate_compute_group("tp1", {"gpus": 1}) for _ in range(8)]
    for g in singles:
        if g.resources["gpu_indices"][0] % 2:
            assert await a6000.deallocate_compute_group(g.id)
    free = (await a6000.list_compute_nodes())[0].resources["free"]["whole_gpus"]
    assert free == 4
    before = await a6000.get_allocation_summary()
    with pytest.raises(InsufficientResourcesError) as err:
        await a6000.allocate_compute_group("tp2", {"gpus": 2}, {"nvlink": True})
    assert "NVLink" in str(err.value)
    assert await a6000.get_allocation_summary() == before
    g = await a6000.allocate_compute_group("tp2", {"gpus": 2})
    assert len(g.topology["numa_nodes"]) == 1
    assert g.topology["bottleneck"] == "NODE"


async def test_same_numa_constraint(fleet: ComputeGroupManager) -> None:
    g = await fleet.allocate_compute_group("tp4", {"gpus": 4}, {"same_numa": True, "node_id": "dgx-0"})
    assert len(g.topology["numa_nodes"]) == 1
    g2 = await fleet.allocate_compute_group("tp4", {"gpus": 4}, {"same_numa": True, "node_id": "dgx-0"})
    assert set(g.resources["gpu_indices"]).isdisjoint(g2.resources["gpu_indices"])
    with pytest.raises(InsufficientResourcesError):
        await fleet.allocate_compute_group("tp4", {"gpus": 1}, {"node_id": "dgx-0"})


def _cluster(count: int = 3) -> Cluster:
    return Cluster(nodes_from_spec(a6000_spec(count)))


def _alloc(cluster: Cluster, req: dict[str, object], cons: dict[str, object] | None = None) -> str:
    from computegroups.model import AllocationState, GroupRecord

    d = place(cluster, Requirements.parse(req), Constraints.parse(cons))
    cluster.apply(GroupRecord("g", d.node_id, AllocationState.ALLOCATED, "c", d.devices, d.cpus_milli, d.memory_mib))
    return d.node_id


def test_binpack_fills_the_fullest_node_and_spread_the_emptiest() -> None:
    c = _cluster()
    assert _alloc(c, {"gpus": 2}) == "a6000-0"
    assert _alloc(c, {"gpus": 2}) == "a6000-0"  # bin-pack keeps filling it
    assert _alloc(c, {"gpus": 2}, {"strategy": "spread"}) == "a6000-1"
    assert _alloc(c, {"gpus": 2}, {"strategy": "spread"}) == "a6000-2"
    assert _alloc(c, {"gpus": 1}, {"strategy": "spread"}) in ("a6000-1", "a6000-2")


def test_shares_go_to_already_shared_gpus_first() -> None:
    c = _cluster(2)
    first = place(c, Requirements(gpus=0.5), Constraints())
    from computegroups.model import AllocationState, GroupRecord

    c.apply(GroupRecord("s1", first.node_id, AllocationState.ALLOCATED, "c", first.devices))
    second = place(c, Requirements(gpus=0.5), Constraints())
    assert (second.node_id, second.devices[0].index) == (first.node_id, first.devices[0].index)
    c.apply(GroupRecord("s2", second.node_id, AllocationState.ALLOCATED, "c", second.devices))
    third = place(c, Requirements(gpus=0.5), Constraints())
    assert third.devices[0].index != first.devices[0].index or third.node_id != first.node_id
    # The full GPU takes nothing more: shares never exceed 1.0.
    st = c.by_id[first.node_id]
    assert st.gpu_used[first.devices[0].index] == 1000


def test_share_memory_must_fit() -> None:
    c = _cluster(1)
    with pytest.raises(InsufficientResourcesError):
        place(c, Requirements(gpus=0.1, gpu_memory_mib=60000), Constraints())
    d = place(c, Requirements(gpus=0.1, gpu_memory_mib=40000), Constraints())
    assert d.devices[0].memory_mib == 40000


def test_model_memory_and_label_filters_explain_themselves() -> None:
    c = Cluster(
        nodes_from_spec(
            {
                "nodes": [
                    {"id": "h", "preset": "dgx-h100", "labels": {"zone": "a"}},
                    {"id": "p", "preset": "pcie-a6000-nvlink-pairs"},
                ]
            }
        )
    )
    assert place(c, Requirements(gpus=1, gpu_model="a6000"), Constraints()).node_id == "p"
    assert place(c, Requirements(gpus=1, gpu_memory_mib=80000), Constraints()).node_id == "h"
    assert place(c, Requirements(gpus=1), Constraints(labels={"zone": "a"})).node_id == "h"
    with pytest.raises(InsufficientResourcesError) as err:
        place(c, Requirements(gpus=1, gpu_model="B200"), Constraints())
    assert "is not b200" in str(err.value)
    assert sum(err.value.reasons.values()) == 2
    with pytest.raises(InsufficientResourcesError) as err:
        place(c, Requirements(gpus=9), Constraints())
    assert sum(err.value.reasons.values()) == 2


def test_cpu_only_requests_use_cpu_capacity() -> None:
    c = Cluster(nodes_from_spec({"nodes": [{"id": "cpu", "preset": "cpu-only"}]}))
    d = place(c, Requirements(cpus=60, memory_mib=1024), Constraints())
    assert d.node_id == "cpu" and d.devices == ()
    from computegroups.model import AllocationState, GroupRecord

    c.apply(GroupRecord("x", "cpu", AllocationState.ALLOCATED, "c", (), d.cpus_milli, d.memory_mib))
    with pytest.raises(InsufficientResourcesError) as err:
        place(c, Requirements(cpus=5), Constraints())
    assert "4 CPUs free, 5 requested" in str(err.value)


async def test_unhealthy_gpus_get_nothing_new() -> None:
    provider = SimulatedComputeResourceProvider.from_spec(a6000_spec())
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        provider.set_health("a6000", 0, False, "XID 79")
        events = await mgr.refresh_health()
        assert [e.kind for e in events] == ["device-unhealthy"]
        groups = [await mgr.allocate_compute_group("c", {"gpus": 1}) for _ in range(7)]
        assert 0 not in {g.resources["gpu_indices"][0] for g in groups}
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("c", {"gpus": 1})
        provider.set_health("a6000", 0, True)
        assert [e.kind for e in await mgr.refresh_health()] == ["device-healthy"]
        g = await mgr.allocate_compute_group("c", {"gpus": 1})
        assert g.resources["gpu_indices"] == [0]
