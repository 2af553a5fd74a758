"""Group commit: decisions that arrive while a commit is in flight are committed together.

Each is decided on the ledger with the ones before it staged, the batch is one store write, and a
lost race takes the whole batch back out and decides it again. The store here is the real
in-memory store with each commit held up for a moment (as a network round trip would), so that
concurrent callers find a commit in flight.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from computegroups import ComputeGroupManager, InsufficientResourcesError, SimulatedComputeResourceProvider
from computegroups.decide import Ledger, Staged, plan_acquire, plan_drain_node, plan_release
from computegroups.events import Event
from computegroups.model import AllocationState, GroupRecord
from computegroups.state.base import NO_CORDONS, Changes, Cordons
from computegroups.state.memory import MemoryStateStore
from tests.conftest import a6000_spec


class SlowStore:
    """The in-memory store, with every commit taking ``delay`` seconds before it is applied."""

    def __init__(self, delay: float = 0.01) -> None:
        self.inner = MemoryStateStore()
        self.delay = delay
        self.commits = 0

    def bind(self, identity: str) -> None:
        self.inner.bind(identity)

    async def open(self) -> None:
        await self.inner.open()

    async def close(self) -> None:
        await self.inner.close()

    async def changes_since(self, revision: int) -> Changes:
        return await self.inner.changes_since(revision)

    async def commit(
        self,
        expected: int,
        upserts: Sequence[GroupRecord],
        deletes: Sequence[str] = (),
        events: Sequence[Event] = (),
        cordons: Cordons = NO_CORDONS,
    ) -> int:
        await asyncio.sleep(self.delay)
        rev = await self.inner.commit(expected, upserts, deletes, events, cordons)
        self.commits += 1
        return rev


def _provider(count: int = 2) -> SimulatedComputeResourceProvider:
    return SimulatedComputeResourceProvider.from_spec(a6000_spec(count))


def _uuids(groups: Sequence[object]) -> list[str]:
    return [d.uuid for g in groups for d in g.record.devices]  # type: ignore[attr-defined]


async def _fresh_summary(store: SlowStore, count: int = 2) -> dict[str, object]:
    async with ComputeGroupManager(_provider(count), store, reconcile_on_start=False) as other:
        return await other.get_allocation_summary()


async def test_concurrent_allocations_share_commits_and_never_share_a_gpu() -> None:
    store = SlowStore()
    async with ComputeGroupManager(_provider(), store) as mgr:
        before = store.commits
        groups = await asyncio.gather(*(mgr.allocate_compute_group(f"w{i}", {"gpus": 1}) for i in range(16)))
        assert store.commits - before <= 3  # the first alone, the rest in one or two batches
        uuids = _uuids(groups)
        assert len(uuids) == len(set(uuids)) == 16
        assert len({g.id for g in groups}) == 16
        summary = await mgr.get_allocation_summary()
        assert summary == await _fresh_summary(store)  # what was committed is what this ledger holds
        assert summary["allocated_gpus"] == 16 and summary["free_gpus"] == 0
        released = await asyncio.gather(*(mgr.deallocate_compute_group(g.id) for g in groups))
        assert all(released)
        assert (await mgr.get_allocation_summary())["free_gpus"] == 16


async def test_refusals_in_a_batch_change_nothing_and_the_rest_commit() -> None:
    store = SlowStore()
    async with ComputeGroupManager(_provider(1), store) as mgr:  # 8 GPUs
        outcomes = await asyncio.gather(
            *(mgr.allocate_compute_group(f"w{i}", {"gpus": 1}) for i in range(11)), return_exceptions=True
        )
        refused = [o for o in outcomes if isinstance(o, BaseException)]
        granted = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(granted) == 8 and len(refused) == 3
        assert all(isinstance(o, InsufficientResourcesError) for o in refused)
        assert len(set(_uuids(granted))) == 8
        assert any(e.kind == "refused" for e in mgr.recent_events)
        assert await mgr.get_allocation_summary() == await _fresh_summary(store, 1)


async def test_a_lost_race_unstages_the_batch_and_decides_it_again() -> None:
    store = SlowStore()
    async with (
        ComputeGroupManager(_provider(), store) as one,
        ComputeGroupManager(_provider(), store, reconcile_on_start=False) as two,
    ):
        groups = await asyncio.gather(
            *(m.allocate_compute_group(f"{n}{i}", {"gpus": 1}) for i in range(8) for n, m in (("a", one), ("b", two)))
        )
        assert one.conflicts + two.conflicts > 0  # they did race
        uuids = _uuids(groups)
        assert len(uuids) == len(set(uuids)) == 16
        fresh = await _fresh_summary(store)
        assert await one.get_allocation_summary() == fresh == await two.get_allocation_summary()
        assert fresh["allocated_gpus"] == 16


async def test_a_call_cancelled_before_its_commit_is_never_committed() -> None:
    store = SlowStore(delay=0.05)
    async with ComputeGroupManager(_provider(), store) as mgr:
        first = asyncio.ensure_future(mgr.allocate_compute_group("first", {"gpus": 1}))
        await asyncio.sleep(0.01)  # its commit is in flight
        waiting = asyncio.ensure_future(mgr.allocate_compute_group("waiting", {"gpus": 1}))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await first
        await asyncio.sleep(0.1)
        held = {g.component for g in await mgr.list_compute_groups()}
        assert held == {"first"}
        assert (await _fresh_summary(store))["allocated_gpus"] == 1


async def test_a_batch_leader_cancelled_mid_commit_still_settles_the_others() -> None:
    store = SlowStore(delay=0.05)
    async with ComputeGroupManager(_provider(), store) as mgr:
        first = asyncio.ensure_future(mgr.allocate_compute_group("first", {"gpus": 1}))
        await asyncio.sleep(0.01)
        calls = [asyncio.ensure_future(mgr.allocate_compute_group(f"w{i}", {"gpus": 1})) for i in range(4)]
        await first
        await asyncio.sleep(0.01)  # w0 leads the batch of four; its commit is in flight
        calls[0].cancel()
        others = await asyncio.gather(*calls[1:])
        with pytest.raises(asyncio.CancelledError):
            await calls[0]
        assert len(set(_uuids(others))) == 3
        summary = await mgr.get_allocation_summary()
        assert summary == await _fresh_summary(store)
        assert summary["allocated_gpus"] == 5  # the cancelled leader's decision was committed with the batch


def _snapshot(ledger: Ledger) -> tuple[object, ...]:
    nodes = tuple(
        (n.gpu_used, n.gpu_mem_used, n.cpu_used, n.mem_used, n.free_mask, n.partial_gpus, n.used_milli, n.cordoned)
        for n in ledger.cluster.nodes
    )
    return (
        dict(ledger.records),
        list(ledger.tombstones),
        dict(ledger.cordons),
        nodes,
        {k: v for k, v in ledger.usage.items() if v},
        ledger.component_nodes,
        {k: v for k, v in ledger.reservations.items() if v},
        dict(ledger.by_request),
        {k: v for k, v in ledger.by_node.items() if v},
        dict(ledger.carved_free),
        {k: v for k, v in ledger.preemptible.items() if v},
        dict(ledger.gangs),
    )


async def test_unstaging_leaves_the_ledger_exactly_as_it_was(fleet: ComputeGroupManager) -> None:
    kept = await fleet.allocate_compute_group("kept", {"gpus": 2}, {"request_id": "r-kept"})
    await fleet.reserve_compute_group("later", {"gpus": 1}, ttl_seconds=60)
    gone = await fleet.allocate_compute_group("gone", {"gpus": 1})
    await fleet.deallocate_compute_group(gone.id)
    await fleet.create_compute_group({"gpus": 1})
    ledger = fleet.ledger
    before = _snapshot(ledger)
    now = time.time()
    ask = fleet._ask("new", {"gpus": 4}, None, AllocationState.ALLOCATED, None)
    carve = fleet._ask("carve", {"gpus": 1}, None, AllocationState.ALLOCATED, None)  # takes the free pre-carved group
    staged = Staged(len(ledger.tombstones))
    for decide in (
        lambda: plan_acquire(ledger, ask, now, lambda: "cg-staged"),
        lambda: plan_release(ledger, kept.id, now),
        lambda: plan_drain_node(ledger, kept.node_id, "maintenance"),
        lambda: plan_acquire(ledger, carve, now, lambda: "cg-2"),
    ):
        ledger.stage(staged, decide())
    assert _snapshot(ledger) != before
    assert kept.id in staged.upserts and "cg-staged" in staged.upserts and staged.cordons
    ledger.unstage(staged)
    assert _snapshot(ledger) == before
