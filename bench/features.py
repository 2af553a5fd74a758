"""Decision speed with the advanced features in use: pools and quotas, affinity, priority, reservations, gangs.

Same fleet and fill as ``speed`` (mixed 8-GPU nodes, about 60% pre-filled), state in memory. Half
of the nodes are in a pool with a quota; a component ``prefill`` holds a group on 16 nodes for the
affinity rules. One cycle is the request with the feature, then its release: two API calls, the
unit of the speed target. Reservations are measured three ways: reserve then release; claim a
reservation (made untimed just before) then release; and the whole reserve, claim, release life
(three calls). As in ``speed``'s plain rows, the fragmentation score is off: these requests are of
whole GPUs, for which it stays off.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import median, mixed_nodes, percentile, prefill_records
from computegroups import ComputeGroupManager, MemoryStateStore, SimulatedComputeResourceProvider
from computegroups.placement import fragmentation

POOLS = [
    {
        "name": "serving",
        "selector": {"tier": "serving"},
        "priority": 1,
        "quotas": {"default_component": {"max_gpus": 1_000_000}, "default_tenant": {"max_share": 1.0}},
    }
]

#: One timed cycle: returns the seconds its timed part took (setup a cycle needs is not timed).
Cycle = Callable[[ComputeGroupManager], Awaitable[float]]
_perf = time.perf_counter


def _allocate_release(req: dict[str, Any], cons: dict[str, Any] | None = None) -> Cycle:
    """A cycle: allocate ``req`` under ``cons``, then release it."""

    async def cycle(m: ComputeGroupManager) -> float:
        t0 = _perf()
        g = await m.allocate_compute_group("bench", req, cons)
        await m.deallocate_compute_group(g.id)
        return _perf() - t0

    return cycle


async def _reserve(m: ComputeGroupManager) -> float:
    t0 = _perf()
    r = await m.reserve_compute_group("planner", {"gpus": 2}, ttl_seconds=60)
    await m.deallocate_compute_group(r.id)
    return _perf() - t0


async def _claim(m: ComputeGroupManager) -> float:
    r = await m.reserve_compute_group("planner", {"gpus": 2}, ttl_seconds=60)
    t0 = _perf()
    g = await m.allocate_compute_group("bench", {"gpus": 2}, {"reservation_id": r.id})
    await m.deallocate_compute_group(g.id)
    return _perf() - t0


async def _lifecycle(m: ComputeGroupManager) -> float:
    t0 = _perf()
    r = await m.reserve_compute_group("planner", {"gpus": 2}, ttl_seconds=60)
    g = await m.allocate_compute_group("bench", {"gpus": 2}, {"reservation_id": r.id})
    await m.deallocate_compute_group(g.id)
    return _perf() - t0


#: name -> (cycle, API calls it times)
FEATURES: dict[str, tuple[Cycle, int]] = {
    "plain (2 GPUs)": (_allocate_release({"gpus": 2}), 2),
    "pool + tenant quota": (_allocate_release({"gpus": 2, "pool": "serving"}, {"tenant": "team-a"}), 2),
    "required affinity": (_allocate_release({"gpus": 2}, {"affinity": ["prefill"]}), 2),
    "required anti-affinity": (_allocate_release({"gpus": 2}, {"anti_affinity": ["prefill"]}), 2),
    "priority, preemptible": (_allocate_release({"gpus": 2}, {"priority": 5, "preemptible": True}), 2),
    "reserve + release": (_reserve, 2),
    "claim a reservation + release": (_claim, 2),
    "reserve + claim + release": (_lifecycle, 3),
    "gang 2 nodes x 8 GPUs": (_allocate_release({"gpus": 8, "nodes": 2}), 2),
}


async def _run(nodes: int, cycles: int, warmup: int, fill: float) -> list[dict[str, Any]]:
    specs = [
        dataclasses.replace(s, labels={**s.labels, "tier": "serving"}) if n % 2 == 0 else s
        for n, s in enumerate(mixed_nodes(nodes))
    ]
    records = prefill_records(specs, fill, seed=nodes)
    store = MemoryStateStore()
    if records:
        await store.commit(0, records)
    fragmentation.set_enabled(False)
    try:
        rows = await _measure(specs, store, len(records), cycles, warmup)
    finally:
        fragmentation.set_enabled(True)
    return rows


async def _measure(specs: Any, store: MemoryStateStore, held: int, cycles: int, warmup: int) -> list[dict[str, Any]]:
    rows = []
    nodes = len(specs)
    async with ComputeGroupManager(SimulatedComputeResourceProvider(specs), store, pools=POOLS) as mgr:
        for _ in range(min(16, nodes)):
            await mgr.allocate_compute_group("prefill", {"gpus": 1}, {"strategy": "spread"})
        for name, (cycle, calls) in FEATURES.items():
            for _ in range(warmup):
                await cycle(mgr)
            gc.collect()
            lat = [await cycle(mgr) for _ in range(cycles)]
            rows.append(
                {
                    "feature": name,
                    "calls": calls,
                    "nodes": nodes,
                    "cycles": cycles,
                    "groups_held": held,
                    "p50_us": 1e6 * median(lat),
                    "p99_us": 1e6 * percentile(lat, 99),
                }
            )
    return rows


def run(
    nodes: int = 10_000, cycles: int = 2000, warmup: int = 200, fill: float = 0.6, log: Any = print
) -> list[dict[str, Any]]:
    """One row per feature: p50 and p99 of a cycle at ``nodes`` nodes, in memory."""
    rows = asyncio.run(_run(nodes, cycles, warmup, fill))
    for r in rows:
        log(f"features: {r['nodes']:>6} nodes {r['feature']:28} p50 {r['p50_us']:8.1f} us  p99 {r['p99_us']:8.1f} us")
    return rows
