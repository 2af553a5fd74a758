"""NVML behind one narrow interface: everything NVML-specific lives here.

:class:`NvmlSource` is the interface: a handful of questions about the GPUs of
this machine (what they are, how they are linked, how they are doing). It has
three implementations:

* :class:`RealNvml` answers through ``nvidia-ml-py`` (module ``pynvml``); every
  ``pynvml`` error is translated here, nowhere else.
* :class:`ReplayNvml` answers from a recording: a JSON document of what each
  interface call returned on a real machine, plus a time series of health
  samples and scripted events (an XID, a double-bit ECC error, a lost GPU).
* :class:`RecordingNvml` wraps another source and writes down its answers; this
  is what ``scripts/record-gpu-machine`` uses.

:func:`discover_gpus` turns the answers into :class:`GpuSpec` s and a
:class:`Topology` equal to what ``nvidia-smi topo -m`` prints for the same
machine; :func:`discover_machine` adds MIG devices and P2P status.
:class:`HealthTracker` turns health samples into a verdict per device.

Recording format (``computegroups/nvml-recording/1``)::

    {"format": "computegroups/nvml-recording/1",
     "description": "...", "driver_version": "...",
     "devices": [{"uuid", "name", "memory_total_mib", "pci_bus_id", "compute_capability",
                  "numa_node", "cpu_affinity": [cpu ids], "mig_mode": 0 | 1 | null,
                  "mig_devices": [{"uuid", "name", "memory_total_mib", "gpu_instance_id",
                                   "compute_instance_id", "profile"}],
                  "nvlinks": [{"link", "remote_bus_id", "remote_type": "gpu" | "switch"}]}],
     "common_ancestor": [[level, ...], ...],           # nvmlGpuTopologyLevel_t, n x n
     "p2p": {"read": [[status, ...]], "nvlink": [[...]]},  # nvmlGpuP2PStatus_t, 0 = OK
     "samples": [[{"index", "gpu_util", "memory_used_mib", "ecc_dbe_volatile",
                   "remapped_rows_uncorrectable", "remap_failure", "xids": []}, ...], ...],
     "events": [{"round": 3, "index": 2, "xid": 79},
                {"round": 5, "index": 1, "lost": true}, {"round": 7, "index": 1, "lost": false},
                {"round": 4, "index": 0, "ecc_dbe_volatile": 1}]}

``samples`` is one list per monitoring round (the last one repeats forever);
``events`` change a device from their round on (``xid`` only in its round).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from computegroups.model import GpuSpec
from computegroups.topology import Topology

__all__ = [
    "ANCESTOR_NAMES",
    "RECORDING_FORMAT",
    "GpuLost",
    "HealthTracker",
    "Machine",
    "MigDevice",
    "NvmlSource",
    "NvmlUnavailable",
    "RealNvml",
    "RecordingNvml",
    "ReplayNvml",
    "discover_gpus",
    "discover_machine",
    "record_machine",
]

RECORDING_FORMAT = "computegroups/nvml-recording/1"

# nvmlGpuTopologyLevel_t -> nvidia-smi's name for the path between two GPUs.
ANCESTOR_NAMES = {0: "PIX", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}

#: XIDs caused by the application rather than the GPU (the list the Kubernetes
#: device plugin skips): they do not make a device unhealthy.
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68, 109})

XID_NAMES = {
    48: "double-bit ECC error",
    63: "ECC page retirement or row remapping event",
    64: "ECC page retirement or row remapper recording failure",
    74: "NVLink error",
    79: "GPU has fallen off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
    119: "GSP RPC timeout",
    120: "GSP error",
}


class NvmlUnavailable(Exception):
    """NVML cannot be used here; ``str(exc)`` says why (no library, no driver, no GPU)."""


class GpuLost(Exception):
    """A GPU stopped answering (NVML_ERROR_GPU_IS_LOST): it needs a reset or a reboot."""


class NvmlSource(Protocol):
    """The questions discovery and monitoring ask about GPUs.

    Implementations: :class:`RealNvml`, :class:`ReplayNvml`, :class:`RecordingNvml`.
    Indices are NVML's (PCI bus order, as nvidia-smi numbers GPUs).
    """

    def device_count(self) -> int: ...

    def device_info(self, index: int) -> dict[str, Any]:
        """uuid, name, memory_total_mib, pci_bus_id, compute_capability, numa_node, cpu_affinity, mig_mode."""
        ...

    def mig_devices(self, index: int) -> list[dict[str, Any]]:
        """MIG devices of a GPU in MIG mode (empty otherwise): uuid, name, memory_total_mib, ids, profile."""
        ...

    def common_ancestor(self, a: int, b: int) -> int:
        """nvmlDeviceGetTopologyCommonAncestor level between GPUs a and b."""
        ...

    def p2p_status(self, a: int, b: int) -> dict[str, int]:
        """nvmlDeviceGetP2PStatus for ``read`` and ``nvlink`` between GPUs a and b (0 = OK)."""
        ...

    def nvlinks(self, index: int) -> list[dict[str, Any]]:
        """Active NVLinks of a GPU: [{"link": n, "remote_bus_id": str, "remote_type": "gpu"|"switch"}]."""
        ...

    def sample(self) -> list[dict[str, Any]]:
        """One monitoring round over every GPU: index, gpu_util, memory_used_mib, ecc_dbe_volatile,
        remapped_rows_uncorrectable, remap_failure, xids (critical XIDs since the last round), lost."""
        ...

    def close(self) -> None: ...


# -- the real backend ------------------------------------------------------------
class RealNvml:
    """NVML through nvidia-ml-py. Raises NvmlUnavailable on construction if NVML cannot start.

    ``module`` replaces ``pynvml`` (tests drive this class with a fake module).
    """

    def __init__(self, module: Any = None) -> None:
        if module is None:
            try:
                import pynvml
            except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a dependency
                raise NvmlUnavailable(f"nvidia-ml-py is not installed: {exc}") from exc
            module = pynvml
        self._nv = module
        try:
            module.nvmlInit()
        except module.NVMLError as exc:
            raise NvmlUnavailable(f"NVML did not initialise: {exc} (is the NVIDIA driver installed?)") from exc
        self._handles: dict[int, Any] = {}
        self._events: Any = None
        self._event_devices: dict[str, int] = {}

    def _h(self, index: int) -> Any:
        if index not in self._handles:
            self._handles[index] = self._nv.nvmlDeviceGetHandleByIndex(index)
        return self._handles[index]

    def driver_version(self) -> str:
        with contextlib.suppress(self._nv.NVMLError):
            return _s(self._nv.nvmlSystemGetDriverVersion())
        return ""

    def device_count(self) -> int:
        return int(self._nv.nvmlDeviceGetCount())

    def device_info(self, index: int) -> dict[str, Any]:
        nv, h = self._nv, self._h(index)
        pci = nv.nvmlDeviceGetPciInfo_v3(h) if hasattr(nv, "nvmlDeviceGetPciInfo_v3") else nv.nvmlDeviceGetPciInfo(h)
        bus = _s(pci.busId)
        try:
            major, minor = nv.nvmlDeviceGetCudaComputeCapability(h)
            cc = f"{major}.{minor}"
        except nv.NVMLError:
            cc = ""
        try:
            mig_mode: int | None = int(nv.nvmlDeviceGetMigMode(h)[0])
        except (nv.NVMLError, AttributeError):
            mig_mode = None
        return {
            "uuid": _s(nv.nvmlDeviceGetUUID(h)),
            "name": _s(nv.nvmlDeviceGetName(h)),
            "memory_total_mib": int(nv.nvmlDeviceGetMemoryInfo(h).total) // (1024 * 1024),
            "pci_bus_id": bus,
            "compute_capability": cc,
            "numa_node": self._numa_node(h, bus),
            "cpu_affinity": self._cpu_affinity(h),
            "mig_mode": mig_mode,
        }

    def _numa_node(self, h: Any, bus: str) -> int | None:
        nv = self._nv
        try:
            words = nv.nvmlDeviceGetMemoryAffinity(h, 1, getattr(nv, "NVML_AFFINITY_SCOPE_NODE", 0))
            nodes = _bits(words)
            if len(nodes) == 1:
                return nodes[0]
        except (nv.NVMLError, AttributeError):
            pass
        return _sysfs_numa(bus)

    def _cpu_affinity(self, h: Any) -> list[int]:
        nv = self._nv
        words = max(1, ((os.cpu_count() or 64) + 63) // 64)
        try:
            return _bits(nv.nvmlDeviceGetCpuAffinity(h, words))
        except nv.NVMLError:
            return []

    def mig_devices(self, index: int) -> list[dict[str, Any]]:
        nv, h = self._nv, self._h(index)
        try:
            if int(nv.nvmlDeviceGetMigMode(h)[0]) != 1:
                return []
            count = int(nv.nvmlDeviceGetMaxMigDeviceCount(h))
        except (nv.NVMLError, AttributeError):
            return []
        out: list[dict[str, Any]] = []
        for m in range(count):
            try:
                mh = nv.nvmlDeviceGetMigDeviceHandleByIndex(h, m)
            except nv.NVMLError:
                continue  # an empty slot
            name = _s(nv.nvmlDeviceGetName(mh))
            out.append(
                {
                    "uuid": _s(nv.nvmlDeviceGetUUID(mh)),
                    "name": name,
                    "memory_total_mib": int(nv.nvmlDeviceGetMemoryInfo(mh).total) // (1024 * 1024),
                    "gpu_instance_id": int(nv.nvmlDeviceGetGpuInstanceId(mh)),
                    "compute_instance_id": int(nv.nvmlDeviceGetComputeInstanceId(mh)),
                    "profile": name.rsplit(" ", 1)[-1] if "MIG" in name else "",
                }
            )
        return out

    def common_ancestor(self, a: int, b: int) -> int:
        return int(self._nv.nvmlDeviceGetTopologyCommonAncestor(self._h(a), self._h(b)))

    def p2p_status(self, a: int, b: int) -> dict[str, int]:
        nv = self._nv
        out: dict[str, int] = {}
        for key, cap in (("read", 0), ("nvlink", 2)):
            try:
                out[key] = int(nv.nvmlDeviceGetP2PStatus(self._h(a), self._h(b), cap))
            except nv.NVMLError:
                out[key] = 6  # NVML_P2P_STATUS_UNKNOWN
        return out

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

    # -- monitoring -----------------------------------------------------------
    def _is_lost(self, exc: BaseException) -> bool:
        return getattr(exc, "value", None) == getattr(self._nv, "NVML_ERROR_GPU_IS_LOST", 15)

    def _drain_xids(self, n: int) -> dict[int, list[int]]:
        nv = self._nv
        if self._events is None:
            try:
                self._events = nv.nvmlEventSetCreate()
                for i in range(n):
                    with contextlib.suppress(nv.NVMLError):
                        nv.nvmlDeviceRegisterEvents(self._h(i), nv.nvmlEventTypeXidCriticalError, self._events)
                        self._event_devices[_s(nv.nvmlDeviceGetUUID(self._h(i)))] = i
            except (nv.NVMLError, AttributeError):
                self._events = False  # no event support: XIDs are not seen
        out: dict[int, list[int]] = {}
        if not self._events:
            return out
        for _ in range(1000):
            try:
                data = nv.nvmlEventSetWait_v2(self._events, 0)
            except nv.NVMLError:
                break  # NVML_ERROR_TIMEOUT: nothing pending
            try:
                index = self._event_devices.get(_s(nv.nvmlDeviceGetUUID(data.device)))
            except nv.NVMLError:
                index = None
            if index is not None:
                out.setdefault(index, []).append(int(data.eventData))
        return out

    def sample(self) -> list[dict[str, Any]]:
        nv = self._nv
        n = self.device_count()
        xids = self._drain_xids(n)
        out: list[dict[str, Any]] = []
        for i in range(n):
            s: dict[str, Any] = {"index": i, "xids": xids.get(i, [])}
            try:
                h = self._h(i)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                s["memory_used_mib"] = int(mem.used) // (1024 * 1024)
                with contextlib.suppress(nv.NVMLError):
                    s["gpu_util"] = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
                with contextlib.suppress(nv.NVMLError):
                    s["ecc_dbe_volatile"] = int(
                        nv.nvmlDeviceGetTotalEccErrors(h, nv.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nv.NVML_VOLATILE_ECC)
                    )
                with contextlib.suppress(nv.NVMLError):
                    _corr, unc, _pending, failure = nv.nvmlDeviceGetRemappedRows(h)
                    s["remapped_rows_uncorrectable"] = int(unc)
                    s["remap_failure"] = bool(failure)
            except nv.NVMLError as exc:
                if not self._is_lost(exc):
                    s["error"] = str(exc)
                else:
                    s["lost"] = True
            out.append(s)
        return out

    def close(self) -> None:
        nv = self._nv
        if self._events:
            with contextlib.suppress(nv.NVMLError):
                nv.nvmlEventSetFree(self._events)
        self._events = None
        with contextlib.suppress(nv.NVMLError):
            nv.nvmlShutdown()


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bits(words: Sequence[Any]) -> list[int]:
    return [w * 64 + b for w, m in enumerate(words) for b in range(64) if int(m) >> b & 1]


def _sysfs_numa(bus_id: str) -> int | None:
    # NVML prints an 8-digit domain; sysfs uses 4 digits, lower case.
    short = _norm_bus(bus_id)
    try:
        with open(f"/sys/bus/pci/devices/{short}/numa_node") as f:
            node = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return node if node >= 0 else None


def _norm_bus(bus: str) -> str:
    return bus.lower()[-12:]


# -- replay and recording ----------------------------------------------------------
class ReplayNvml:
    """Answers from a recording (a dict, or a path to its JSON file).

    Each :meth:`sample` call is one monitoring round: it returns the round's
    samples with the recording's events applied, then moves to the next round.
    :meth:`inject` adds an event at the current round (tests, demos).
    """

    def __init__(self, recording: Mapping[str, Any] | str | os.PathLike[str]) -> None:
        if not isinstance(recording, Mapping):
            path = Path(recording)
            try:
                recording = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise NvmlUnavailable(f"recording {path}: {exc}") from exc
        assert isinstance(recording, Mapping)
        if recording.get("format") != RECORDING_FORMAT:
            raise NvmlUnavailable(f"recording: format {recording.get('format')!r} is not {RECORDING_FORMAT!r}")
        self.recording = recording
        self._devices: list[Mapping[str, Any]] = list(recording["devices"])
        self._events: list[dict[str, Any]] = [dict(e) for e in recording.get("events", [])]
        self.round = 0
        self._lost: set[int] = set()
        self._counters: dict[int, dict[str, Any]] = {}

    def driver_version(self) -> str:
        return str(self.recording.get("driver_version", ""))

    def device_count(self) -> int:
        return len(self._devices)

    def device_info(self, index: int) -> dict[str, Any]:
        d = self._devices[index]
        keys = ("uuid", "name", "memory_total_mib", "pci_bus_id", "compute_capability", "numa_node", "cpu_affinity")
        out = {k: d.get(k) for k in keys}
        out["cpu_affinity"] = list(d.get("cpu_affinity") or [])
        out["compute_capability"] = d.get("compute_capability", "")
        out["mig_mode"] = d.get("mig_mode")
        return out

    def mig_devices(self, index: int) -> list[dict[str, Any]]:
        return [dict(m) for m in self._devices[index].get("mig_devices", [])]

    def common_ancestor(self, a: int, b: int) -> int:
        return int(self.recording["common_ancestor"][a][b])

    def p2p_status(self, a: int, b: int) -> dict[str, int]:
        p2p = self.recording.get("p2p", {})
        return {k: int(m[a][b]) for k, m in p2p.items()}

    def nvlinks(self, index: int) -> list[dict[str, Any]]:
        return [dict(link) for link in self._devices[index].get("nvlinks", [])]

    def inject(self, index: int, **change: Any) -> None:
        """Add an event for GPU ``index`` at the current round (``xid=79``, ``lost=True``, ``ecc_dbe_volatile=1``)."""
        self._events.append({"round": self.round, "index": index, **change})

    def sample(self) -> list[dict[str, Any]]:
        series = self.recording.get("samples") or []
        base = series[min(self.round, len(series) - 1)] if series else []
        by_index = {int(s["index"]): dict(s) for s in base}
        xids: dict[int, list[int]] = {}
        for e in self._events:
            if e.get("_seen") or int(e.get("round", 0)) > self.round:
                continue
            e["_seen"] = True
            i = int(e["index"])
            if "lost" in e:
                (self._lost.add if e["lost"] else self._lost.discard)(i)
            if "xid" in e:
                xids.setdefault(i, []).append(int(e["xid"]))
            for k in ("ecc_dbe_volatile", "remapped_rows_uncorrectable", "remap_failure"):
                if k in e:
                    self._counters.setdefault(i, {})[k] = e[k]
        out: list[dict[str, Any]] = []
        for i in range(len(self._devices)):
            if i in self._lost:
                out.append({"index": i, "lost": True, "xids": xids.get(i, [])})
                continue
            s = by_index.get(i, {"index": i, "gpu_util": 0.0, "memory_used_mib": 0})
            s.update(self._counters.get(i, {}))
            s["xids"] = list(s.get("xids", [])) + xids.get(i, [])
            out.append(s)
        self.round += 1
        return out

    def close(self) -> None:
        return None


class RecordingNvml:
    """Wraps a source and writes down every answer; :meth:`recording` returns the JSON document."""

    def __init__(self, inner: NvmlSource, description: str = "") -> None:
        self.inner = inner
        self.description = description
        self._devices: dict[int, dict[str, Any]] = {}
        self._ancestor: dict[tuple[int, int], int] = {}
        self._p2p: dict[tuple[int, int], dict[str, int]] = {}
        self._samples: list[list[dict[str, Any]]] = []
        self._count = 0

    def device_count(self) -> int:
        self._count = self.inner.device_count()
        return self._count

    def device_info(self, index: int) -> dict[str, Any]:
        info = self.inner.device_info(index)
        self._devices.setdefault(index, {}).update(info)
        return info

    def mig_devices(self, index: int) -> list[dict[str, Any]]:
        migs = self.inner.mig_devices(index)
        self._devices.setdefault(index, {})["mig_devices"] = migs
        return migs

    def common_ancestor(self, a: int, b: int) -> int:
        level = self.inner.common_ancestor(a, b)
        self._ancestor[(a, b)] = self._ancestor[(b, a)] = level
        return level

    def p2p_status(self, a: int, b: int) -> dict[str, int]:
        status = self.inner.p2p_status(a, b)
        self._p2p[(a, b)] = status
        return status

    def nvlinks(self, index: int) -> list[dict[str, Any]]:
        links = self.inner.nvlinks(index)
        self._devices.setdefault(index, {})["nvlinks"] = links
        return links

    def sample(self) -> list[dict[str, Any]]:
        s = self.inner.sample()
        self._samples.append([dict(x) for x in s])
        return s

    def close(self) -> None:
        self.inner.close()

    def recording(self) -> dict[str, Any]:
        """The answers so far as a recording :class:`ReplayNvml` can replay."""
        n = self._count
        ancestor = [[0 if a == b else self._ancestor.get((a, b), 50) for b in range(n)] for a in range(n)]
        keys = sorted({k for v in self._p2p.values() for k in v})
        p2p = {
            k: [[0 if a == b else self._p2p.get((a, b), {}).get(k, 6) for b in range(n)] for a in range(n)]
            for k in keys
        }
        driver = getattr(self.inner, "driver_version", None)
        return {
            "format": RECORDING_FORMAT,
            "description": self.description,
            "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "driver_version": driver() if callable(driver) else "",
            "devices": [self._devices.get(i, {}) for i in range(n)],
            "common_ancestor": ancestor,
            "p2p": p2p,
            "samples": self._samples,
            "events": [],
        }


def record_machine(
    source: NvmlSource, *, rounds: int = 3, interval_s: float = 1.0, description: str = ""
) -> dict[str, Any]:
    """Ask ``source`` everything discovery and monitoring ask, ``rounds`` samples apart; return the recording."""
    rec = RecordingNvml(source, description)
    discover_machine(rec)
    for r in range(rounds):
        if r:
            time.sleep(interval_s)
        rec.sample()
    return rec.recording()


# -- discovery ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class MigDevice:
    """One MIG device (a GPU instance with its compute instance) of a GPU in MIG mode."""

    parent_index: int
    uuid: str
    name: str
    memory_mib: int
    gpu_instance_id: int
    compute_instance_id: int
    profile: str = ""


@dataclass(frozen=True, slots=True)
class Machine:
    """Everything NVML says about this machine's GPUs."""

    gpus: list[GpuSpec]
    topology: Topology
    mig_mode: dict[int, int | None] = field(default_factory=dict)
    mig: dict[int, list[MigDevice]] = field(default_factory=dict)
    p2p: dict[tuple[int, int], dict[str, int]] = field(default_factory=dict)


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
            compute_capability=info.get("compute_capability") or "",
        )
        for i, info in enumerate(infos)
    ]
    topo = Topology(links, [g.numa_node for g in gpus], [info.get("cpu_affinity") or [] for info in infos], name="nvml")
    return gpus, topo


def discover_machine(source: NvmlSource) -> Machine:
    """:func:`discover_gpus` plus MIG mode and devices and P2P status of every pair."""
    gpus, topo = discover_gpus(source)
    n = len(gpus)
    mig_mode = {i: source.device_info(i).get("mig_mode") for i in range(n)}
    mig: dict[int, list[MigDevice]] = {}
    for i in range(n):
        found = [
            MigDevice(
                parent_index=i,
                uuid=str(m["uuid"]),
                name=str(m["name"]),
                memory_mib=int(m["memory_total_mib"]),
                gpu_instance_id=int(m.get("gpu_instance_id", 0)),
                compute_instance_id=int(m.get("compute_instance_id", 0)),
                profile=str(m.get("profile", "")),
            )
            for m in source.mig_devices(i)
        ]
        if found:
            mig[i] = found
    p2p = {(a, b): source.p2p_status(a, b) for a in range(n) for b in range(n) if a != b}
    return Machine(gpus, topo, mig_mode, mig, p2p)


def schedulable_devices(machine: Machine) -> tuple[list[GpuSpec], Topology]:
    """The devices a workload can be given: whole GPUs, and the MIG devices of GPUs in MIG mode.

    A GPU in MIG mode cannot run CUDA work itself, so its MIG devices replace it
    (``CUDA_VISIBLE_DEVICES=MIG-<uuid>``). Two MIG devices of one GPU are joined
    as ``PIX`` (nearest without NVLink); others inherit their parents' link.
    """
    if not machine.mig:
        return machine.gpus, machine.topology
    parents: list[int] = []
    out: list[GpuSpec] = []
    for g in machine.gpus:
        if g.index in machine.mig:
            for m in machine.mig[g.index]:
                out.append(
                    GpuSpec(
                        index=len(out),
                        uuid=m.uuid,
                        name=m.name if m.name.startswith(g.name) else f"{g.name} {m.name}",
                        memory_mib=m.memory_mib,
                        pci_bus_id=g.pci_bus_id,
                        numa_node=g.numa_node,
                        compute_capability=g.compute_capability,
                        mig_profile=m.profile,
                        parent_index=g.index,
                        parent_uuid=g.uuid,
                    )
                )
                parents.append(g.index)
        elif machine.mig_mode.get(g.index) != 1:
            out.append(dataclasses.replace(g, index=len(out), parent_index=g.index))
            parents.append(g.index)
    return out, machine.topology.project(parents, name="nvml-mig")


# -- health ---------------------------------------------------------------------------
class HealthTracker:
    """Turns health samples into a verdict per device.

    Unhealthy: a critical XID (sticky until :meth:`clear`), a double-bit ECC
    error count or uncorrectable remapped rows above what was last cleared, a
    failed row remapping, or a lost GPU (for as long as it stays lost).
    Counters are compared with a baseline (zero at first), so an operator's
    :meth:`clear` accepts the errors seen so far and only new ones count.
    """

    def __init__(self) -> None:
        self._baseline: dict[int, dict[str, int]] = {}
        self._last: dict[int, dict[str, int]] = {}
        self._xid: dict[int, str] = {}

    def assess(self, sample: Mapping[str, Any]) -> tuple[bool, str]:
        """(healthy, reason) for one device's sample."""
        i = int(sample["index"])
        for x in sample.get("xids") or []:
            if int(x) not in APPLICATION_XIDS:
                self._xid[i] = f"XID {int(x)}" + (f" ({XID_NAMES[int(x)]})" if int(x) in XID_NAMES else "")
        if sample.get("lost"):
            return False, "GPU is lost (fell off the bus or stopped answering)"
        counters = {
            "ecc_dbe_volatile": int(sample.get("ecc_dbe_volatile") or 0),
            "remapped_rows_uncorrectable": int(sample.get("remapped_rows_uncorrectable") or 0),
            "remap_failure": int(bool(sample.get("remap_failure"))),
        }
        self._last[i] = counters
        base = self._baseline.get(i, {})
        reasons: list[str] = []
        if i in self._xid:
            reasons.append(self._xid[i])
        if counters["ecc_dbe_volatile"] > base.get("ecc_dbe_volatile", 0):
            reasons.append(f"double-bit ECC errors: {counters['ecc_dbe_volatile']}")
        if counters["remapped_rows_uncorrectable"] > base.get("remapped_rows_uncorrectable", 0):
            reasons.append(f"uncorrectable remapped rows: {counters['remapped_rows_uncorrectable']}")
        if counters["remap_failure"] > base.get("remap_failure", 0):
            reasons.append("row remapping failed")
        return (not reasons), "; ".join(reasons)

    def clear(self, index: int) -> None:
        """Accept the errors seen so far on ``index`` (an operator checked the device)."""
        self._xid.pop(index, None)
        self._baseline[index] = dict(self._last.get(index, {}))
