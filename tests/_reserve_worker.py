"""Reserves capacity against a SQLite file, says so, then waits to be killed."""

from __future__ import annotations

import asyncio
import sys

from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider

SPEC = {"nodes": [{"id": "n", "preset": "dgx-h100"}]}


async def main(state: str, ttl: float) -> None:
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), state) as mgr:
        g = await mgr.reserve_compute_group("planner", {"gpus": 8}, ttl_seconds=ttl)
        print(g.id, flush=True)
        await asyncio.sleep(3600)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
