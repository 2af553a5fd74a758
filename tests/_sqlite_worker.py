"""A separate process that allocates and releases against a shared SQLite state file.

Usage: python -m tests._sqlite_worker STATE SEED ITERATIONS LOG
Writes one JSON line per hold to LOG: devices held and the monotonic interval it held them.
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import time

from computegroups import ComputeGroupManager, InsufficientResourcesError, SimulatedComputeResourceProvider

SPEC = {"nodes": [{"id": "a", "preset": "pcie-a6000-nvlink-pairs"}, {"id": "h", "preset": "dgx-h100"}]}


async def main(state: str, seed: int, iterations: int, log_path: str) -> None:
    rng = random.Random(seed)
    provider = SimulatedComputeResourceProvider.from_spec(SPEC)
    with open(log_path, "w") as log:
        async with ComputeGroupManager(provider, state) as mgr:
            for n in range(iterations):
                size = rng.choice([1, 1, 2, 4, 0.5])
                try:
                    g = await mgr.allocate_compute_group(f"w{seed}", {"gpus": size})
                except InsufficientResourcesError:
                    await asyncio.sleep(0.001)
                    continue
                start = time.monotonic()
                await asyncio.sleep(rng.random() * 0.002)
                end = time.monotonic()
                log.write(
                    json.dumps(
                        {
                            "group": g.id,
                            "node": g.node_id,
                            "gpus": g.resources["gpu_indices"],
                            "share": size if size < 1 else 1,
                            "start": start,
                            "end": end,
                        }
                    )
                    + "\n"
                )
                assert await mgr.deallocate_compute_group(g.id)
                if n % 7 == 0:
                    await asyncio.sleep(0)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]))
