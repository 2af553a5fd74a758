"""This machine: GPUs through NVML (or ``nvidia-smi``), CPUs and memory from the OS.

Discovery tries NVML first, then the ``nvidia-smi`` executable; a machine with
neither comes up as one CPU-only node, and the inventory's notes say why no GPU
was found. The NVML source stays open while the provider is, so that
:meth:`sample_health` can report utilization and health (XIDs, double-bit ECC
errors, uncorrectable remapped rows, lost GPUs) every monitoring round.

A recorded machine replays through the same code:
``LocalComputeResourceProvider.from_recording("tests/fixtures/nvml/hgx_h100_8_nvswitch.json")``.
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from computegroups.model import MILLI, GpuSpec, NodeSpec
from computegroups.providers.base import DeviceHealth, Inventory
from computegroups.providers.materialise import EnvironmentProvider
from computegroups.providers.nvidia_smi import NvidiaSmi, NvidiaSmiUnavailable
from computegroups.providers.nvml import (
    HealthTracker,
    NvmlSource,
    NvmlUnavailable,
    RealNvml,
    ReplayNvml,
    discover_gpus,
    discover_machine,
    schedulable_devices,
)
from computegroups.topology import Topology

__all__ = ["LocalComputeResourceProvider", "discover_gpus"]


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


class LocalComputeResourceProvider(EnvironmentProvider):
    """Discovers this machine; workloads are isolated by environment (CUDA_VISIBLE_DEVICES).

    ``nvml``: a factory for the NVML source (default :class:`RealNvml`; a
    :class:`ReplayNvml` replays a recorded machine). ``nvidia_smi``: the
    executable to fall back on when NVML is unavailable (None: no fallback).
    ``cpus``/``memory_mib`` override what the OS reports (useful with recordings).
    """

    name = "local"

    def __init__(
        self,
        node_id: str | None = None,
        nvml: Callable[[], NvmlSource] | None = None,
        *,
        nvidia_smi: str | None = "nvidia-smi",
        cpus: int | None = None,
        memory_mib: int | None = None,
    ) -> None:
        self.node_id = node_id or socket.gethostname()
        self._nvml_factory: Callable[[], NvmlSource] = nvml or RealNvml
        self._nvidia_smi = nvidia_smi
        self._cpus = cpus
        self._memory_mib = memory_mib
        super().__init__()
        self._notes: list[str] = []
        self._source: NvmlSource | NvidiaSmi | None = None
        self._parents: list[int] = []  # node device index -> NVML GPU index
        self._tracker = HealthTracker()
        self.backend = "none"

    @classmethod
    def from_recording(
        cls, path: str | os.PathLike[str], node_id: str | None = None, **kwargs: Any
    ) -> LocalComputeResourceProvider:
        """A provider replaying a recorded machine (see :class:`ReplayNvml`); no real GPU is touched."""
        replay = ReplayNvml(path)
        return cls(node_id or Path(path).stem, lambda: replay, nvidia_smi=None, **kwargs)

    @property
    def source(self) -> NvmlSource | NvidiaSmi | None:
        """The open NVML (or nvidia-smi) source, after discovery."""
        return self._source

    def cluster_identity(self, inventory: Inventory) -> str:
        """This machine, by its node id (the host name unless given)."""
        return f"local:{self.node_id}"

    async def discover_resources(self) -> Inventory:
        notes: list[str] = []
        gpus: list[GpuSpec] = []
        topo: Topology | None = None
        await self.close()
        try:
            source = self._nvml_factory()
        except NvmlUnavailable as exc:
            notes.append(f"NVML unavailable: {exc}")
            gpus, topo = self._discover_smi(notes)
        else:
            try:
                machine = discover_machine(source)
                gpus, topo = schedulable_devices(machine)
                self._parents = [d.smi_index for d in gpus]  # device -> NVML index of its GPU
            except BaseException:
                source.close()
                raise
            self._source = source
            self.backend = "nvml"
            if machine.mig:
                notes.append(
                    "MIG devices are scheduled in place of their GPUs: "
                    + ", ".join(f"GPU {i}: {len(m)}" for i, m in sorted(machine.mig.items()))
                )
        if not gpus:
            notes.append("no NVIDIA GPU found")
        node = NodeSpec(
            id=self.node_id,
            gpus=tuple(gpus),
            topology=topo if gpus else None,
            cpus_milli=(self._cpus if self._cpus is not None else _cpus()) * MILLI,
            memory_mib=self._memory_mib if self._memory_mib is not None else _memory_mib(),
            labels={"kubernetes.io/hostname": self.node_id},
        )
        self._notes = notes
        return Inventory((node,), source="local", notes=tuple(notes))

    def _discover_smi(self, notes: list[str]) -> tuple[list[GpuSpec], Topology | None]:
        if self._nvidia_smi is None:
            return [], None
        try:
            smi = NvidiaSmi(self._nvidia_smi)
            gpus, topo, smi_notes = smi.discover()
        except NvidiaSmiUnavailable as exc:
            notes.append(f"nvidia-smi fallback unavailable: {exc}")
            return [], None
        notes.append("discovered through nvidia-smi (NVML library not loadable)")
        notes.extend(smi_notes)
        self._source = smi
        self._parents = list(range(len(gpus)))
        self.backend = "nvidia-smi"
        return gpus, topo

    async def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    async def sample_health(self) -> Sequence[DeviceHealth]:
        """One monitoring round: utilization and health of every device (a MIG device shares its GPU's)."""
        if self._source is None:
            return ()
        samples = {int(s["index"]): s for s in await asyncio.to_thread(self._source.sample)}
        verdicts = {i: self._tracker.assess(s) for i, s in samples.items()}
        out: list[DeviceHealth] = []
        for index, parent in enumerate(self._parents):
            s = samples.get(parent)
            if s is None:
                out.append(DeviceHealth(self.node_id, index, False, "GPU is missing from the sample"))
                continue
            healthy, reason = verdicts[parent]
            out.append(
                DeviceHealth(
                    self.node_id,
                    index,
                    healthy,
                    reason,
                    gpu_util=s.get("gpu_util"),
                    memory_used_mib=s.get("memory_used_mib"),
                    extra={k: v for k, v in s.items() if k not in ("index", "gpu_util", "memory_used_mib")},
                )
            )
        return out

    def clear_device_health(self, node_id: str, index: int) -> bool:
        """Accept the errors seen so far on a device (an operator checked it); False if not ours."""
        if node_id != self.node_id or not 0 <= index < len(self._parents):
            return False
        self._tracker.clear(self._parents[index])
        return True

    async def get_resource_state(self) -> dict[str, Any]:
        return {
            "provider": self.name,
            "node": self.node_id,
            "backend": self.backend,
            "notes": list(self._notes),
            "materialised": dict(self._materialised.active),
        }
