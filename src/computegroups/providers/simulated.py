"""A simulated cluster built from a spec: same decisions as real hardware, no hardware.

Spec (a dict, or a YAML/JSON file)::

    nodes:
      - id: dgx                    # with count > 1, ids are dgx-0, dgx-1, ...
        count: 2                   # how many nodes of this shape (default 1)
        preset: dgx-h100           # or topology: path/to/nvidia-smi-topo.txt (relative to the spec)
        gpu: {model: NVIDIA H100 80GB HBM3, memory_mib: 81559}   # overrides the preset
        gpus: 8                    # GPUs per node where neither preset nor topology says
        cpus: 192
        memory_mib: 2097152
        labels: {zone: a}
        mig: {0: [3g.40gb, 2g.20gb, 1g.10gb, 1g.10gb]}   # GPUs in MIG mode and their devices

Presets: see :data:`PRESETS`. Simulated GPUs get UUIDs derived from the node id
and index, so they are stable across runs and processes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import yaml

from computegroups.config import ClusterSpec, GpuConfig, parse
from computegroups.errors import InvalidRequestError
from computegroups.model import MIG_PROFILE, MILLI, GpuSpec, NodeSpec
from computegroups.providers.base import DeviceHealth, Inventory
from computegroups.providers.materialise import EnvironmentProvider
from computegroups.topology import Topology, parse_nvidia_smi_topo

__all__ = ["PRESETS", "Preset", "SimulatedComputeResourceProvider", "simulated_uuid"]

_UUID_NAMESPACE = uuid.UUID("6f1d3c52-8a0e-4f59-9b51-3d0c0a4c7e21")
MAX_SPEC_BYTES = 16 * 2**20  # a spec file, checked before it is parsed
MAX_TOPOLOGY_BYTES = 2**20  # an `nvidia-smi topo -m` output


def read_text(path: Path, limit: int, what: str, key: str) -> str:
    """A UTF-8 text file of at most ``limit`` bytes, or InvalidRequestError naming it and what is wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise InvalidRequestError(f"{what} {path}: {exc.strerror or exc}", key=key) from exc
    if len(data) > limit:
        raise InvalidRequestError(f"{what} {path}: larger than {limit} bytes", key=key)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"{what} {path}: not UTF-8 text (byte {exc.start})", key=key) from None


@dataclass(frozen=True, slots=True)
class Preset:
    """A node shape: GPU model and memory, topology file (packaged), CPUs and memory."""

    gpu_model: str
    gpu_memory_mib: int
    topology_file: str | None
    cpus: int
    memory_mib: int
    description: str


PRESETS: dict[str, Preset] = {
    "dgx-h100": Preset(
        "NVIDIA H100 80GB HBM3",
        81559,
        "hgx-h100-8.topo",
        192,
        2_097_152,
        "8x H100 SXM on NVSwitch (NV18 between every pair), two NUMA nodes",
    ),
    "hgx-a100": Preset(
        "NVIDIA A100-SXM4-40GB",
        40960,
        "hgx-a100-8.topo",
        96,
        1_179_648,
        "8x A100 SXM on NVSwitch (NV12 between every pair), two NUMA nodes",
    ),
    "pcie-a6000-nvlink-pairs": Preset(
        "NVIDIA RTX A6000",
        49140,
        "pcie-a6000-8-nvlink-pairs.topo",
        128,
        1_048_576,
        "8x RTX A6000 on PCIe, NVLink bridges in pairs (NV4), two NUMA nodes",
    ),
    "cpu-only": Preset("", 0, None, 64, 262_144, "no GPU: 64 cores, 256 GiB"),
}

_topology_cache: dict[str, Topology] = {}


def _preset_topology(filename: str) -> Topology:
    if filename not in _topology_cache:
        text = importlib_resources.files("computegroups.presets").joinpath(filename).read_text()
        topo = parse_nvidia_smi_topo(text)
        topo.name = filename.removesuffix(".topo")
        _topology_cache[filename] = topo
    return _topology_cache[filename]


def _file_topology(path: Path) -> Topology:
    key = str(path.resolve())
    if key not in _topology_cache:
        topo = parse_nvidia_smi_topo(read_text(path, MAX_TOPOLOGY_BYTES, "spec: topology file", "topology"))
        topo.name = path.stem
        _topology_cache[key] = topo
    return _topology_cache[key]


def simulated_uuid(node_id: str, index: int) -> str:
    """A stable GPU UUID for a simulated GPU, formatted like NVML's."""
    return "GPU-" + str(uuid.uuid5(_UUID_NAMESPACE, f"{node_id}/{index}"))


def simulated_mig_uuid(node_id: str, index: int, slot: int) -> str:
    """A stable MIG device UUID, formatted like NVML's."""
    return "MIG-" + str(uuid.uuid5(_UUID_NAMESPACE, f"{node_id}/{index}/mig/{slot}"))


def nodes_from_spec(spec: Mapping[str, Any] | ClusterSpec, base: Path | None = None) -> list[NodeSpec]:
    """Expand a cluster spec (validated by :class:`~computegroups.config.ClusterSpec`) into node specs."""
    cluster = spec if isinstance(spec, ClusterSpec) else parse(ClusterSpec, spec, "spec")
    out: list[NodeSpec] = []
    seen: set[str] = set()
    for n, entry in enumerate(cluster.nodes):
        where = f"spec nodes[{n}]"
        preset = PRESETS[entry.preset] if entry.preset is not None else None
        topology: Topology | None = None
        if entry.topology is not None:
            topology = _file_topology((base or Path.cwd()) / entry.topology)
        elif preset is not None and preset.topology_file:
            topology = _preset_topology(preset.topology_file)
        gpu = entry.gpu or GpuConfig()
        count_given = entry.gpus if entry.gpus is not None else gpu.count
        gpu_count = topology.gpu_count if topology else (count_given or 0)
        model = gpu.model or (preset.gpu_model if preset else "") or ("GPU" if gpu_count else "")
        mem = gpu.memory_mib if gpu.memory_mib is not None else (preset.gpu_memory_mib if preset else 0)
        cpus = entry.cpus if entry.cpus is not None else (preset.cpus if preset else 0)
        memory = entry.memory_mib if entry.memory_mib is not None else (preset.memory_mib if preset else 0)
        mig = dict(entry.mig or {})
        missing = next((i for i in mig if i >= gpu_count), None)
        if missing is not None:
            raise InvalidRequestError(f"{where}.mig: GPU {missing} does not exist", key="mig")
        if mig and topology is None:
            topology = Topology.uniform(gpu_count, "SYS")
        labels = entry.label_map()
        base_id = entry.id or f"node{n}"
        for r in range(entry.count):
            node_id = base_id if entry.count == 1 else f"{base_id}-{r}"
            if node_id in seen:
                raise InvalidRequestError(f"{where}.id: duplicate node id {node_id!r}", key="id")
            seen.add(node_id)
            gpus: list[GpuSpec] = []
            parents: list[int] = []
            for i in range(gpu_count):
                whole = GpuSpec(
                    index=len(gpus),
                    uuid=simulated_uuid(node_id, i),
                    name=model,
                    memory_mib=mem,
                    pci_bus_id=f"00000000:{0x10 + i:02X}:00.0",
                    numa_node=topology.numa_node(i) if topology else None,
                    parent_index=i if mig else None,
                )
                if i not in mig:
                    gpus.append(whole)
                    parents.append(i)
                    continue
                for slot, profile in enumerate(mig[i]):
                    gpus.append(
                        GpuSpec(
                            index=len(gpus),
                            uuid=simulated_mig_uuid(node_id, i, slot),
                            name=f"{model} MIG {profile}",
                            memory_mib=int(MIG_PROFILE.fullmatch(profile).group(2)) * 1024,  # type: ignore[union-attr]
                            pci_bus_id=whole.pci_bus_id,
                            numa_node=whole.numa_node,
                            mig_profile=profile,
                            parent_index=i,
                            parent_uuid=whole.uuid,
                        )
                    )
                    parents.append(i)
            node_topology = topology.project(parents, name=f"{topology.name}-mig") if mig and topology else topology
            out.append(
                NodeSpec(
                    id=node_id,
                    gpus=tuple(gpus),
                    topology=node_topology,
                    cpus_milli=round(float(cpus) * MILLI),
                    memory_mib=memory,
                    labels=labels,
                )
            )
    return out


def load_spec(path: str | Path, what: str = "spec") -> tuple[dict[str, Any], Path]:
    """Read a YAML or JSON spec file (or another configuration file: ``what`` names it in errors, and is their key)."""
    p = Path(path)
    text = read_text(p, MAX_SPEC_BYTES, what, what)
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InvalidRequestError(
            f"{what} {p}: not valid YAML: {exc.problem or exc.context}{where}", key=what
        ) from None
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidRequestError(f"{what} {p}: not valid YAML/JSON: {' '.join(str(exc).split())}", key=what) from None
    return data, p.parent


DEFAULT_SPEC: dict[str, Any] = {
    "nodes": [
        {"id": "dgx", "count": 2, "preset": "dgx-h100", "labels": {"pool": "serving"}},
        {"id": "a6000", "count": 2, "preset": "pcie-a6000-nvlink-pairs", "labels": {"pool": "dev"}},
        {"id": "cpu", "count": 1, "preset": "cpu-only"},
    ]
}


class SimulatedComputeResourceProvider(EnvironmentProvider):
    """Nodes from a spec; materialisation is the environment alone."""

    name = "simulated"

    def __init__(self, nodes: list[NodeSpec]) -> None:
        self._nodes = nodes
        super().__init__()
        self._health: dict[tuple[str, int], DeviceHealth] = {}
        self._changed = asyncio.Event()

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any] | str | Path | None = None) -> SimulatedComputeResourceProvider:
        """Build from a spec dict or a YAML/JSON file path; None gives the built-in demo cluster."""
        if spec is None:
            return cls(nodes_from_spec(DEFAULT_SPEC))
        if isinstance(spec, str | Path):
            data, base = load_spec(spec)
            return cls(nodes_from_spec(data, base))
        return cls(nodes_from_spec(spec))

    async def discover_resources(self) -> Inventory:
        return Inventory(tuple(self._nodes), source="simulated")

    async def get_resource_state(self) -> dict[str, Any]:
        return {
            "provider": self.name,
            "nodes": len(self._nodes),
            "materialised": dict(self._materialised.active),
            "unhealthy": [f"{h.node_id}/{h.index}: {h.reason}" for h in self._health.values() if not h.healthy],
        }

    def set_health(self, node_id: str, index: int, healthy: bool, reason: str = "") -> None:
        """Simulate a device turning unhealthy (or recovering): an open manager takes it in at once, as
        it does what a Kubernetes provider's watches deliver (:meth:`changes`), and so does a sample."""
        self._health[(node_id, index)] = DeviceHealth(node_id, index, healthy, reason)
        self._changed.set()

    def changes(self) -> asyncio.Event:
        return self._changed

    async def sample_health(self) -> list[DeviceHealth]:
        return list(self._health.values())
