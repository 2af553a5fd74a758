"""The fragmentation-aware score: its arithmetic, the learned workload mix, and its place in bin-pack."""

from __future__ import annotations

import pytest

from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider
from computegroups.model import AllocationState, Constraints, GroupRecord, Requirements
from computegroups.placement import Cluster, place
from computegroups.placement.fragmentation import (
    CPU_STARVED_WEIGHT,
    FragmentationScore,
    Shape,
    WorkloadMix,
    enabled,
    node_fragmentation,
    set_enabled,
)
from computegroups.placement.plugins import EMPTY_CONTEXT, Pick
from computegroups.providers.simulated import nodes_from_spec

HALF = Shape(0, 500, 0, 0)
WHOLE2 = Shape(2, 0, 0, 0)
CPU8_GPU1 = Shape(1, 0, 8000, 0)
T4 = Shape(1, 0, 0, 0, ("t4",))


@pytest.mark.parametrize(
    ("free", "cpu_free", "shapes", "expected"),
    [
        # A share of 0.5 can use GPUs with >= 500 free; the 300 left on the first GPU is its fragment.
        ((300, 1000), 64000, ((HALF, 1.0),), 300.0),
        # Nothing fits: all free capacity is fragment.
        ((300, 400), 64000, ((HALF, 1.0),), 700.0),
        # Two whole GPUs: partly used GPUs are fragment while two whole ones are free...
        ((300, 1000, 1000), 64000, ((WHOLE2, 1.0),), 300.0),
        # ...and everything once fewer than two are.
        ((300, 1000), 64000, ((WHOLE2, 1.0),), 1300.0),
        # Too few CPUs left strands the GPUs.
        ((1000, 1000), 4000, ((CPU8_GPU1, 1.0),), 2000.0),
        # The wrong model strands them too; weights average the shapes.
        ((1000, 1000), 64000, ((T4, 0.5), (HALF, 0.5)), 1000.0),
        # A full node has no fragment.
        ((0, 0), 0, ((HALF, 1.0),), 0.0),
    ],
)
def test_node_fragmentation_table(
    free: tuple[int, ...], cpu_free: int, shapes: tuple[tuple[Shape, float], ...], expected: float
) -> None:
    assert node_fragmentation(free, cpu_free, 1 << 20, "nvidia a100", shapes) == pytest.approx(expected)


def test_cpu_starved_capacity_counts_gpus_the_free_cpus_cannot_feed() -> None:
    shapes = ((CPU8_GPU1, 1.0),)
    per_cpu = 1000 / 8000  # one GPU per 8 CPUs
    # 16 CPUs feed both free GPUs: nothing starved, and the shape fits.
    assert node_fragmentation((1000, 1000), 16000, 1 << 20, "", shapes, per_cpu) == 0.0
    # 12 CPUs feed one and a half: the shape still fits, half a GPU is starved.
    assert node_fragmentation((1000, 1000), 12000, 1 << 20, "", shapes, per_cpu) == pytest.approx(
        CPU_STARVED_WEIGHT * 500
    )
    # 4 CPUs: the shape cannot fit (all 2000 free is fragment) and 1500 are starved.
    assert node_fragmentation((1000, 1000), 4000, 1 << 20, "", shapes, per_cpu) == pytest.approx(
        2000 + CPU_STARVED_WEIGHT * 1500
    )


def test_mix_learns_the_cpus_per_gpu_of_its_gpu_shapes() -> None:
    mix = WorkloadMix()
    for _ in range(3):
        mix.observe(Requirements(gpus=1, cpus=8).stored)
    mix.observe(Requirements(gpus=0.5, cpus=2).stored)
    mix.observe(Requirements(cpus=32).stored)  # CPU-only requests do not count
    assert mix.gpu_per_cpu == pytest.approx((3 * 1000 + 500) / (3 * 8000 + 2000))
    assert WorkloadMix.of({Shape(0, 500, 0, 0): 1.0}).gpu_per_cpu == 0.0  # no CPUs requested: no starved term


def test_cpu_only_request_goes_where_cpus_are_plentiful_for_the_gpus_left() -> None:
    # Both nodes keep 7 free GPUs and enough CPUs for the next 1-GPU + 8-CPU worker whichever takes
    # the 8-CPU request, so the per-shape measure rates them alike and bin-pack takes the first.
    # On "lean" the 24 CPUs left would feed 3 of its 7 free GPUs; "rich" feeds them all.
    spec = {"nodes": [{"id": "lean", "gpus": 8, "cpus": 40}, {"id": "rich", "gpus": 8, "cpus": 128}]}
    cluster = Cluster(nodes_from_spec(spec))
    for n, node in enumerate(("lean", "rich")):
        d = place(cluster, Requirements(gpus=1, cpus=8), Constraints(node_id=node))
        cluster.apply(GroupRecord(f"g{n}", node, AllocationState.ALLOCATED, "c", d.devices, d.cpus_milli))
    shapes = {Shape(1, 0, 8000, 0): 1.0}
    demand = FragmentationScore(WorkloadMix.of(shapes))
    assert place(cluster, Requirements(cpus=8), Constraints(), demand=demand).node_id == "rich"
    lean, rich = cluster.nodes
    pick = Pick((), None, 0)
    assert demand.delta(lean, Requirements(cpus=8), pick) == pytest.approx(CPU_STARVED_WEIGHT * 1000)
    assert demand.delta(rich, Requirements(cpus=8), pick) == 0.0
    # Without the starved term (the per-shape measure only), the two are alike and bin-pack keeps the first.
    plain = [
        node_fragmentation((0,) + (1000,) * 7, st.cpu_free - 8000, 1 << 20, "", tuple(shapes.items()))
        for st in cluster.nodes
    ]
    assert plain == [0.0, 0.0]


def test_mix_keeps_the_most_common_shapes_normalised() -> None:
    mix = WorkloadMix(top=2)
    for _ in range(6):
        mix.observe(Requirements(gpus=1).stored)
    for _ in range(3):
        mix.observe(Requirements(gpus=0.5).stored)
    mix.observe(Requirements(gpus=2).stored)
    mix.observe(Requirements(cpus=4).stored)  # CPU-only requests are counted but not scored
    shapes = dict(mix.shapes)
    assert set(shapes) == {Shape(1, 0, 0, 0), Shape(0, 500, 0, 0)}
    assert sum(shapes.values()) == pytest.approx(1.0)
    assert shapes[Shape(1, 0, 0, 0)] == pytest.approx(6 / 9)


def test_whole_gpu_only_demand_does_not_engage_the_score() -> None:
    mix = WorkloadMix()
    for k in (1, 2, 4, 8):
        mix.observe(Requirements(gpus=k).stored)
        assert not mix.engaged
    mix.observe(Requirements(gpus=0.5).stored)
    assert mix.engaged


def test_score_is_50_when_nothing_changes_and_bounded() -> None:
    cluster = Cluster(nodes_from_spec({"nodes": [{"id": "n", "preset": "dgx-h100"}]}))
    mix = WorkloadMix.of({WHOLE2: 1.0})
    plugin = FragmentationScore(mix)
    node = cluster.nodes[0]
    req = Requirements(gpus=2)
    d = place(cluster, req, Constraints(), scores=(plugin,))
    pick = Pick(d.devices, None, sum(x.share_milli for x in d.devices))
    assert plugin.score(node, req, pick, EMPTY_CONTEXT) == pytest.approx(50.0)
    assert plugin.score(node, req, pick, EMPTY_CONTEXT) <= plugin.bound(node.free_count, 8, req)


async def test_cpu_only_request_avoids_stranding_a_nodes_gpus() -> None:
    # Node "small" has few CPUs: taking 8 of them would leave its 7 free GPUs unusable for
    # the 1-GPU + 8-CPU workers this cluster has been asked for. Bin-pack alone rates both nodes alike.
    spec = {
        "nodes": [
            {"id": "small", "preset": "dgx-h100", "cpus": 16},
            {"id": "big", "preset": "dgx-h100", "cpus": 128},
        ]
    }
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(spec), ":memory:") as mgr:
        for node in ("small", "big"):
            await mgr.allocate_compute_group("worker", {"gpus": 1, "cpus": 8}, {"node_id": node})
        g = await mgr.allocate_compute_group("etl", {"cpus": 8})
        assert g.node_id == "big"


def _half_gpu_apart() -> Cluster:
    """Node a: seven GPUs taken and half of the eighth; node b: seven taken, the eighth free."""
    spec = {"nodes": [{"id": "a", "gpus": 8, "cpus": 64}, {"id": "b", "gpus": 8, "cpus": 64}]}
    cluster = Cluster(nodes_from_spec(spec))
    for n, (node, req) in enumerate(
        [("a", Requirements(gpus=7)), ("a", Requirements(gpus=0.5)), ("b", Requirements(gpus=7))]
    ):
        d = place(cluster, req, Constraints(node_id=node))
        cluster.apply(GroupRecord(f"g{n}", node, AllocationState.ALLOCATED, "c", d.devices))
    return cluster


def test_share_prefers_the_node_it_does_not_fragment() -> None:
    # Node a: seven GPUs taken and half of the eighth; node b: seven taken, the eighth free.
    # A 0.3 share on a would leave 0.2 of a GPU that this workload's 0.5 shares cannot use;
    # on b it leaves 0.7, which they can. Bin-pack alone prefers the fuller node a.
    cluster = _half_gpu_apart()
    demand = FragmentationScore(WorkloadMix())
    for _ in range(20):
        demand.mix.observe(Requirements(gpus=0.5).stored)
    assert place(cluster, Requirements(gpus=0.3), Constraints(), demand=demand).node_id == "b"
    assert place(cluster, Requirements(gpus=0.3), Constraints()).node_id == "a"  # no workload known: bin-pack
    # Without the fragmentation score, bin-pack takes the fuller node.
    from computegroups.placement.plugins import BinPackScore, TopologyScore

    assert (
        place(cluster, Requirements(gpus=0.3), Constraints(), scores=(BinPackScore(), TopologyScore())).node_id == "a"
    )


def test_fragmentation_scoring_can_be_switched_off() -> None:
    cluster = _half_gpu_apart()
    demand = FragmentationScore(WorkloadMix.of({Shape(0, 500, 0, 0): 1.0}))
    assert enabled() and place(cluster, Requirements(gpus=0.3), Constraints(), demand=demand).node_id == "b"
    set_enabled(False)
    try:
        assert place(cluster, Requirements(gpus=0.3), Constraints(), demand=demand).node_id == "a"
    finally:
        set_enabled(True)
    assert enabled()
