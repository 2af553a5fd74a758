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

import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources as importlib_resources
from pathlib import Path
from typing import Any

import yaml

from computegroups.errors import InvalidRequestError, one_of
from computegroups.model import MAX_CPUS, MAX_GPUS, MAX_MEMORY_MIB, MILLI, GpuSpec, NodeSpec
from computegroups.providers.base import DeviceHealth, Inventory
from computegroups.providers.materialise import EnvironmentProvider
from computegroups.topology import Topology, parse_nvidia_smi_topo

__all__ = ["PRESETS", "Preset", "SimulatedComputeResourceProvider", "simulated_uuid"]

_UUID_NAMESPACE = uuid.UUID("6f1d3c52-8a0e-4f59-9b51-3d0c0a4c7e21")
MAX_SPEC_BYTES = 16 * 2**20  # a spec file, checked before it is parsed
MAX_TOPOLOGY_BYTES = 2**20  # an `nvidia-smi topo -m` output
MAX_NODES = 100_000  # nodes of one spec


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


_NODE_KEYS = ("id", "count", "preset", "topology", "gpu", "gpus", "cpus", "memory_mib", "labels", "mig")
_MIG_PROFILE = re.compile(r"^(\d+)g\.(\d+)gb(\+me)?$")


def simulated_mig_uuid(node_id: str, index: int, slot: int) -> str:
    """A stable MIG device UUID, formatted like NVML's."""
    return "MIG-" + str(uuid.uuid5(_UUID_NAMESPACE, f"{node_id}/{index}/mig/{slot}"))


def _mig_layout(value: object, gpu_count: int, where: str) -> dict[int, list[str]]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{where}.mig: not a mapping of GPU index to MIG profiles", key="mig")
    out: dict[int, list[str]] = {}
    for k, profiles in value.items():
        try:
            index = int(k)
        except (TypeError, ValueError):
            raise InvalidRequestError(f"{where}.mig: {k!r} is not a GPU index", key="mig") from None
        if not 0 <= index < gpu_count:
            raise InvalidRequestError(f"{where}.mig: GPU {index} does not exist", key="mig")
        if not isinstance(profiles, list) or not profiles:
            raise InvalidRequestError(f"{where}.mig.{index}: not a list of profiles", key="mig")
        slices = 0
        for p in profiles:
            m = _MIG_PROFILE.match(p) if isinstance(p, str) else None
            if m is None:
                raise InvalidRequestError(f"{where}.mig.{index}: {p!r} is not a MIG profile like 1g.10gb", key="mig")
            slices += int(m.group(1))
        if slices > 7:
            raise InvalidRequestError(f"{where}.mig.{index}: more than 7 compute slices", key="mig")
        out[index] = list(profiles)
    return out


_MAXIMA = {"gpus": MAX_GPUS, "count": MAX_NODES, "memory_mib": MAX_MEMORY_MIB}


def _int(entry: Mapping[str, Any], key: str, default: int, where: str) -> int:
    value = entry.get(key, default)
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 <= value <= _MAXIMA.get(key, MAX_MEMORY_MIB)
        or value != int(value)
    ):
        shown = repr(value) if len(repr(value)) < 40 else repr(value)[:37] + "..."
        raise InvalidRequestError(
            f"{where}.{key}: {shown} is not a whole number in 0..{_MAXIMA.get(key, MAX_MEMORY_MIB)}", key=key
        )
    return int(value)


def nodes_from_spec(spec: Mapping[str, Any], base: Path | None = None) -> list[NodeSpec]:
    """Expand a cluster spec into node specs (validating every key)."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("nodes"), list):
        raise InvalidRequestError("spec: expected a mapping with a 'nodes' list", key="nodes")
    out: list[NodeSpec] = []
    seen: set[str] = set()
    for n, entry in enumerate(spec["nodes"]):
        where = f"spec.nodes[{n}]"
        if not isinstance(entry, Mapping):
            raise InvalidRequestError(f"{where}: not a mapping", key="nodes")
        unknown = sorted(set(entry) - set(_NODE_KEYS))
        if unknown:
            raise InvalidRequestError(
                f"{where}.{unknown[0]}: unknown key; allowed: {one_of(_NODE_KEYS)}", key=unknown[0]
            )
        preset: Preset | None = None
        if "preset" in entry:
            if entry["preset"] not in PRESETS:
                raise InvalidRequestError(
                    f"{where}.preset: {entry['preset']!r} is not one of {one_of(sorted(PRESETS))}", key="preset"
                )
            preset = PRESETS[entry["preset"]]
        topology: Topology | None = None
        if "topology" in entry:
            topology = _file_topology((base or Path.cwd()) / str(entry["topology"]))
        elif preset is not None and preset.topology_file:
            topology = _preset_topology(preset.topology_file)
        gpu = entry.get("gpu") or {}
        if not isinstance(gpu, Mapping):
            raise InvalidRequestError(f"{where}.gpu: not a mapping", key="gpu")
        gpu_count = topology.gpu_count if topology else _int({**gpu, **entry}, "gpus", gpu.get("count", 0), where)
        model = str(gpu.get("model") or (preset.gpu_model if preset else "") or ("GPU" if gpu_count else ""))
        mem = _int(gpu, "memory_mib", preset.gpu_memory_mib if preset else 0, f"{where}.gpu")
        cpus = entry.get("cpus", preset.cpus if preset else 0)
        if isinstance(cpus, bool) or not isinstance(cpus, int | float) or not 0 <= cpus <= MAX_CPUS:
            raise InvalidRequestError(f"{where}.cpus: {cpus!r:.40} is not a number in 0..{MAX_CPUS}", key="cpus")
        memory = _int(entry, "memory_mib", preset.memory_mib if preset else 0, where)
        labels = entry.get("labels") or {}
        if not isinstance(labels, Mapping):
            raise InvalidRequestError(f"{where}.labels: not a mapping", key="labels")
        count = _int(entry, "count", 1, where)
        base_id = str(entry.get("id") or f"node{n}")
        mig = _mig_layout(entry.get("mig"), gpu_count, where)
        if mig and topology is None:
            topology = Topology.uniform(gpu_count, "SYS")
        for r in range(count):
            node_id = base_id if count == 1 else f"{base_id}-{r}"
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
                            memory_mib=int(_MIG_PROFILE.match(profile).group(2)) * 1024,  # type: ignore[union-attr]
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
                    labels={str(k): str(v) for k, v in labels.items()},
                )
            )
    return out


def load_spec(path: str | Path) -> tuple[dict[str, Any], Path]:
    """Read a YAML or JSON spec file."""
    p = Path(path)
    text = read_text(p, MAX_SPEC_BYTES, "spec", "spec")
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise InvalidRequestError(
            f"spec {p}: not valid YAML: {exc.problem or exc.context}{where}", key="spec"
        ) from None
    except (ValueError, yaml.YAMLError) as exc:
        raise InvalidRequestError(f"spec {p}: not valid YAML/JSON: {' '.join(str(exc).split())}", key="spec") from None
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
        """Simulate a device turning unhealthy (or recovering); the monitor picks it up."""
        self._health[(node_id, index)] = DeviceHealth(node_id, index, healthy, reason)

    async def sample_health(self) -> list[DeviceHealth]:
        return list(self._health.values())
