"""NVML discovery and health: recordings replay to the topology nvidia-smi prints for the same machine."""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest

from computegroups.providers.nvml import (
    RECORDING_FORMAT,
    HealthTracker,
    NvmlUnavailable,
    RealNvml,
    RecordingNvml,
    ReplayNvml,
    discover_gpus,
    discover_machine,
    record_machine,
    schedulable_devices,
)
from computegroups.topology import parse_nvidia_smi_topo
from tests.conftest import topo_fixture

NVML_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nvml"

# recording -> the public nvidia-smi topo -m output of the same machine type
CONSISTENT = [
    ("hgx_h100_8_nvswitch.json", "hgx_h100_p5.48xlarge.txt"),
    ("rtx_a6000_8_nvlink_pairs.json", "rtx_a6000_x8_nv4_pairs.txt"),
    ("a100_mig.json", "single_gpu.txt"),
]


def recording(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((NVML_FIXTURES / name).read_text())
    return data


@pytest.mark.parametrize(("rec", "topo"), CONSISTENT)
def test_replayed_recording_gives_the_nvidia_smi_topology(rec: str, topo: str) -> None:
    gpus, replayed = discover_gpus(ReplayNvml(NVML_FIXTURES / rec))
    parsed = parse_nvidia_smi_topo(topo_fixture(topo))
    assert replayed == parsed.without_nics()  # NVML sees no NICs; nvidia-smi lists them
    assert replayed.matrix() == parsed.matrix()
    assert [g.index for g in gpus] == list(range(parsed.gpu_count))
    assert len({g.uuid for g in gpus}) == len(gpus)


def test_nvswitch_pairs_count_switch_links_and_pcie_pairs_fall_back_to_common_ancestor() -> None:
    _, h100 = discover_gpus(ReplayNvml(NVML_FIXTURES / "hgx_h100_8_nvswitch.json"))
    assert {h100.link(a, b) for a in range(8) for b in range(8) if a != b} == {"NV18"}
    _, a6000 = discover_gpus(ReplayNvml(NVML_FIXTURES / "rtx_a6000_8_nvlink_pairs.json"))
    assert (a6000.link(0, 1), a6000.link(0, 2), a6000.link(0, 4)) == ("NV4", "NODE", "SYS")


def test_machine_has_mig_devices_and_p2p_status() -> None:
    m = discover_machine(ReplayNvml(NVML_FIXTURES / "a100_mig.json"))
    assert m.mig_mode == {0: 1}
    assert [d.profile for d in m.mig[0]] == ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
    devices, topo = schedulable_devices(m)
    assert [d.uuid[:4] for d in devices] == ["MIG-"] * 4
    assert [d.memory_mib for d in devices] == [40192, 19968, 9728, 9728]
    assert topo.gpu_count == 4 and topo.link(0, 1) == "PIX" and topo.numa_node(3) == 0
    assert [d.mig_profile for d in devices] == ["3g.40gb", "2g.20gb", "1g.10gb", "1g.10gb"]
    assert {d.smi_index for d in devices} == {0} and devices[0].parent_uuid == m.gpus[0].uuid
    pairs = discover_machine(ReplayNvml(NVML_FIXTURES / "rtx_a6000_8_nvlink_pairs.json"))
    assert pairs.p2p[(0, 1)]["nvlink"] == 0 and pairs.p2p[(0, 2)]["nvlink"] != 0
    assert schedulable_devices(pairs)[1] is pairs.topology


def test_a_recording_of_another_format_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text('{"format": "something/else"}')
    with pytest.raises(NvmlUnavailable, match="format"):
        ReplayNvml(tmp_path / "x.json")
    with pytest.raises(NvmlUnavailable):
        ReplayNvml(tmp_path / "missing.json")


# -- replay timeline and health -----------------------------------------------------
def test_replay_applies_scripted_events_round_by_round() -> None:
    r = ReplayNvml(NVML_FIXTURES / "hgx_h100_8_nvswitch.json")
    rounds = [r.sample() for _ in range(10)]
    assert rounds[0][0]["gpu_util"] > 0 and rounds[0][7]["gpu_util"] == 0
    assert rounds[2][3]["xids"] == [79] and rounds[3][3]["xids"] == []
    assert not rounds[3][6].get("lost") and rounds[4][6]["lost"] and rounds[5][6]["lost"]
    assert not rounds[6][6].get("lost")
    assert rounds[7][1]["ecc_dbe_volatile"] == 0 and rounds[8][1]["ecc_dbe_volatile"] == 1
    assert rounds[9][1]["ecc_dbe_volatile"] == 1  # counters stay


def test_health_tracker_table() -> None:
    cases: list[tuple[dict[str, Any], bool, str]] = [
        ({"index": 0, "gpu_util": 10.0}, True, ""),
        ({"index": 0, "xids": [13, 31, 43]}, True, ""),  # application errors
        ({"index": 0, "xids": [79]}, False, "XID 79 (GPU has fallen off the bus)"),
        ({"index": 0, "ecc_dbe_volatile": 2}, False, "double-bit ECC errors: 2"),
        ({"index": 0, "remapped_rows_uncorrectable": 1}, False, "uncorrectable remapped rows: 1"),
        ({"index": 0, "remap_failure": True}, False, "row remapping failed"),
        ({"index": 0, "lost": True}, False, "GPU is lost"),
    ]
    for sample, healthy, reason in cases:
        ok, why = HealthTracker().assess(sample)
        assert ok is healthy, sample
        assert why.startswith(reason), (sample, why)


def test_xid_is_sticky_until_cleared_and_counters_compare_with_the_cleared_baseline() -> None:
    t = HealthTracker()
    assert not t.assess({"index": 1, "xids": [48], "ecc_dbe_volatile": 1})[0]
    assert not t.assess({"index": 1, "xids": [], "ecc_dbe_volatile": 1})[0]  # XID stays
    t.clear(1)
    assert t.assess({"index": 1, "xids": [], "ecc_dbe_volatile": 1}) == (True, "")
    assert t.assess({"index": 1, "ecc_dbe_volatile": 2})[1] == "double-bit ECC errors: 2"
    assert t.assess({"index": 2, "lost": True})[0] is False
    assert t.assess({"index": 2})[0] is True  # a lost GPU that answers again is healthy


# -- the real backend, driven through a fake pynvml built from a recording -------------
class _NVMLError(Exception):
    def __init__(self, value: int = 999) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


def fake_pynvml(rec: dict[str, Any], *, fail_init: bool = False, lost: frozenset[int] = frozenset()) -> Any:
    """A module with the pynvml calls RealNvml makes, answering from a recording."""
    devices = rec["devices"]
    nv = types.SimpleNamespace(
        NVMLError=_NVMLError,
        NVML_FEATURE_ENABLED=1,
        NVML_NVLINK_MAX_LINKS=18,
        NVML_NVLINK_DEVICE_TYPE_SWITCH=2,
        NVML_ERROR_GPU_IS_LOST=15,
        NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1,
        NVML_VOLATILE_ECC=0,
        NVML_AFFINITY_SCOPE_NODE=0,
        nvmlEventTypeXidCriticalError=8,
    )
    events: list[Any] = []
    MIB = 1024 * 1024

    def dev(h: Any) -> dict[str, Any]:
        return devices[h[1]] if h[0] == "gpu" else devices[h[1]]["mig_devices"][h[2]]

    def init() -> None:
        if fail_init:
            raise _NVMLError(9)

    def mask(ids: list[int], words: int) -> list[int]:
        out = [0] * words
        for c in ids:
            out[c // 64] |= 1 << (c % 64)
        return out

    def memory(h: Any) -> Any:
        if h[0] == "gpu" and h[1] in lost:
            raise _NVMLError(15)
        return types.SimpleNamespace(total=dev(h)["memory_total_mib"] * MIB, used=5 * MIB)

    def nvlink_state(h: Any, link: int) -> int:
        if link >= len(devices[h[1]]["nvlinks"]):
            raise _NVMLError(3)
        return 1

    def remote_pci(h: Any, link: int) -> Any:
        return types.SimpleNamespace(busId=devices[h[1]]["nvlinks"][link]["remote_bus_id"].encode())

    def remote_type(h: Any, link: int) -> int:
        return 2 if devices[h[1]]["nvlinks"][link]["remote_type"] == "switch" else 0

    def mig_handle(h: Any, m: int) -> Any:
        if m >= len(devices[h[1]]["mig_devices"]):
            raise _NVMLError(13)
        return ("mig", h[1], m)

    def wait(es: Any, timeout: int) -> Any:
        if not events:
            raise _NVMLError(10)
        return events.pop(0)

    nv.nvmlInit = init
    nv.nvmlShutdown = lambda: None
    nv.nvmlSystemGetDriverVersion = lambda: rec["driver_version"]
    nv.nvmlDeviceGetCount = lambda: len(devices)
    nv.nvmlDeviceGetHandleByIndex = lambda i: ("gpu", i)
    nv.nvmlDeviceGetPciInfo_v3 = lambda h: types.SimpleNamespace(busId=dev(h)["pci_bus_id"].encode())
    nv.nvmlDeviceGetCudaComputeCapability = lambda h: tuple(map(int, dev(h)["compute_capability"].split(".")))
    nv.nvmlDeviceGetMigMode = lambda h: (
        (dev(h)["mig_mode"], dev(h)["mig_mode"])
        if dev(h)["mig_mode"] is not None
        else (_ for _ in ()).throw(_NVMLError(3))
    )
    nv.nvmlDeviceGetUUID = lambda h: dev(h)["uuid"]
    nv.nvmlDeviceGetName = lambda h: dev(h)["name"].encode()
    nv.nvmlDeviceGetMemoryInfo = memory
    nv.nvmlDeviceGetMemoryAffinity = lambda h, n, scope: mask([dev(h)["numa_node"]], n)
    nv.nvmlDeviceGetCpuAffinity = lambda h, n: mask(dev(h)["cpu_affinity"], max(n, 4))
    nv.nvmlDeviceGetMaxMigDeviceCount = lambda h: 7
    nv.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    nv.nvmlDeviceGetGpuInstanceId = lambda h: dev(h)["gpu_instance_id"]
    nv.nvmlDeviceGetComputeInstanceId = lambda h: dev(h)["compute_instance_id"]
    nv.nvmlDeviceGetTopologyCommonAncestor = lambda a, b: rec["common_ancestor"][a[1]][b[1]]
    nv.nvmlDeviceGetP2PStatus = lambda a, b, cap: rec["p2p"]["read" if cap == 0 else "nvlink"][a[1]][b[1]]
    nv.nvmlDeviceGetNvLinkState = nvlink_state
    nv.nvmlDeviceGetNvLinkRemotePciInfo_v2 = remote_pci
    nv.nvmlDeviceGetNvLinkRemoteDeviceType = remote_type
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=42)
    nv.nvmlDeviceGetTotalEccErrors = lambda h, t, c: 0
    nv.nvmlDeviceGetRemappedRows = lambda h: (0, 0, 0, 0)
    nv.nvmlEventSetCreate = lambda: "es"
    nv.nvmlEventSetFree = lambda es: None
    nv.nvmlDeviceRegisterEvents = lambda h, t, es: None
    nv.nvmlEventSetWait_v2 = wait
    nv.push_xid = lambda i, xid: events.append(types.SimpleNamespace(device=("gpu", i), eventData=xid))
    return nv


@pytest.mark.parametrize(("rec", "topo"), CONSISTENT)
def test_real_backend_records_what_replays_to_the_same_machine(rec: str, topo: str) -> None:
    original = recording(rec)
    recorded = record_machine(RealNvml(fake_pynvml(original)), rounds=2, interval_s=0, description="fake")
    assert recorded["format"] == RECORDING_FORMAT
    assert recorded["driver_version"] == original["driver_version"]
    json.dumps(recorded)  # JSON-ready
    again = discover_machine(ReplayNvml(recorded))
    assert again.topology == parse_nvidia_smi_topo(topo_fixture(topo)).without_nics()
    assert again.gpus == discover_machine(ReplayNvml(original)).gpus
    assert again.mig == discover_machine(ReplayNvml(original)).mig
    assert len(recorded["samples"]) == 2 and recorded["samples"][0][0]["gpu_util"] == 42.0


def test_real_backend_reports_xids_and_lost_gpus() -> None:
    nv = fake_pynvml(recording("rtx_a6000_8_nvlink_pairs.json"), lost=frozenset({5}))
    real = RealNvml(nv)
    nv.push_xid(2, 79)
    s = real.sample()
    assert s[2]["xids"] == [79] and s[5]["lost"] is True and not s[0].get("lost")
    assert real.sample()[2]["xids"] == []
    real.close()


def test_real_backend_without_driver_is_unavailable() -> None:
    with pytest.raises(NvmlUnavailable, match="did not initialise"):
        RealNvml(fake_pynvml(recording("a100_mig.json"), fail_init=True))


def test_recording_wrapper_passes_answers_through() -> None:
    rec = RecordingNvml(ReplayNvml(NVML_FIXTURES / "a100_mig.json"))
    assert rec.device_count() == 1
    assert rec.mig_devices(0)[0]["profile"] == "3g.40gb"
    out = rec.recording()
    assert out["devices"][0]["mig_devices"][0]["profile"] == "3g.40gb"
