"""Allocate-and-release latency and throughput through the public API.

One cycle is ``allocate_compute_group(..., {"gpus": k})`` followed by
``deallocate_compute_group``, on a mixed fleet of 8-GPU nodes (NVSwitch and
NVLink-pair boxes) pre-filled to about 60% by the default engine, with state in
memory or in a SQLite file. Latency is the wall time of one whole cycle.

``memory`` and ``sqlite`` rows time the plain pipeline (bin-pack and topology scores): the
fragmentation score is switched off, as it stays off for a workload of whole GPUs only. The
``memory+fragmentation`` rows time the same cycle with the fragmentation score engaged: the warm-up
also allocates and releases shares of a GPU, so the workload mix has shares in it whichever way a
build learns its mix (from requests or from committed groups).
"""

from __future__ import annotations

import asyncio
import gc
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.common import median, mixed_nodes, percentile, prefill_records
from computegroups import ComputeGroupManager, MemoryStateStore, SimulatedComputeResourceProvider, SqliteStateStore
from computegroups.placement import fragmentation

SIZES = (1, 2, 4, 8)
CLUSTERS = (1, 100, 1_000, 10_000)
FILL = 0.6


@dataclass
class SpeedResult:
    nodes: int
    gpus: int
    k: int
    state: str
    fill: float
    groups_held: int
    cycles: int
    p50_us: float
    p99_us: float
    mean_us: float
    per_s: float
    setup_s: float


async def _cycles(mgr: ComputeGroupManager, k: float, n: int) -> list[float]:
    lat: list[float] = []
    req = {"gpus": k}
    perf = time.perf_counter
    for _ in range(n):
        t0 = perf()
        g = await mgr.allocate_compute_group("bench", req)
        await mgr.deallocate_compute_group(g.id)
        lat.append(perf() - t0)
    return lat


async def _run(nodes: int, state: str, k: int, cycles: int, fill: float, warmup: int) -> SpeedResult:
    t0 = time.perf_counter()
    specs = mixed_nodes(nodes)
    # One node of 8 GPUs cannot hold 60% plus an 8-GPU group; leave room for the request.
    eff_fill = min(fill, max(0.0, 1.0 - k / 8)) if nodes == 1 else fill
    records = prefill_records(specs, eff_fill, seed=nodes)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    store: Any
    if state != "sqlite":
        store = MemoryStateStore()
    else:
        tmp = tempfile.TemporaryDirectory(prefix="cg-bench-")
        store = SqliteStateStore(Path(tmp.name) / "state.db")
    await store.open()
    if records:
        await store.commit(0, records)
    provider = SimulatedComputeResourceProvider(specs)
    try:
        async with ComputeGroupManager(provider, store) as mgr:
            setup = time.perf_counter() - t0
            engaged = state == "memory+fragmentation"
            fragmentation.set_enabled(engaged)
            if engaged:
                await _cycles(mgr, 0.5, warmup)
            await _cycles(mgr, k, warmup)
            gc.collect()
            t1 = time.perf_counter()
            lat = await _cycles(mgr, k, cycles)
            wall = time.perf_counter() - t1
    finally:
        fragmentation.set_enabled(True)
        await store.close()
        if tmp is not None:
            tmp.cleanup()
    return SpeedResult(
        nodes=nodes,
        gpus=8 * nodes,
        k=k,
        state=state,
        fill=round(eff_fill, 3),
        groups_held=len(records),
        cycles=cycles,
        p50_us=1e6 * median(lat),
        p99_us=1e6 * percentile(lat, 99),
        mean_us=1e6 * wall / cycles,
        per_s=cycles / wall,
        setup_s=setup,
    )


def engine_only(nodes: int, k: int, cycles: int, fill: float) -> dict[str, Any]:
    """The decision alone: ``place()`` on the same pre-filled cluster, nothing committed."""
    from computegroups.model import Constraints, Requirements
    from computegroups.placement import Cluster, place

    specs = mixed_nodes(nodes)
    eff_fill = min(fill, max(0.0, 1.0 - k / 8)) if nodes == 1 else fill
    records = prefill_records(specs, eff_fill, seed=nodes)
    cluster = Cluster(specs)
    for r in records:
        cluster.apply(r)
    req, cons = Requirements(gpus=k), Constraints()
    perf = time.perf_counter
    lat = []
    for _ in range(cycles):
        t0 = perf()
        place(cluster, req, cons)
        lat.append(perf() - t0)
    return {
        "nodes": nodes,
        "gpus": 8 * nodes,
        "k": k,
        "state": "place() only",
        "fill": round(eff_fill, 3),
        "groups_held": len(records),
        "cycles": cycles,
        "p50_us": 1e6 * median(lat),
        "p99_us": 1e6 * percentile(lat, 99),
        "mean_us": 1e6 * sum(lat) / cycles,
        "per_s": cycles / sum(lat),
        "setup_s": 0.0,
    }


def run(
    clusters: tuple[int, ...] = CLUSTERS,
    sizes: tuple[int, ...] = SIZES,
    states: tuple[str, ...] = ("memory", "sqlite", "memory+fragmentation"),
    cycles: int = 2000,
    sqlite_cycles: int = 1000,
    fill: float = FILL,
    warmup: int = 200,
    log: Any = print,
) -> list[dict[str, Any]]:
    """Every (cluster size, state, group size); returns one row each."""
    rows = []
    for nodes in clusters:
        for state in states:
            for k in sizes:
                n = sqlite_cycles if state == "sqlite" else cycles
                r = asyncio.run(_run(nodes, state, k, n, fill, warmup))
                row = asdict(r)
                rows.append(row)
                log(
                    f"speed: {nodes:>6} nodes {state:6} k={k}: p50 {r.p50_us:8.1f} us  p99 {r.p99_us:8.1f} us  "
                    f"{r.per_s:8.0f} cycles/s  ({r.groups_held} groups held, setup {r.setup_s:.1f}s)"
                )
        for k in sizes:
            e = engine_only(nodes, k, cycles, fill)
            rows.append(e)
            log(f"speed: {nodes:>6} nodes place() only k={k}: p50 {e['p50_us']:8.1f} us  p99 {e['p99_us']:8.1f} us")
    return rows
