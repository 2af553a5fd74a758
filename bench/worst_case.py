"""Worst-case decisions: the largest nodes, the worst occupancies and MIG-sliced nodes.

Each sample times the choice of devices inside one node (``Topology.best_subset``, the part of a
decision that grows with the node) with its memo emptied first, so every sample pays for the whole
search: a 16-GPU node (the largest searched exactly), 32-
and 64-GPU NVSwitch nodes and a 64-GPU node of NVLink pairs asked for every size, an A100 node with 7
``1g.5gb`` MIG slices per GPU (56 devices) asked for 1 to 56 slices, each at full, random and
alternating occupancy. Each decision is timed as the fastest of 3 runs of the same search (the work
is identical; what varies is the shared machine). Reported: p50, p99 and the maximum, in milliseconds.
"""

from __future__ import annotations

import math
import random
import statistics
import time
from typing import Any

from computegroups.model import NodeSpec
from computegroups.providers.simulated import nodes_from_spec
from computegroups.topology import Topology


def _nvswitch(n: int) -> Topology:
    return Topology([["NV18"] * n for _ in range(n)], [2 * i // n for i in range(n)], name=f"nvswitch-{n}")


def _pairs(n: int) -> Topology:
    def link(a: int, b: int) -> str:
        if a // 2 == b // 2:
            return "NV4"
        if a // 8 == b // 8:
            return "PHB"
        return "NODE" if 2 * a // n == 2 * b // n else "SYS"

    return Topology(
        [[link(a, b) for b in range(n)] for a in range(n)], [2 * i // n for i in range(n)], name=f"pairs-{n}"
    )


def _mig_node() -> NodeSpec:
    spec = {"nodes": [{"id": "mig", "preset": "hgx-a100", "mig": {i: ["1g.5gb"] * 7 for i in range(8)}}]}
    return nodes_from_spec(spec)[0]


def _masks(n: int, rng: random.Random, samples: int) -> list[tuple[str, int]]:
    full = (1 << n) - 1
    alternate = sum(1 << i for i in range(0, n, 2))
    return [("full", full), ("alternate", alternate)] + [("random", rng.getrandbits(n) | 1) for _ in range(samples)]


def _search_time(topo: Topology, free_mask: int, k: int, repeats: int = 3) -> float:
    """The fastest of a few runs of one whole search (the work is the same each time; the spread is the machine's)."""
    best = math.inf
    for _ in range(repeats):
        topo._cache.clear()
        t0 = time.perf_counter()
        topo.best_subset(free_mask, k)
        best = min(best, time.perf_counter() - t0)
    return best


def run(samples: int = 8, seed: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    cases: list[tuple[str, Topology, list[int]]] = [
        ("16 GPUs, NVSwitch (exact)", _nvswitch(16), list(range(2, 16))),
        ("32 GPUs, NVSwitch", _nvswitch(32), list(range(2, 32, 2))),
        ("64 GPUs, NVSwitch", _nvswitch(64), list(range(2, 64, 4))),
        ("64 GPUs, NVLink pairs", _pairs(64), list(range(2, 64, 4))),
    ]
    mig = _mig_node()
    assert mig.topology is not None
    cases.append(("A100, 56 MIG 1g.5gb slices", mig.topology, list(range(2, 57, 3))))
    rows = []
    for name, topo, sizes in cases:
        times: list[float] = []
        worst = (0.0, 0, "")
        for label, mask in _masks(topo.gpu_count, rng, samples):
            free = mask.bit_count()
            for k in sizes:
                if k > free:
                    continue
                dt = _search_time(topo, mask, k)
                times.append(dt)
                if dt > worst[0]:
                    worst = (dt, k, label)
        times.sort()
        rows.append(
            {
                "case": name,
                "devices": topo.gpu_count,
                "decisions": len(times),
                "p50_ms": 1000 * statistics.median(times),
                "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
                "max_ms": 1000 * worst[0],
                "worst": f"{worst[1]} devices, {worst[2]} occupancy",
            }
        )
    return rows
