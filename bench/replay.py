"""A fingerprint of every decision the API makes on an openb trace: to check a change keeps decisions.

``python -m bench.replay default 42`` replays one inflated trace (``bench/openb.py``'s protocol) through
``allocate_compute_group`` and prints the number of placements and refusals and a SHA-256 over, per
task, the node and the devices chosen (or the refusal). Two builds that print the same line made the
same decisions.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import sys

from bench.openb import inflate, load_tasks, node_spec
from computegroups import ComputeGroupManager, InsufficientResourcesError, SimulatedComputeResourceProvider


async def fingerprint(trace: str, seed: int) -> tuple[int, int, str]:
    """(placements, refusals, hex digest) of one replay."""
    spec = node_spec()
    capacity = sum(n["gpus"] for n in spec["nodes"]) * 1000
    tasks = inflate(load_tasks(trace), capacity, seed)
    ids = itertools.count()
    digest = hashlib.sha256()
    placed = refused = 0
    provider = SimulatedComputeResourceProvider.from_spec(spec)
    async with ComputeGroupManager(provider, ":memory:", id_factory=lambda: f"g{next(ids)}") as mgr:
        for task in tasks:
            req = task.requirements()
            if not req:
                continue
            try:
                g = await mgr.allocate_compute_group("openb", req)
            except InsufficientResourcesError:
                refused += 1
                digest.update(b"refused;")
                continue
            placed += 1
            devices = ",".join(f"{d.index}:{d.share_milli}" for d in g.record.devices)
            digest.update(f"{g.node_id}/{devices};".encode())
    return placed, refused, digest.hexdigest()


def main(argv: list[str]) -> None:
    trace = argv[0] if argv else "default"
    seed = int(argv[1]) if len(argv) > 1 else 42
    placed, refused, digest = asyncio.run(fingerprint(trace, seed))
    print(f"{trace} seed {seed}: {placed} placed, {refused} refused, sha256 {digest}")


if __name__ == "__main__":
    main(sys.argv[1:])
