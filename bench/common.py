"""Helpers shared by the benchmarks: clusters, pre-filling, percentiles, machine description."""

from __future__ import annotations

import os
import platform
import random
import statistics
import subprocess
from collections.abc import Sequence
from typing import Any

from computegroups.model import AllocationState, Constraints, GroupRecord, NodeSpec, Requirements
from computegroups.placement import Cluster, place
from computegroups.providers.simulated import nodes_from_spec

#: Node shapes of the mixed fleet: NVSwitch boxes and PCIe boxes with NVLink bridges in pairs.
MIXED_PRESETS = ("dgx-h100", "pcie-a6000-nvlink-pairs")


def mixed_spec(nodes: int) -> dict[str, Any]:
    """A spec of ``nodes`` 8-GPU nodes, half ``dgx-h100`` and half ``pcie-a6000-nvlink-pairs``."""
    dgx = (nodes + 1) // 2
    a6000 = nodes - dgx
    entries: list[dict[str, Any]] = [{"id": "dgx", "count": dgx, "preset": "dgx-h100"}]
    if a6000:
        entries.append({"id": "a6000", "count": a6000, "preset": "pcie-a6000-nvlink-pairs"})
    if dgx == 1:
        entries[0]["id"] = "dgx-0"
        entries[0]["count"] = 1
    return {"nodes": entries}


def prefill_records(
    nodes: Sequence[NodeSpec], fill: float, seed: int = 0, sizes: Sequence[float] = (1, 2, 4, 8, 0.5)
) -> list[GroupRecord]:
    """Groups that occupy about ``fill`` of the GPUs, placed by the default engine (bin-pack)."""
    rng = random.Random(seed)
    cluster = Cluster(nodes)
    target = fill * cluster.total_gpus()
    held = 0.0
    out: list[GroupRecord] = []
    cons = Constraints()
    n = 0
    while held < target:
        size = rng.choice(sizes)
        if held + size > target:
            size = 1 if held + 1 <= target else 0.5
        if held + size > target + 1e-9:
            break
        req = Requirements(gpus=size)
        try:
            d = place(cluster, req, cons)
        except Exception:
            break
        rec = GroupRecord(
            id=f"prefill-{n}",
            node_id=d.node_id,
            state=AllocationState.ALLOCATED,
            component=f"prefill-{n % 64}",
            devices=d.devices,
            requirements=req.to_dict(),
            constraints=cons.to_dict(),
            created_at=float(n),
            updated_at=float(n),
        )
        cluster.apply(rec)
        out.append(rec)
        held += size
        n += 1
    return out


def mixed_nodes(nodes: int) -> list[NodeSpec]:
    return nodes_from_spec(mixed_spec(nodes))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * (len(s) - 1))))
    return s[k]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine() -> dict[str, Any]:
    """What ran the benchmarks."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False)
        commit = rev.stdout.strip()
    except OSError:
        commit = ""
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_before": [round(x, 2) for x in load],
        "commit": commit,
    }
