"""Reservations, pools and quotas, priority and preemption, affinity, multi-node gang groups."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from computegroups import (
    ComputeGroupManager,
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
    SimulatedComputeResourceProvider,
)
from computegroups.errors import PreemptionPendingError, QuotaExceededError

REPO = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def spec(*nodes: dict[str, Any]) -> dict[str, Any]:
    return {"nodes": list(nodes)}


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def two_dgx(clock: Clock) -> AsyncIterator[ComputeGroupManager]:
    provider = SimulatedComputeResourceProvider.from_spec(spec({"id": "dgx", "count": 2, "preset": "dgx-h100"}))
    async with ComputeGroupManager(provider, ":memory:", clock=clock) as mgr:
        yield mgr


# -- reservations -----------------------------------------------------------------
async def test_reservation_holds_capacity_for_its_component(two_dgx: ComputeGroupManager) -> None:
    r = await two_dgx.reserve_compute_group("decode", {"gpus": 8}, ttl_seconds=60)
    assert r.allocation_state == "reserved" and r.component == "decode"
    await two_dgx.allocate_compute_group("other", {"gpus": 8})
    with pytest.raises(InsufficientResourcesError):
        await two_dgx.allocate_compute_group("other", {"gpus": 1})  # the reserved node is not free
    s = await two_dgx.get_allocation_summary()
    assert (s["allocated_gpus"], s["reserved_gpus"], s["free_gpus"]) == (8, 8, 0)
    assert s["reservations"] == {"decode": 8} and s["components"] == {"other": 8}
    g = await two_dgx.allocate_compute_group("decode", {"gpus": 8})  # claims its reservation
    assert g.id == r.id and g.allocation_state == "allocated"
    s = await two_dgx.get_allocation_summary()
    assert (s["allocated_gpus"], s["reserved_gpus"], s["reservations"]) == (16, 0, {})


async def test_reservation_claimed_by_id_by_its_holder(two_dgx: ComputeGroupManager) -> None:
    r = await two_dgx.reserve_compute_group("planner", {"gpus": 4}, ttl_seconds=60)
    g = await two_dgx.allocate_compute_group("decode-7", {"gpus": 4}, {"reservation_id": r.id})
    assert (g.id, g.component) == (r.id, "decode-7")
    with pytest.raises(ConflictError):
        await two_dgx.allocate_compute_group("decode-8", {"gpus": 4}, {"reservation_id": r.id})
    with pytest.raises(NotFoundError):
        await two_dgx.allocate_compute_group("decode-8", {"gpus": 4}, {"reservation_id": "cg-none"})
    r2 = await two_dgx.reserve_compute_group("planner", {"gpus": 2}, ttl_seconds=60)
    with pytest.raises(ConflictError, match=r"holds 2 whole GPU\(s\), fewer than 4"):
        await two_dgx.allocate_compute_group("decode-9", {"gpus": 4}, {"reservation_id": r2.id})


async def test_reservation_expires_at_its_deadline(two_dgx: ComputeGroupManager, clock: Clock) -> None:
    r = await two_dgx.reserve_compute_group("decode", {"gpus": 8}, ttl_seconds=30)
    await two_dgx.reserve_compute_group("decode", {"gpus": 8}, ttl_seconds=30)
    with pytest.raises(InsufficientResourcesError):
        await two_dgx.allocate_compute_group("other", {"gpus": 8})
    clock.now += 31
    g = await two_dgx.allocate_compute_group("other", {"gpus": 8})  # the decision expired them first
    assert (await two_dgx.get_compute_group(r.id)).allocation_state == "released"
    assert g.allocation_state == "allocated"
    with pytest.raises(ConflictError, match="expired"):
        await two_dgx.allocate_compute_group("decode", {"gpus": 8}, {"reservation_id": r.id})
    assert any(e.kind == "reservation-expired" for e in two_dgx.recent_events)


@pytest.mark.parametrize("ttl", [0, -1, float("inf"), "60", True])
async def test_bad_ttl(two_dgx: ComputeGroupManager, ttl: Any) -> None:
    with pytest.raises(InvalidRequestError, match="ttl_seconds"):
        await two_dgx.reserve_compute_group("decode", {"gpus": 1}, ttl_seconds=ttl)


@pytest.mark.slow
async def test_reservation_of_a_killed_process_expires(tmp_path: Path) -> None:
    state = tmp_path / "s.db"
    p = subprocess.Popen(
        [sys.executable, "-m", "tests._reserve_worker", str(state), "1.5"], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout is not None
    rid = p.stdout.readline().strip()
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    p.stdout.close()
    provider = SimulatedComputeResourceProvider.from_spec({"nodes": [{"id": "n", "preset": "dgx-h100"}]})
    async with ComputeGroupManager(provider, state) as mgr:
        assert (await mgr.get_compute_group(rid)).allocation_state == "reserved"
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("other", {"gpus": 1})
        time.sleep(1.6)
        g = await mgr.allocate_compute_group("other", {"gpus": 8})
        assert g.allocation_state == "allocated"
        assert (await mgr.get_compute_group(rid)).allocation_state == "released"


# -- pools and quotas ------------------------------------------------------------------
POOLS = [
    {
        "name": "serving",
        "selector": {"tier": "serving"},
        "priority": 5,
        "quotas": {"components": {"decode": {"max_gpus": 4}}, "tenants": {"team-a": {"max_share": 0.25}}},
    },
    {"name": "batch", "nodes": ["b-0"]},
]


@pytest.fixture
async def pooled() -> AsyncIterator[ComputeGroupManager]:
    provider = SimulatedComputeResourceProvider.from_spec(
        spec(
            {"id": "s", "count": 2, "preset": "dgx-h100", "labels": {"tier": "serving"}},
            {"id": "b", "count": 2, "preset": "dgx-h100"},
        )
    )
    async with ComputeGroupManager(provider, ":memory:", pools=POOLS) as mgr:
        yield mgr


async def test_pool_places_only_on_its_nodes(pooled: ComputeGroupManager) -> None:
    g = await pooled.allocate_compute_group("x", {"gpus": 8, "pool": "batch"})
    assert g.node_id == "b-0"
    with pytest.raises(InsufficientResourcesError, match="not in pool batch"):
        await pooled.allocate_compute_group("x", {"gpus": 1}, {"pool": "batch"})
    g2 = await pooled.allocate_compute_group("y", {"gpus": 2}, {"pool": "serving"})
    assert g2.node_id.startswith("s-")
    with pytest.raises(InvalidRequestError, match=r"constraints\.pool"):
        await pooled.allocate_compute_group("y", {"gpus": 1}, {"pool": "nope"})


async def test_quota_refuses_the_request_that_would_exceed_it(pooled: ComputeGroupManager) -> None:
    await pooled.allocate_compute_group("decode", {"gpus": 2}, {"pool": "serving"})
    await pooled.allocate_compute_group("decode", {"gpus": 2}, {"pool": "serving"})
    before = await pooled.get_allocation_summary()
    with pytest.raises(QuotaExceededError, match="quota of 4"):
        await pooled.allocate_compute_group("decode", {"gpus": 1}, {"pool": "serving"})
    assert await pooled.get_allocation_summary() == before
    # Outside the pool the component is not limited by it.
    await pooled.allocate_compute_group("decode", {"gpus": 1}, {"node_id": "b-1"})
    # Tenant share: 25% of 16 serving GPUs = 4.
    await pooled.allocate_compute_group("t1", {"gpus": 4}, {"pool": "serving", "tenant": "team-a"})
    with pytest.raises(QuotaExceededError, match="tenant team-a"):
        await pooled.allocate_compute_group("t2", {"gpus": 0.5}, {"pool": "serving", "tenant": "team-a"})
    s = (await pooled.get_allocation_summary())["pools"]["serving"]
    assert s["components"]["decode"] == 4 and s["tenants"] == {"team-a": 4} and s["total_gpus"] == 16
    assert s["priority"] == 5


# -- priority and preemption --------------------------------------------------------
@pytest.fixture
async def one_dgx() -> AsyncIterator[ComputeGroupManager]:
    provider = SimulatedComputeResourceProvider.from_spec(spec({"id": "n", "preset": "dgx-h100"}))
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        yield mgr


async def test_preemption_takes_the_fewest_lowest_priority_victims(one_dgx: ComputeGroupManager) -> None:
    keep = await one_dgx.allocate_compute_group("critical", {"gpus": 2})  # not preemptible
    low = [
        await one_dgx.allocate_compute_group(f"low{i}", {"gpus": 1}, {"priority": 1, "preemptible": True})
        for i in range(2)
    ]
    mid = await one_dgx.allocate_compute_group("mid", {"gpus": 2}, {"priority": 3, "preemptible": True})
    big = await one_dgx.allocate_compute_group("big", {"gpus": 2}, {"priority": 2, "preemptible": True})
    with pytest.raises(InsufficientResourcesError):
        await one_dgx.allocate_compute_group("new", {"gpus": 2})  # priority 0 preempts nothing
    with pytest.raises(PreemptionPendingError) as info:
        await one_dgx.allocate_compute_group("urgent", {"gpus": 2}, {"priority": 10, "request_id": "u1"})
    # One victim suffices (a 2-GPU group), and of those the lowest priority: "big" (2), not "mid" (3).
    assert info.value.victims == [big.id]
    victim = await one_dgx.get_compute_group(big.id)
    assert victim.allocation_state == "draining" and victim.component == "big"  # drained, not yanked
    assert (await one_dgx.get_compute_group(keep.id)).allocation_state == "allocated"
    assert [(await one_dgx.get_compute_group(g.id)).allocation_state for g in [*low, mid]] == ["allocated"] * 3
    # Nobody of lower priority can take the GPUs promised to the preemptor.
    with pytest.raises(PreemptionPendingError):
        await one_dgx.allocate_compute_group("urgent", {"gpus": 2}, {"priority": 10, "request_id": "u1"})
    assert await one_dgx.deallocate_compute_group(big.id)
    got = await one_dgx.allocate_compute_group("urgent", {"gpus": 2}, {"priority": 10, "request_id": "u1"})
    assert got.allocation_state == "allocated" and got.id == info.value.group_id
    assert set(got.resources["gpu_indices"]) == set(victim.resources["gpu_indices"])
    kinds = [e.kind for e in one_dgx.recent_events]
    assert "preempted" in kinds


async def test_preemption_is_all_or_nothing(one_dgx: ComputeGroupManager) -> None:
    await one_dgx.allocate_compute_group("pinned", {"gpus": 4})
    soft = [
        await one_dgx.allocate_compute_group("soft", {"gpus": 1}, {"priority": 1, "preemptible": True})
        for _ in range(3)
    ]
    await one_dgx.allocate_compute_group("pinned", {"gpus": 1})
    before = await one_dgx.get_allocation_summary()
    with pytest.raises(InsufficientResourcesError):
        await one_dgx.allocate_compute_group("urgent", {"gpus": 5}, {"priority": 9})
    assert await one_dgx.get_allocation_summary() == before
    assert [(await one_dgx.get_compute_group(g.id)).allocation_state for g in soft] == ["allocated"] * 3


# -- affinity ------------------------------------------------------------------------
async def test_affinity_and_anti_affinity(two_dgx: ComputeGroupManager) -> None:
    p = await two_dgx.allocate_compute_group("prefill", {"gpus": 2}, {"node_id": "dgx-1"})
    near = await two_dgx.allocate_compute_group("decode", {"gpus": 2}, {"affinity": ["prefill"]})
    assert near.node_id == p.node_id
    away = await two_dgx.allocate_compute_group("decode", {"gpus": 2}, {"anti_affinity": ["prefill"]})
    assert away.node_id == "dgx-0"
    preferred = await two_dgx.allocate_compute_group(
        "router", {"cpus": 1}, {"affinity": [{"component": "prefill", "required": False}]}
    )
    assert preferred.node_id == p.node_id


async def test_unsatisfiable_anti_affinity_fails(one_dgx: ComputeGroupManager) -> None:
    await one_dgx.allocate_compute_group("replica", {"gpus": 1})
    before = await one_dgx.get_allocation_summary()
    with pytest.raises(InsufficientResourcesError, match="shares a node with replica"):
        await one_dgx.allocate_compute_group("replica", {"gpus": 1}, {"anti_affinity": ["replica"]})
    assert await one_dgx.get_allocation_summary() == before


async def test_nvlink_domain_affinity() -> None:
    provider = SimulatedComputeResourceProvider.from_spec(
        spec(
            {"id": "a", "count": 2, "preset": "dgx-h100", "labels": {"nvidia.com/gpu.clique": "c1.0"}},
            {"id": "b", "count": 2, "preset": "dgx-h100", "labels": {"nvidia.com/gpu.clique": "c2.0"}},
        )
    )
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        p = await mgr.allocate_compute_group("prefill", {"gpus": 8}, {"node_id": "b-0"})
        rule = {"component": "prefill", "scope": "nvlink_domain"}
        d = await mgr.allocate_compute_group("decode", {"gpus": 8}, {"affinity": [rule]})
        assert d.node_id == "b-1" and p.node_id == "b-0"
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("decode", {"gpus": 8}, {"affinity": [rule]})
        far = await mgr.allocate_compute_group("other", {"gpus": 8}, {"anti_affinity": [rule]})
        assert far.node_id.startswith("a-")


# -- gangs ---------------------------------------------------------------------------
async def test_two_node_gang(two_dgx: ComputeGroupManager) -> None:
    g = await two_dgx.allocate_compute_group("engine", {"gpus": 8, "nodes": 2})
    assert sorted(g.resources["node_ids"]) == ["dgx-0", "dgx-1"] and g.resources["gpus"] == 16
    envs = g.envs  # type: ignore[attr-defined]
    assert set(envs) == {"dgx-0", "dgx-1"}
    assert all(len(e["CUDA_VISIBLE_DEVICES"].split(",")) == 8 for e in envs.values())
    assert [x.id for x in await two_dgx.list_compute_groups()] == [g.id]
    assert (await two_dgx.get_compute_group(g.id)).resources["node_ids"] == g.resources["node_ids"]
    assert await two_dgx.deallocate_compute_group(g.id)
    assert (await two_dgx.get_allocation_summary())["free_gpus"] == 16


async def test_gang_is_refused_whole_when_only_one_node_fits(two_dgx: ComputeGroupManager) -> None:
    await two_dgx.allocate_compute_group("small", {"gpus": 1}, {"node_id": "dgx-1"})
    before = await two_dgx.get_allocation_summary()
    with pytest.raises(InsufficientResourcesError, match="only 1 node"):
        await two_dgx.allocate_compute_group("engine", {"gpus": 8, "nodes": 2})
    assert await two_dgx.get_allocation_summary() == before


# -- MIG -------------------------------------------------------------------------------
async def test_simulated_mig_devices_by_profile() -> None:
    provider = SimulatedComputeResourceProvider.from_spec(
        spec({"id": "mig", "preset": "hgx-a100", "mig": {0: ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]}})
    )
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        (node,) = await mgr.list_compute_nodes()
        assert node.resources["gpus"] == 11  # 7 whole GPUs + 4 MIG devices of GPU 0
        g = await mgr.allocate_compute_group("embed", {"mig_profile": "3g.40gb"})
        assert g.env["CUDA_VISIBLE_DEVICES"].startswith("MIG-")
        assert g.resources["gpu_indices"] == [0] and g.resources["mig_profiles"] == ["3g.40gb"]
        assert g.resources["mig_parent_uuids"] == [node.spec.gpus[0].parent_uuid]
        whole = await mgr.allocate_compute_group("tp7", {"gpus": 7})
        assert sorted(whole.resources["gpu_indices"]) == list(range(1, 8))  # never a MIG device
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("more", {"gpus": 1})
        two = await mgr.allocate_compute_group("small", {"mig_profile": "1g.10gb", "gpus": 2})
        assert len(two.resources["gpu_uuids"]) == 2


@pytest.mark.parametrize("layout", [{9: ["1g.10gb"]}, {0: ["4g.40gb", "4g.40gb"]}, {0: ["big"]}, {0: []}])
async def test_bad_mig_layouts(layout: dict[int, list[str]]) -> None:
    with pytest.raises(InvalidRequestError, match="mig"):
        SimulatedComputeResourceProvider.from_spec(spec({"id": "m", "preset": "hgx-a100", "mig": layout}))


@pytest.mark.parametrize("req", [{"mig_profile": "big"}, {"mig_profile": "1g.10gb", "gpus": 0.5}])
async def test_bad_mig_requests(one_dgx: ComputeGroupManager, req: dict[str, Any]) -> None:
    with pytest.raises(InvalidRequestError, match="requirements"):
        await one_dgx.allocate_compute_group("x", req)
