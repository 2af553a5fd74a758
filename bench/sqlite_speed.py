"""The durable path against the in-memory one, from one process and from several on one file.

Run as ``python -m bench sqlite``; one sitting measures, side by side:

* one process, 10,000 nodes: the allocate + release cycle of ``bench.speed`` in memory and with a
  SQLite file, and ``place()`` alone, on the default mixed fleet (k = 2) and on a uniform fleet of
  NVSwitch nodes (``dgx-h100``) half-filled with 4-GPU groups (k = 4); the API's cost above
  ``place()`` as a ratio, and Ray's settled median (``bench.ray_speed``) over ours;
* 1, 2 and 4 processes on one SQLite file, each allocating and releasing as fast as it can for the
  same wall-clock window: operations a second in all and per process (an operation is one
  ``allocate_compute_group`` or one ``deallocate_compute_group``), p50 and p99 of one operation.

A worker process is ``python -m bench.sqlite_speed STATE NODES K GO DURATION OUT``.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import speed
from bench.common import median, mixed_nodes, percentile, prefill_records
from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider, SqliteStateStore
from computegroups.model import NodeSpec
from computegroups.placement import fragmentation
from computegroups.providers.simulated import nodes_from_spec

NODES = 10_000
FLEETS = {"mixed": 2, "uniform-nvswitch": 4}  # fleet: the group size timed on it
PROCESSES = (1, 2, 4)


def fleet(name: str, nodes: int) -> tuple[list[NodeSpec], float, tuple[float, ...]]:
    """The nodes, the fill and the group sizes it is pre-filled with."""
    if name == "mixed":
        return mixed_nodes(nodes), speed.FILL, (1, 2, 4, 8, 0.5)
    return nodes_from_spec({"nodes": [{"id": "dgx", "count": nodes, "preset": "dgx-h100"}]}), 0.5, (4,)


def _row(name: str, state: str, nodes: int, k: int, lat: list[float], wall: float, held: int) -> dict[str, Any]:
    return {
        "fleet": name,
        "state": state,
        "nodes": nodes,
        "k": k,
        "groups_held": held,
        "cycles": len(lat),
        "p50_us": 1e6 * median(lat),
        "p99_us": 1e6 * percentile(lat, 99),
        "per_s": len(lat) / wall,
    }


async def _single(name: str, state: str, nodes: int, k: int, cycles: int, warmup: int) -> dict[str, Any]:
    specs, fill, sizes = fleet(name, nodes)
    records = prefill_records(specs, fill, seed=nodes, sizes=sizes)
    with tempfile.TemporaryDirectory(prefix="cg-bench-") as tmp:
        store: Any = SqliteStateStore(Path(tmp) / "state.db") if state == "sqlite" else None
        if store is not None:
            await store.open()
            await store.commit(0, records)
            await store.close()
            state_arg: Any = store.path
        else:
            from computegroups import MemoryStateStore

            state_arg = MemoryStateStore()
            await state_arg.commit(0, records)
        async with ComputeGroupManager(SimulatedComputeResourceProvider(specs), state_arg) as mgr:
            fragmentation.set_enabled(False)
            try:
                await speed._cycles(mgr, k, warmup)
                gc.collect()
                t0 = time.perf_counter()
                lat = await speed._cycles(mgr, k, cycles)
                wall = time.perf_counter() - t0
            finally:
                fragmentation.set_enabled(True)
    return _row(name, state, nodes, k, lat, wall, len(records))


def _place_only(name: str, nodes: int, k: int, cycles: int) -> dict[str, Any]:
    from computegroups.model import Constraints, Requirements
    from computegroups.placement import Cluster, place

    specs, fill, sizes = fleet(name, nodes)
    records = prefill_records(specs, fill, seed=nodes, sizes=sizes)
    cluster = Cluster(specs)
    for r in records:
        cluster.apply(r)
    req, cons = Requirements(gpus=k), Constraints()
    lat = []
    perf = time.perf_counter
    for _ in range(cycles):
        t0 = perf()
        place(cluster, req, cons)
        lat.append(perf() - t0)
    return _row(name, "place() only", nodes, k, lat, sum(lat), len(records))


async def _worker(state: str, nodes: int, k: int, go: Path, duration: float) -> dict[str, Any]:
    """One process: set up, say so (``GO.ready-PID``), then cycle for ``duration`` seconds from the
    start time the parent writes into ``GO`` once every worker is ready, every operation timed."""
    specs = mixed_nodes(nodes)
    perf = time.perf_counter
    lat: list[float] = []
    async with ComputeGroupManager(SimulatedComputeResourceProvider(specs), state) as mgr:
        fragmentation.set_enabled(False)
        go.with_name(f"{go.name}.ready-{os.getpid()}").touch()
        while not go.is_file():
            await asyncio.sleep(0.005)
        start = float(go.read_text())
        while time.time() < start:
            await asyncio.sleep(0.001)
        req = {"gpus": k}
        end = start + duration
        name = f"bench-{os.getpid()}"
        while time.time() < end:
            t0 = perf()
            g = await mgr.allocate_compute_group(name, req)
            t1 = perf()
            await mgr.deallocate_compute_group(g.id)
            lat += (t1 - t0, perf() - t1)
        wall = time.time() - start
        stats = dict(getattr(mgr.store, "stats", {}))
    return {
        "ops": len(lat),
        "wall_s": wall,
        "per_s": len(lat) / wall,
        "p50_us": 1e6 * median(lat),
        "p99_us": 1e6 * percentile(lat, 99),
        "stats": stats,
    }


def processes(n: int, nodes: int = NODES, k: int = 2, duration: float = 4.0) -> dict[str, Any]:
    """``n`` processes on one pre-filled SQLite file, all cycling in the same ``duration`` seconds."""
    with tempfile.TemporaryDirectory(prefix="cg-bench-") as tmp:
        path = Path(tmp) / "state.db"
        records = prefill_records(mixed_nodes(nodes), speed.FILL, seed=nodes)

        async def prefill() -> None:
            store = SqliteStateStore(path)
            await store.open()
            await store.commit(0, records)
            await store.close()

        asyncio.run(prefill())
        go = Path(tmp) / "go"
        outs = [Path(tmp) / f"w{i}.json" for i in range(n)]
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "bench.sqlite_speed",
                    str(path),
                    str(nodes),
                    str(k),
                    str(go),
                    str(duration),
                    str(o),
                ]
            )
            for o in outs
        ]
        deadline = time.time() + 600
        while len(list(Path(tmp).glob("go.ready-*"))) < n:
            if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
                for p in procs:
                    p.kill()
                raise RuntimeError("a worker did not get ready")
            time.sleep(0.05)
        (Path(tmp) / "go.tmp").write_text(str(time.time() + 0.5))
        (Path(tmp) / "go.tmp").rename(go)
        for p in procs:
            if p.wait(timeout=600) != 0:
                raise RuntimeError(f"a worker failed with exit code {p.returncode}")
        workers = [json.loads(o.read_text()) for o in outs]
    total = sum(w["ops"] for w in workers) / max(w["wall_s"] for w in workers)
    return {
        "processes": n,
        "nodes": nodes,
        "k": k,
        "duration_s": duration,
        "ops_per_s": total,
        "cycles_per_s": total / 2,
        "min_share": min(w["ops"] for w in workers) / sum(w["ops"] for w in workers),
        "workers": workers,
    }


def run(
    nodes: int = NODES,
    cycles: int = 2000,
    warmup: int = 200,
    procs: tuple[int, ...] = PROCESSES,
    duration: float = 4.0,
    ray: bool = True,
    log: Any = print,
) -> dict[str, Any]:
    single = []
    for name, k in FLEETS.items():
        for state in ("memory", "sqlite"):
            r = asyncio.run(_single(name, state, nodes, k, cycles, warmup))
            single.append(r)
            log(
                f"sqlite: {name} {state:6} k={k}: p50 {r['p50_us']:7.1f} us p99 {r['p99_us']:8.1f} us "
                f"{r['per_s']:7.0f}/s"
            )
        r = _place_only(name, nodes, k, cycles)
        single.append(r)
        log(f"sqlite: {name} place() only k={k}: p50 {r['p50_us']:7.2f} us")
    multi = []
    for n in procs:
        m = processes(n, nodes, duration=duration)
        multi.append(m)
        log(
            f"sqlite: {n} process(es) on one file: {m['ops_per_s']:7.0f} ops/s in all, per process "
            + ", ".join(f"{w['per_s']:.0f}" for w in m["workers"])
            + f"; smallest share {m['min_share']:.2f}"
        )
    out: dict[str, Any] = {"single": single, "processes": multi}
    if ray:
        from bench import ray_speed

        out["ray"] = ray_speed.run(sizes=tuple(sorted(set(FLEETS.values()))), cycles=100, warmup=10, log=log)
    return out


if __name__ == "__main__":
    state, nodes, k, go, duration, out = sys.argv[1:7]
    result = asyncio.run(_worker(state, int(nodes), int(k), Path(go), float(duration)))
    Path(out).write_text(json.dumps(result))
