"""Topology quality: does the engine give each group the best bottleneck link that can be had?

For every topology (the recorded ``nvidia-smi topo -m`` fixtures and the
packaged presets), every request size k and every occupancy of the node (all
2^n free masks for n <= 8 GPUs, a seeded sample above), the engine places k
GPUs on a one-node cluster; an independent brute force (its own link ranking,
its own subset enumeration) finds the best bottleneck any k free GPUs have.
"""

from __future__ import annotations

import itertools
import random
import re
from pathlib import Path
from typing import Any

from computegroups.errors import InsufficientResourcesError
from computegroups.model import MILLI, AllocationState, Constraints, DeviceShare, GroupRecord, Requirements
from computegroups.placement import Cluster, place
from computegroups.providers.simulated import PRESETS, nodes_from_spec
from computegroups.topology import parse_nvidia_smi_topo

_PCIE = ["SYS", "NODE", "PHB", "PXB", "PIX"]  # worst to best


def link_value(name: str) -> tuple[int, int]:
    """Independent ranking: any NVLink beats any PCIe path; more bonded NVLinks is better."""
    m = re.fullmatch(r"NV(\d+)", name)
    if m:
        return (2, int(m.group(1)))
    if name == "SOC":
        name = "SYS"
    return (1, _PCIE.index(name)) if name in _PCIE else (0, 0)


def bottleneck(links: list[list[str]], gpus: tuple[int, ...]) -> tuple[int, int]:
    if len(gpus) < 2:
        return (9, 9)
    return min(link_value(links[a][b]) for a, b in itertools.combinations(gpus, 2))


def brute_best(links: list[list[str]], free: list[int], k: int) -> tuple[int, int] | None:
    best = None
    for combo in itertools.combinations(free, k):
        b = bottleneck(links, combo)
        if best is None or b > best:
            best = b
    return best


def fixtures_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "nvidia-smi-topo"


def topologies() -> list[tuple[str, dict[str, Any]]]:
    """(name, node entry for a spec) for every fixture file and every preset with GPUs."""
    out: list[tuple[str, dict[str, Any]]] = []
    paths = sorted(fixtures_dir().glob("*.txt"))
    if not paths:
        raise FileNotFoundError(f"no nvidia-smi topo fixtures in {fixtures_dir()}")
    for path in paths:
        out.append((path.stem, {"id": "n", "topology": str(path), "cpus": 64, "memory_mib": 1 << 20}))
    for name, preset in sorted(PRESETS.items()):
        if preset.topology_file:
            out.append((f"preset:{name}", {"id": "n", "preset": name}))
    return out


def run(max_masks: int = 4096, seed: int = 0, log: Any = print) -> list[dict[str, Any]]:
    """One row per topology: placements checked, how many got the best bottleneck, worst miss."""
    rng = random.Random(seed)
    rows = []
    for name, entry in topologies():
        (spec,) = nodes_from_spec({"nodes": [entry]})
        topo = spec.effective_topology
        n = topo.gpu_count
        links = topo.matrix()
        # Cross-check the parse against the file itself: the matrix must be what nvidia-smi printed.
        if "topology" in entry:
            assert parse_nvidia_smi_topo(Path(entry["topology"]).read_text()).matrix() == links
        masks = list(range(1 << n)) if (1 << n) <= max_masks else [rng.randrange(1 << n) for _ in range(max_masks)]
        checked = best = 0
        misses: list[str] = []
        for k in range(1, n + 1):
            for mask in masks:
                free = [i for i in range(n) if mask >> i & 1]
                if len(free) < k:
                    continue
                cluster = Cluster([spec])
                used = tuple(
                    DeviceShare(i, spec.gpus[i].uuid, MILLI, spec.gpus[i].memory_mib)
                    for i in range(n)
                    if not mask >> i & 1
                )
                if used:
                    cluster.apply(GroupRecord("held", spec.id, AllocationState.ALLOCATED, "x", used))
                try:
                    d = place(cluster, Requirements(gpus=k), Constraints())
                except InsufficientResourcesError:
                    misses.append(f"k={k} free={free}: refused")
                    checked += 1
                    continue
                got = bottleneck(links, tuple(dev.index for dev in d.devices))
                want = brute_best(links, free, k)
                checked += 1
                if got == want:
                    best += 1
                elif len(misses) < 5:
                    misses.append(f"k={k} free={free}: got {got}, best {want}")
        rows.append(
            {
                "topology": name,
                "gpus": n,
                "placements": checked,
                "best_bottleneck": best,
                "share": best / checked if checked else 1.0,
                "misses": misses,
            }
        )
        log(f"topology: {name:32s} {best}/{checked} placements with the best bottleneck link")
    return rows
