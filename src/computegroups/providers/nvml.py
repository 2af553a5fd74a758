"""NVML behind one narrow interface: everything NVML-specific lives here.

:class:`NvmlSource` is the interface (a handful of questions about GPUs).
:class:`RealNvml` answers them through ``nvidia-ml-py`` (module ``pynvml``).
:func:`discover_gpus` turns the answers into :class:`GpuSpec` s and a
:class:`Topology` equal to what ``nvidia-smi topo -m`` shows.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any, Protocol

from computegroups.model import GpuSpec
from computegroups.topology import Topology

__all__ = ["NvmlSource", "NvmlUnavailable", "RealNvml", "discover_gpus"]

# nvmlGpuTopologyLevel_t -> nvidia-smi's name for the path between two GPUs.
ANCESTOR_NAMES = {0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}


class NvmlUnavailable(Exception):
    """NVML cannot be used here; ``str(exc)`` says why (no library, no driver, no GPU)."""


class NvmlSource(Protocol):
    """The questions discovery asks about GPUs; one real and one replaying implementation."""

    def device_count(self) -> int: ...
    def device_info(self, index: int) -> dict[str, Any]:
        """uuid, name, memory_total_mib, pci_bus_id, compute_capability, numa_node, cpu_affinity."""
        ...

    def common_ancestor(self, a: int, b: int) -> int:
        """nvmlDeviceGetTopologyCommonAncestor level between GPUs a and b."""
        ...

    def nvlinks(self, index: int) -> list[dict[str, Any]]:
        """Active NVLinks of a GPU: [{"link": n, "remote_bus_id": str, "remote_type": "gpu"|"switch"}]."""
        ...

    def close(self) -> None: ...


class RealNvml:
    """NVML through nvidia-ml-py. Raises NvmlUnavailable on construction if NVML cannot start."""

    def __init__(self) -> None:
        try:
            import pynvml
        except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
            raise NvmlUnavailable(f"nvidia-ml-py is not installed: {exc}") from exc
        self._nv = pynvml
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise NvmlUnavailable(f"NVML did not initialise: {exc} (is the NVIDIA driver installed?)") from exc
        self._handles: dict[int, Any] = {}

    def _h(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = self._nv.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    def device_count(self) -> int:
        return int(self._nv.nvmlDeviceGetCount())

    def device_info(self, index: int) -> dict[str, Any]:
        nv, h = self._nv, self._h(index)
        pci = nv.nvmlDeviceGetPciInfo_v3(h) if hasattr(nv, "nvmlDeviceGetPciInfo_v3") else nv.nvmlDeviceGetPciInfo(h)
        bus = pci.busId.decode() if isinstance(pci.busId, bytes) else str(pci.busId)
        try:
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
            cc = f"{major}.{minor}"
        except nv.NVMLError:
            cc = ""
        return {
            "uuid": _s(nv.nvmlDeviceGetUUID(h)),
            "name": _s(nv.nvmlDeviceGetName(h)),
            "memory_total_mib": int(nv.nvmlDeviceGetMemoryInfo(h).total) // (1024 * 1024),
            "pci_bus_id": bus,
            "compute_capability": cc,
            "numa_node": _sysfs_numa(bus),
            "cpu_affinity": _cpu_affinity(nv, h),
        }

    def common_ancestor(self, a: int, b: int) -> int:
        return int(self._nv.nvmlDeviceGetTopologyCommonAncestor(self._h(a), self._h(b)))

    def nvlinks(self, index: int) -> list[dict[str, Any]]:
        nv, h = self._nv, self._h(index)
        out: list[dict[str, Any]] = []
        for link in range(getattr(nv, "NVML_NVLINK_MAX_LINKS", 18)):
            try:
                if nv.nvmlDeviceGetNvLinkState(h, link) != nv.NVML_FEATURE_ENABLED:
                    continue
                remote = nv.nvmlDeviceGetNvLinkRemotePciInfo_v2(h, link)
            except nv.NVMLError:
                continue
            try:
                rtype = nv.nvmlDeviceGetNvLinkRemoteDeviceType(h, link)
                kind = "switch" if rtype == getattr(nv, "NVML_NVLINK_DEVICE_TYPE_SWITCH", 2) else "gpu"
            except (nv.NVMLError, AttributeError):
                kind = "gpu"
            out.append({"link": link, "remote_bus_id": _s(remote.busId), "remote_type": kind})
        return out

    def close(self) -> None:
        with contextlib.suppress(self._nv.NVMLError):
            self._nv.nvmlShutdown()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _sysfs_numa(bus_id: str) -> int | None:
    # NVML prints an 8-digit domain; sysfs uses 4 digits, lower case.
    short = bus_id.lower()[-12:] if len(bus_id) > 12 else bus_id.lower()
    try:
        with open(f"/sys/bus/pci/devices/{short}/numa_node") as f:
            node = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _cpu_affinity(nv: Any, h: Any) -> list[int]:
    import os

    words = max(1, ((os.cpu_count() or 64) + 63) // 64)
    try:
        masks = nv.nvmlDeviceGetCpuAffinity(h, words)
    except nv.NVMLError:
        return []
    return [w * 64 + b for w, m in enumerate(masks) for b in range(64) if int(m) >> b & 1]


def _norm_bus(bus: str) -> str:
    return bus.lower()[-12:]


def discover_gpus(source: NvmlSource) -> tuple[list[GpuSpec], Topology]:
    """Read every GPU and the link between every pair, nvidia-smi's way."""
    n = source.device_count()
    infos = [source.device_info(i) for i in range(n)]
    bus_to_index = {_norm_bus(info["pci_bus_id"]): i for i, info in enumerate(infos)}
    direct: list[dict[int, int]] = [dict() for _ in range(n)]
    switch_links = [0] * n
    for i in range(n):
        for link in source.nvlinks(i):
            if link["remote_type"] == "switch":
                switch_links[i] += 1
                continue
            j = bus_to_index.get(_norm_bus(link["remote_bus_id"]))
            if j is not None:
                direct[i][j] = direct[i].get(j, 0) + 1
    links: list[list[str]] = [["X"] * n for _ in range(n)]
    for i in range(n):
        for j in range(i + 1, n):
            count = direct[i].get(j, 0) + min(switch_links[i], switch_links[j])
            name = f"NV{count}" if count else ANCESTOR_NAMES.get(source.common_ancestor(i, j), "SYS")
            links[i][j] = links[j][i] = name
    gpus = [
        GpuSpec(
            index=i,
            uuid=info["uuid"],
            name=info["name"],
            memory_mib=int(info["memory_total_mib"]),
            pci_bus_id=info["pci_bus_id"],
            numa_node=info.get("numa_node"),
            compute_capability=info.get("compute_capability", ""),
        )
        for i, info in enumerate(infos)
    ]
    topo = Topology(links, [g.numa_node for g in gpus], [info.get("cpu_affinity", []) for info in infos], name="nvml")
    return gpus, topo


def numa_nodes(gpus: Sequence[GpuSpec]) -> list[int | None]:
    return [g.numa_node for g in gpus]
