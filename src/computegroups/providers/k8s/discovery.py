"""Pure discovery: Kubernetes nodes, pods, ResourceSlices and ResourceClaims -> node specs.

Nothing here does I/O; :class:`~computegroups.providers.kubernetes.KubernetesComputeResourceProvider`
lists the objects and passes them in, so every rule below is tested on plain dicts.

Rules:
  * A node is a GPU node when it has allocatable ``nvidia.com/gpu`` or devices of the
    ``gpu.nvidia.com`` DRA driver in a ResourceSlice.
  * With DRA slices, each device becomes a :class:`GpuSpec` with its UUID, product, memory
    and PCIe root (NUMA node from ``resource.kubernetes.io/numaNode``), ordered by its ``index``
    attribute (else by name). Devices allocated to a ResourceClaim that is not ours are
    reported taken. Topology: GPUs in one NVLink clique
    (``cliqueId``) are joined by NVLink; otherwise GPUs under one PCIe root are ``PXB``, the
    rest ``SYS``.
  * Without slices, a node has ``allocatable nvidia.com/gpu`` GPU slots with synthetic stable
    ids (``k8s-<node>-gpu<i>``); the GPU Feature Discovery labels give model and memory, and
    the topology is unknown (uniform). The device plugin, not us, picks the physical GPU, so
    what other pods hold is a count: that many slots are reported taken, chosen among the
    slots our own groups do not hold (``held``), highest first and stable from one
    discovery to the next (``previous``). A device is never dropped nor renumbered because
    of what another workload holds.
  * A device that allows multiple allocations and publishes a ``shares`` capacity (1000 per
    GPU) takes shares of a GPU as DRA consumable-capacity claims (:func:`share_capacity`).
  * CPU and memory are allocatable less the requests of pods that are not ours.
  * Cordoned: ``spec.unschedulable`` or a NoSchedule/NoExecute taint the provider does not tolerate.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from typing import Any

from computegroups.kube.names import STORE_LABEL
from computegroups.model import MILLI, GpuSpec, NodeSpec
from computegroups.topology import Topology

__all__ = [
    "CLIQUE_LABEL",
    "DRA_DRIVER",
    "GPU_RESOURCE",
    "MANAGED_BY",
    "SHARES_CAPACITY",
    "Discovered",
    "build_node_specs",
    "dra_topology",
    "node_health",
    "parse_quantity",
    "pick_taken",
    "pod_requests",
    "product_name",
    "share_capacity",
    "synthetic_uuid",
    "tolerates",
]

GPU_RESOURCE = "nvidia.com/gpu"
DRA_DRIVER = "gpu.nvidia.com"
CLIQUE_LABEL = "nvidia.com/gpu.clique"
PRODUCT_LABEL = "nvidia.com/gpu.product"
MEMORY_LABEL = "nvidia.com/gpu.memory"
COUNT_LABEL = "nvidia.com/gpu.count"
PCIE_ROOT = "resource.kubernetes.io/pcieRoot"
NUMA_NODE = "resource.kubernetes.io/numaNode"
#: The consumable capacity of a shareable DRA device that counts GPU shares: 1000 (MILLI) a GPU.
SHARES_CAPACITY = "shares"
MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER_NAME = "computegroups"
#: The bond width of an NVLink clique is not published by the driver; any NV link outranks PCIe.
CLIQUE_LINK = "NV1"

Obj = Mapping[str, Any]

_SUFFIX = {
    "Ki": Decimal(1024),
    "Mi": Decimal(1024) ** 2,
    "Gi": Decimal(1024) ** 3,
    "Ti": Decimal(1024) ** 4,
    "Pi": Decimal(1024) ** 5,
    "Ei": Decimal(1024) ** 6,
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal(1000),
    "M": Decimal(1000) ** 2,
    "G": Decimal(1000) ** 3,
    "T": Decimal(1000) ** 4,
    "P": Decimal(1000) ** 5,
    "E": Decimal(1000) ** 6,
}
_QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)$")


def parse_quantity(value: object) -> Decimal:
    """A Kubernetes quantity (``"8"``, ``"500m"``, ``"81559Mi"``, ``"2Ti"``) as a Decimal; bad input is 0."""
    if isinstance(value, int | float):
        return Decimal(str(value))
    m = _QUANTITY.match(str(value).strip())
    if not m:
        return Decimal(0)
    number, suffix = m.groups()
    try:
        return Decimal(number) * _SUFFIX.get(suffix, Decimal(1) if not suffix else Decimal(0))
    except InvalidOperation:
        return Decimal(0)


def _mib(value: object) -> int:
    return int(parse_quantity(value) / (Decimal(1024) ** 2))


def _milli(value: object) -> int:
    return int(parse_quantity(value) * MILLI)


def product_name(label: str) -> str:
    """GPU Feature Discovery writes ``NVIDIA-H100-80GB-HBM3`` for ``NVIDIA H100 80GB HBM3``; undo that."""
    return label.replace("-", " ").strip()


def synthetic_uuid(node: str, index: int) -> str:
    """A stable id for GPU slot ``index`` of a node without DRA (the device plugin picks the real GPU)."""
    return f"k8s-{node}-gpu{index}"


#: (namespace, store name) of the state whose pods and claims are ours; None: anything computegroups made
Store = tuple[str, str] | None


def is_ours(obj: Obj, store: Store = None) -> bool:
    """Made by computegroups for ``store``: in its namespace, labelled with it (or with no store: older)."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY) != MANAGER_NAME:
        return False
    if store is None:
        return True
    return meta.get("namespace") == store[0] and labels.get(STORE_LABEL, store[1]) == store[1]


def pod_requests(pod: Obj) -> tuple[int, int, int]:
    """(GPUs, CPU millicores, memory MiB) a pod holds on its node: the larger of its containers'
    sum and its biggest init container, as the scheduler counts."""

    def of(container: Obj) -> tuple[int, int, int]:
        res = container.get("resources") or {}
        lim = res.get("limits") or {}
        req = {**lim, **(res.get("requests") or {})}
        gpus = int(parse_quantity(lim.get(GPU_RESOURCE, req.get(GPU_RESOURCE, 0))))
        return gpus, _milli(req.get("cpu", 0)), _mib(req.get("memory", 0))

    spec = pod.get("spec") or {}
    main = [of(c) for c in spec.get("containers") or []]
    init = [of(c) for c in spec.get("initContainers") or []]
    totals = tuple(sum(x[i] for x in main) for i in range(3))
    return tuple(max([totals[i], *(x[i] for x in init)]) for i in range(3))  # type: ignore[return-value]


def tolerates(taint: Obj, tolerations: Sequence[Obj]) -> bool:
    """Whether one of ``tolerations`` tolerates ``taint`` (core/v1 matching rules)."""
    for t in tolerations:
        if t.get("effect") and t.get("effect") != taint.get("effect"):
            continue
        key = t.get("key")
        if key and key != taint.get("key"):
            continue
        op = t.get("operator", "Equal")
        if op == "Exists" or (key and t.get("value", "") == taint.get("value", "")):
            return True
    return False


def node_cordoned(node: Obj, tolerations: Sequence[Obj] = ()) -> str:
    """Why a node takes nothing new (``""``: it does): unschedulable or an untolerated taint."""
    spec = node.get("spec") or {}
    if spec.get("unschedulable"):
        return "cordoned (spec.unschedulable)"
    for taint in spec.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not tolerates(taint, tolerations):
            return f"taint {taint.get('key')}={taint.get('value', '')}:{taint.get('effect')}"
    return ""


def node_view(node: Obj) -> object:
    """What discovery reads of a Node (labels, spec, allocatable and capacity, conditions without their
    times): a change that leaves it equal, such as a kubelet's status heartbeat, changes nothing."""
    meta, status = node.get("metadata") or {}, node.get("status") or {}
    conditions = [
        (c.get("type"), c.get("status"), c.get("reason"), c.get("message")) for c in status.get("conditions") or []
    ]
    return (meta.get("labels"), node.get("spec"), status.get("allocatable"), status.get("capacity"), conditions)


def node_health(node: Obj) -> str:
    """``""`` if the node is Ready, else why not (``Ready=False: KubeletNotReady``)."""
    for c in (node.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready":
            if c.get("status") == "True":
                return ""
            return f"node Ready={c.get('status')}: {c.get('reason') or c.get('message') or 'no reason given'}"
    return "node has no Ready condition"


def _attr(device: Obj, name: str) -> Any:
    value = (device.get("attributes") or {}).get(name) or (device.get("attributes") or {}).get(f"{DRA_DRIVER}/{name}")
    if not isinstance(value, Mapping):
        return None
    for kind in ("string", "int", "bool", "version"):
        if kind in value:
            return value[kind]
    return None


def device_taint(device: Obj) -> str:
    """A DRA device taint that keeps new work off the device (``""``: none)."""
    for taint in device.get("taints") or []:
        if taint.get("effect") in ("NoSchedule", "NoExecute"):
            return f"device taint {taint.get('key')}={taint.get('value', '')}:{taint.get('effect')}"
    return ""


def share_capacity(device: Obj, share_milli: int, memory_mib: int = 0) -> dict[str, str] | None:
    """The ``capacity.requests`` a share of ``device`` asks for (None: the device takes no shares).

    A device takes shares when it allows multiple allocations and publishes :data:`SHARES_CAPACITY`.
    Every capacity is requested, since one left out is consumed whole: the shares, the group's GPU
    memory, and that proportion of any other capacity.
    """
    capacity = device.get("capacity") or {}
    if device.get("allowMultipleAllocations") is not True or SHARES_CAPACITY not in capacity:
        return None
    out: dict[str, str] = {}
    for name, cap in sorted(capacity.items()):
        if name == SHARES_CAPACITY:
            out[name] = str(share_milli)
        elif name == "memory" and memory_mib > 0:
            out[name] = f"{memory_mib}Mi"
        else:
            out[name] = str(int(parse_quantity((cap or {}).get("value", 0)) * share_milli / MILLI))
    return out


def dra_topology(devices: Sequence[Obj]) -> Topology:
    """Links between DRA devices: NVLink within a clique, PXB under one PCIe root, SYS otherwise."""
    n = len(devices)
    roots = [_attr(d, PCIE_ROOT) for d in devices]
    cliques = [_attr(d, "cliqueId") for d in devices]
    links: list[list[str]] = [["X"] * n for _ in range(n)]
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            if cliques[i] and cliques[i] == cliques[j]:
                links[i][j] = CLIQUE_LINK
            elif roots[i] and roots[i] == roots[j]:
                links[i][j] = "PXB"
            else:
                links[i][j] = "SYS"
    return Topology(links, name="dra")


_TOPOLOGY_CACHE: dict[tuple[tuple[str, str], ...], Topology] = {}


def _shared_topology(devices: Sequence[Obj]) -> Topology:
    """Nodes of one shape share one Topology object, hence one decision cache."""
    key = tuple((str(_attr(d, PCIE_ROOT) or ""), str(_attr(d, "cliqueId") or "")) for d in devices)
    if key not in _TOPOLOGY_CACHE:
        _TOPOLOGY_CACHE[key] = dra_topology(devices)
    return _TOPOLOGY_CACHE[key]


def _device_order(device: Obj) -> tuple[int, str]:
    index = _attr(device, "index")
    name = str(device.get("name", ""))
    digits = re.findall(r"\d+", name)
    return (int(index) if isinstance(index, int) else int(digits[-1]) if digits else 1 << 30, name)


@dataclass
class Discovered:
    """Node specs plus what the provider needs to act on them."""

    nodes: list[NodeSpec] = field(default_factory=list)
    cordoned: dict[str, str] = field(default_factory=dict)  # node -> reason
    dra_nodes: set[str] = field(default_factory=set)
    devices: dict[tuple[str, int], Obj] = field(default_factory=dict)  # (node, index) -> DRA device
    notes: list[str] = field(default_factory=list)
    raw_nodes: dict[str, Obj] = field(default_factory=dict)  # name -> the Node object
    #: (node, GPU index) -> why another workload holds it ("taken: ..."): not allocatable, not free
    taken: dict[tuple[str, int], str] = field(default_factory=dict)


def claimed_devices(claims: Iterable[Obj], store: Store = None) -> dict[tuple[str, str], str]:
    """(pool, device) -> claim of the ``gpu.nvidia.com`` devices held by ResourceClaims that are not ours."""
    out: dict[tuple[str, str], str] = {}
    for claim in claims:
        if is_ours(claim, store):
            continue
        meta = claim.get("metadata") or {}
        alloc = (claim.get("status") or {}).get("allocation") or {}
        for r in (alloc.get("devices") or {}).get("results") or []:
            if r.get("driver") == DRA_DRIVER:
                out[(str(r.get("pool")), str(r.get("device")))] = f"{meta.get('namespace')}/{meta.get('name')}"
    return out


def pick_taken(total: int, count: int, held: Iterable[int] = (), previous: Iterable[int] = ()) -> list[int]:
    """Which ``count`` of a device-plugin node's ``total`` GPU slots to report taken by others.

    Slots our groups hold (``held``) are never chosen while others are left; slots taken last
    time (``previous``) stay taken, then the highest free ones are added (placement fills from
    the lowest index, so the two meet last). Sorted; deterministic.
    """
    count = max(0, min(count, total))
    ours = {i for i in held if 0 <= i < total}
    keep = [i for i in sorted(set(previous)) if 0 <= i < total and i not in ours][:count]
    rest = [i for i in range(total - 1, -1, -1) if i not in ours and i not in keep]
    chosen = keep + rest[: count - len(keep)]
    if len(chosen) < count:  # others hold more than we left: then some of our slots are taken too
        chosen += [i for i in range(total - 1, -1, -1) if i in ours][: count - len(chosen)]
    return sorted(chosen)


def build_node_specs(
    nodes: Iterable[Obj],
    pods: Iterable[Obj] = (),
    slices: Iterable[Obj] = (),
    claims: Iterable[Obj] = (),
    *,
    tolerations: Sequence[Obj] = (),
    include_cpu_nodes: bool = False,
    held: Mapping[str, Iterable[int]] | None = None,
    previous: Mapping[tuple[str, int], str] | None = None,
    store: Store = None,
) -> Discovered:
    """Node specs from API objects (see the module docstring for the rules). Sorted by node name.

    ``held``: node -> GPU indices our live groups hold there (device-plugin nodes only);
    ``previous``: the ``taken`` marks of the last discovery, kept where still true;
    ``store``: whose pods and claims are ours (those of another store are another workload).
    """
    out = Discovered()
    used_by: dict[str, list[int]] = {}
    holders: dict[str, list[str]] = {}
    for pod in pods:
        node = (pod.get("spec") or {}).get("nodeName")
        phase = (pod.get("status") or {}).get("phase")
        if not node or phase in ("Succeeded", "Failed") or is_ours(pod, store):
            continue
        n_gpus, cpu, mem = pod_requests(pod)
        acc = used_by.setdefault(node, [0, 0, 0])
        acc[0] += n_gpus
        acc[1] += cpu
        acc[2] += mem
        if n_gpus:
            meta = pod.get("metadata") or {}
            holders.setdefault(node, []).append(f"{meta.get('namespace')}/{meta.get('name')}")
    by_node: dict[str, list[Obj]] = {}
    for s in slices:
        spec = s.get("spec") or {}
        if spec.get("driver") != DRA_DRIVER or not spec.get("nodeName"):
            continue
        pool = str((spec.get("pool") or {}).get("name") or spec["nodeName"])
        for d in spec.get("devices") or []:
            by_node.setdefault(str(spec["nodeName"]), []).append({**d, "_pool": pool})
    taken = claimed_devices(claims, store)
    for node in sorted(nodes, key=lambda n: str((n.get("metadata") or {}).get("name"))):
        meta = node.get("metadata") or {}
        name = str(meta.get("name"))
        out.raw_nodes[name] = node
        labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
        alloc = (node.get("status") or {}).get("allocatable") or {}
        used = used_by.get(name, [0, 0, 0])
        cpus = max(0, _milli(alloc.get("cpu", 0)) - used[1])
        memory = max(0, _mib(alloc.get("memory", 0)) - used[2])
        devices = sorted(by_node.get(name, []), key=_device_order)
        gpus: list[GpuSpec]
        topology: Topology | None = None
        if devices:
            out.dra_nodes.add(name)
            gpus = []
            for i, d in enumerate(devices):
                who = taken.get((d["_pool"], str(d.get("name"))))
                if who:
                    out.taken[(name, i)] = f"taken: allocated to ResourceClaim {who}"
                    out.notes.append(f"{name}: {d.get('name')} is allocated to ResourceClaim {who}; taken")
                memory_q = ((d.get("capacity") or {}).get("memory") or {}).get("value")
                numa = _attr(d, NUMA_NODE)
                gpus.append(
                    GpuSpec(
                        index=i,
                        uuid=str(_attr(d, "uuid") or synthetic_uuid(name, i)),
                        name=product_name(str(_attr(d, "productName") or labels.get(PRODUCT_LABEL, "GPU"))),
                        memory_mib=_mib(memory_q) if memory_q else int(labels.get(MEMORY_LABEL, "0") or 0),
                        pci_bus_id=str(_attr(d, "pcieBusID") or ""),
                        numa_node=numa if isinstance(numa, int) and not isinstance(numa, bool) else None,
                        compute_capability=str(_attr(d, "cudaComputeCapability") or ""),
                        nvlink_domain=str(_attr(d, "cliqueId") or labels.get(CLIQUE_LABEL, "")),
                    )
                )
                out.devices[(name, i)] = d
            topology = _shared_topology(devices) if devices else None
        else:
            total = int(parse_quantity(alloc.get(GPU_RESOURCE, 0)))
            if used[0] and total:
                others = min(used[0], total)
                who = ", ".join(sorted(holders.get(name, [])))
                out.notes.append(f"{name}: {others} of {total} GPUs are requested by other pods")
                before = [i for (n, i) in (previous or {}) if n == name]
                for i in pick_taken(total, others, (held or {}).get(name, ()), before):
                    out.taken[(name, i)] = f"taken: {others} of {total} GPUs are requested by other pods ({who})"
            gpus = [
                GpuSpec(
                    index=i,
                    uuid=synthetic_uuid(name, i),
                    name=product_name(labels.get(PRODUCT_LABEL, "GPU")),
                    memory_mib=int(labels.get(MEMORY_LABEL, "0") or 0) if labels.get(MEMORY_LABEL, "").isdigit() else 0,
                    nvlink_domain=labels.get(CLIQUE_LABEL, ""),
                )
                for i in range(total)
            ]
            if not total and not include_cpu_nodes:
                continue
        reason = node_cordoned(node, tolerations)
        if reason:
            out.cordoned[name] = reason
        out.nodes.append(
            NodeSpec(id=name, gpus=tuple(gpus), topology=topology, cpus_milli=cpus, memory_mib=memory, labels=labels)
        )
    return out
