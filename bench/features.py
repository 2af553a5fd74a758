"""Decision speed with the advanced features in use: pools and quotas, affinity, priority, reservations, gangs.

Same fleet and fill as ``speed`` (mixed 8-GPU nodes, about 60% pre-filled), state in memory. Half
of the nodes are in a pool with a quota; a component ``prefill`` holds a group on 16 nodes for the
affinity rules. One cycle is the request with the feature, then its release (for a reservation:
reserve, claim by id, release).
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

POOLS = [
    {
        "name": "serving",
        "selector": {"tier": "serving"},
        "priority": 1,
        "quotas": {"default_component": {"max_gpus": 1_000_000}, "default_tenant": {"max_share": 1.0}},
    }
]

Cycle = Callable[[ComputeGroupManager], Awaitable[None]]


async def _plain(m: ComputeGroupManager) -> None:
    g = await m.allocate_compute_group("bench", {"gpus": 2})
    await m.deallocate_compute_group(g.id)


async def _pool(m: ComputeGroupManager) -> None:
    g = await m.allocate_compute_group("bench", {"gpus": 2, "pool": "serving"}, {"tenant": "team-a"})
    await m.deallocate_compute_group(g.id)


async def _affinity(m: ComputeGroupManager) -> None:
    g = await m.allocate_compute_group("bench", {"gpus": 2}, {"affinity": ["prefill"]})
    await m.deallocate_compute_group(g.id)


async def _anti(m: ComputeGroupManager) -> None:
    g = await m.allocate_compute_group("bench", {"gpus": 2}, {"anti_affinity": ["prefill"]})
    await m.deallocate_compute_group(g.id)


async def _priority(m: ComputeGroupManager) -> None:
    g = await m.allocate_compute_group("bench", {"gpus": 2}, {"priority": 5, "preemptible": True})
    await m.deallocate_compute_group(g.id)


async def _reservation(m: ComputeGroupManager) -> None:
    r = await m.reserve_compute_group("planner", {"gpus": 2}, ttl_seconds=60)
    g = await m.allocate_compute_group("bench", {"gpus": 2}, {"reservation_id": r.id})
    await m.deallocate_compute_group(g.id)


async def _gang(m: ComputeGroupManager) -> None:
    g = await m.allocate_compute_group("bench", {"gpus": 8, "nodes": 2})
    await m.deallocate_compute_group(g.id)


FEATURES: dict[str, Cycle] = {
    "plain (2 GPUs)": _plain,
    "pool + tenant quota": _pool,
    "required affinity": _affinity,
    "required anti-affinity": _anti,
    "priority, preemptible": _priority,
    "reserve + claim + release": _reservation,
    "gang 2 nodes x 8 GPUs": _gang,
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
    rows = []
    async with ComputeGroupManager(SimulatedComputeResourceProvider(specs), store, pools=POOLS) as mgr:
        for _ in range(min(16, nodes)):
            await mgr.allocate_compute_group("prefill", {"gpus": 1}, {"strategy": "spread"})
        perf = time.perf_counter
        for name, cycle in FEATURES.items():
            for _ in range(warmup):
                await cycle(mgr)
            gc.collect()
            lat = []
            for _ in range(cycles):
                t0 = perf()
                await cycle(mgr)
                lat.append(perf() - t0)
            rows.append(
                {
                    "feature": name,
                    "nodes": nodes,
                    "cycles": cycles,
                    "groups_held": len(records),
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
