"""Allocates and releases forever against a SQLite file, until killed (for crash tests)."""

from __future__ import annotations

import asyncio
import random
import sys

from computegroups import ComputeGroupManager, InsufficientResourcesError, SimulatedComputeResourceProvider
from tests._sqlite_worker import SPEC


async def main(state: str, seed: int) -> None:
    rng = random.Random(seed)
    held: list[str] = []
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), state) as mgr:
        print("ready", flush=True)
        while True:
            if held and (rng.random() < 0.5 or len(held) > 6):
                await mgr.deallocate_compute_group(held.pop(rng.randrange(len(held))))
                continue
            try:
                g = await mgr.allocate_compute_group(
                    "crash", {"gpus": rng.choice([1, 2, 4, 0.25])}, {"request_id": f"{seed}-{rng.random()}"}
                )
                held.append(g.id)
            except InsufficientResourcesError:
                if held:
                    await mgr.deallocate_compute_group(held.pop())


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
