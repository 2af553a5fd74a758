"""This machine: GPUs through NVML, CPUs and memory from the OS.

A machine without an NVIDIA driver comes up as one CPU-only node, and the
inventory's notes say why no GPU was found.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from computegroups.model import MILLI, GpuSpec, NodeSpec
from computegroups.providers.base import ComputeResourceProvider, Inventory
from computegroups.providers.materialise import EnvMaterialiser
from computegroups.providers.nvml import NvmlSource, NvmlUnavailable, RealNvml, discover_gpus
from computegroups.topology import Topology

__all__ = ["LocalComputeResourceProvider"]


def _memory_mib() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    except (ValueError, OSError):
        return 0


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


class LocalComputeResourceProvider(ComputeResourceProvider):
    """Discovers this machine; workloads are isolated by environment (CUDA_VISIBLE_DEVICES)."""

    name = "local"

    def __init__(self, node_id: str | None = None, nvml: Callable[[], NvmlSource] | None = None) -> None:
        self.node_id = node_id or socket.gethostname()
        self._nvml_factory: Callable[[], NvmlSource] = nvml or RealNvml
        self._materialised = EnvMaterialiser()
        self._notes: list[str] = []

    async def discover_resources(self) -> Inventory:
        notes: list[str] = []
        gpus: list[GpuSpec] = []
        topo: Topology | None = None
        try:
            source = self._nvml_factory()
        except NvmlUnavailable as exc:
            notes.append(f"no NVIDIA GPU found: {exc}")
        else:
            try:
                gpus, topo = discover_gpus(source)
            finally:
                source.close()
            if not gpus:
                notes.append("no NVIDIA GPU found: NVML reports 0 devices")
        node = NodeSpec(
            id=self.node_id,
            gpus=tuple(gpus),
            topology=topo if gpus else None,
            cpus_milli=_cpus() * MILLI,
            memory_mib=_memory_mib(),
            labels={"kubernetes.io/hostname": self.node_id},
        )
        self._notes = notes
        return Inventory((node,), source="local", notes=tuple(notes))

    async def allocate_resources(self, component_name: str, resources: dict[str, Any]) -> dict[str, Any]:
        return self._materialised.allocate(component_name, resources)

    async def deallocate_resources(self, component_name: str, resource_ids: list[str]) -> bool:
        return self._materialised.deallocate(component_name, resource_ids)

    async def get_resource_state(self) -> dict[str, Any]:
        return {
            "provider": self.name,
            "node": self.node_id,
            "notes": list(self._notes),
            "materialised": dict(self._materialised.active),
        }
