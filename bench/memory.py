"""Bytes of state per GPU: the manager's in-memory structures (tracemalloc) and the SQLite file."""

from __future__ import annotations

import asyncio
import gc
import tempfile
import tracemalloc
from pathlib import Path
from typing import Any

from bench.common import mixed_nodes, prefill_records
from computegroups import ComputeGroupManager, MemoryStateStore, SimulatedComputeResourceProvider, SqliteStateStore


async def _measure(nodes: int, fill: float) -> dict[str, Any]:
    gpus = 8 * nodes
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    specs = mixed_nodes(nodes)
    gc.collect()
    after_specs = tracemalloc.get_traced_memory()[0]
    # The group records (and the store holding them) are state; the planning cluster is dropped.
    records = prefill_records(specs, fill, seed=nodes)
    store = MemoryStateStore()
    await store.open()
    await store.commit(0, records)
    gc.collect()
    after_store = tracemalloc.get_traced_memory()[0]
    async with ComputeGroupManager(SimulatedComputeResourceProvider(specs), store) as mgr:
        gc.collect()
        after_mgr = tracemalloc.get_traced_memory()[0]
        assert len(mgr.ledger.records) == len(records)
    tracemalloc.stop()
    inventory = after_specs - base
    store_bytes = after_store - after_specs
    manager = after_mgr - after_store

    with tempfile.TemporaryDirectory(prefix="cg-bench-") as tmp:
        path = Path(tmp) / "state.db"
        sq = SqliteStateStore(path)
        await sq.open()
        # Commit in batches, as a busy deployment would have written them over time.
        rev = 0
        for i in range(0, len(records), 500):
            rev = await sq.commit(rev, records[i : i + 500])
        await sq.close()
        size = path.stat().st_size + sum(p.stat().st_size for p in Path(tmp).glob("state.db-*"))
    return {
        "nodes": nodes,
        "gpus": gpus,
        "groups": len(records),
        "fill": fill,
        "inventory_bytes_per_gpu": inventory / gpus,
        "store_bytes_per_gpu": store_bytes / gpus,
        "manager_bytes_per_gpu": manager / gpus,
        "state_bytes_per_gpu": (store_bytes + manager) / gpus,
        "total_bytes_per_gpu": (inventory + store_bytes + manager) / gpus,
        "sqlite_bytes": size,
        "sqlite_bytes_per_gpu": size / gpus,
    }


def run(nodes: int = 10_000, fill: float = 0.6, log: Any = print) -> dict[str, Any]:
    r = asyncio.run(_measure(nodes, fill))
    log(
        f"memory: {nodes} nodes, {r['groups']} groups: state {r['state_bytes_per_gpu']:.0f} B/GPU "
        f"(store {r['store_bytes_per_gpu']:.0f} + manager {r['manager_bytes_per_gpu']:.0f}), inventory "
        f"{r['inventory_bytes_per_gpu']:.0f} B/GPU; SQLite file {r['sqlite_bytes_per_gpu']:.0f} B/GPU"
    )
    return r
