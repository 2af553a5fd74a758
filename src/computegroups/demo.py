"""The main job's tour: the API on a simulated cluster, with state in a SQLite file."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from computegroups.errors import InsufficientResourcesError
from computegroups.manager import ComputeGroupManager
from computegroups.providers.base import ComputeResourceProvider

__all__ = ["run_demo"]


async def run_demo(provider: ComputeResourceProvider, state: Path, say: Callable[[str], None]) -> None:
    """Allocate, share, drain and release groups, printing what each step decided."""
    async with ComputeGroupManager(provider, state) as mgr:
        nodes = await mgr.list_compute_nodes()
        say(f"discovered {len(nodes)} node(s), {sum(len(n.spec.gpus) for n in nodes)} GPU(s); state in {state}")
        for n in nodes:
            r = n.resources
            say(f"  {n.id:10} {r['gpus']} x {r['gpu_model'] or 'no GPU'}, {r['cpus']:g} CPUs")

        say("\nfour tensor-parallel pairs on a6000-0's NVLink bridges (nvlink=True):")
        pairs = []
        for _ in range(4):
            g = await mgr.allocate_compute_group("decode", {"gpus": 2}, {"nvlink": True, "node_id": "a6000-0"})
            pairs.append(g)
            say(f"  {g.id} on {g.node_id} GPUs {g.resources['gpu_indices']} link {g.topology['bottleneck']}")

        g8 = await mgr.allocate_compute_group("prefill", {"gpus": 8, "gpu_model": "H100"})
        say(
            f"\nan 8-GPU prefill worker: {g8.node_id} GPUs {g8.resources['gpu_indices']} "
            f"link {g8.topology['bottleneck']}"
        )
        say(f"  its environment: CUDA_VISIBLE_DEVICES={g8.env['CUDA_VISIBLE_DEVICES'][:44]}...")

        shares = [await mgr.allocate_compute_group("embed", {"gpus": 0.25}) for _ in range(3)]
        say(
            f"\nthree quarter-GPU shares pack onto one GPU: {[(s.node_id, s.resources['gpu_indices']) for s in shares]}"
        )

        again = await mgr.allocate_compute_group("router", {"cpus": 8, "memory_mib": 16384}, {"request_id": "r-1"})
        retry = await mgr.allocate_compute_group("router", {"cpus": 8, "memory_mib": 16384}, {"request_id": "r-1"})
        say(f"\na CPU-only group, retried with the same request id, is the same group: {again.id == retry.id}")

        try:
            await mgr.allocate_compute_group("decode", {"gpus": 2}, {"nvlink": True, "node_id": "a6000-0"})
        except InsufficientResourcesError as exc:
            say(f"\na fifth NVLink pair on a6000-0 is refused: {exc}")

        await mgr.drain_compute_group(pairs[0].id)
        say(f"\ndrained {pairs[0].id}; releasing every group")
        for g in [*pairs, g8, *shares, again]:
            await mgr.deallocate_compute_group(g.id)
        s = await mgr.get_allocation_summary()
        say(f"summary: {s['total_gpus']} GPUs, {s['allocated_gpus']:g} allocated, {s['free_gpus']:g} free")
