"""The local provider on recorded machines: NVML replay, the nvidia-smi fallback, health steering placement."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from computegroups import ComputeGroupManager, InsufficientResourcesError, LocalComputeResourceProvider
from computegroups.providers.nvml import NvmlUnavailable
from computegroups.topology import parse_nvidia_smi_topo
from tests.conftest import TOPO_FIXTURES, topo_fixture

NVML = Path(__file__).resolve().parent / "fixtures" / "nvml"
SMI = NVML / "nvidia-smi"


def h100() -> LocalComputeResourceProvider:
    return LocalComputeResourceProvider.from_recording(NVML / "hgx_h100_8_nvswitch.json", "p5", cpus=192)


async def test_recorded_machine_comes_up_with_its_topology() -> None:
    async with ComputeGroupManager(h100(), ":memory:") as mgr:
        (node,) = await mgr.list_compute_nodes()
        assert node.id == "p5" and node.resources["gpus"] == 8
        assert node.topology == parse_nvidia_smi_topo(topo_fixture("hgx_h100_p5.48xlarge.txt"))
        g = await mgr.allocate_compute_group("decode", {"gpus": 4}, {"same_numa": True})
        assert g.env["CUDA_VISIBLE_DEVICES"] == ",".join(
            node.resources["gpu_uuids"][i] for i in g.resources["gpu_indices"]
        )
        assert g.topology["bottleneck"] == "NV18"


async def test_health_events_in_a_recording_mark_devices_unhealthy_and_steer_allocation_away() -> None:
    async with ComputeGroupManager(h100(), ":memory:") as mgr:
        for _ in range(3):  # rounds 0, 1 healthy; round 2 has XID 79 on GPU 3
            await mgr.refresh_health()
        assert set(mgr.unhealthy_devices()) == {("p5", 3)}
        assert any(e.kind == "device-unhealthy" and "XID 79" in e.detail for e in mgr.recent_events)
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("big", {"gpus": 8})
        got = [await mgr.allocate_compute_group(f"w{i}", {"gpus": 1}) for i in range(7)]
        assert 3 not in {g.resources["gpu_indices"][0] for g in got}
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("one-more", {"gpus": 1})
        # utilization is live: GPUs 0 and 1 are busy in the recording
        (node,) = await mgr.list_compute_nodes()
        assert node.utilization["gpu"] > 0
        busy = [g for g in got if g.resources["gpu_indices"][0] in (0, 1)]
        assert busy and all(g.utilization["gpu"] >= 80 for g in busy)


async def test_a_lost_gpu_is_unhealthy_until_it_answers_again() -> None:
    async with ComputeGroupManager(h100(), ":memory:") as mgr:
        for _ in range(5):  # GPU 6 is lost at round 4
            await mgr.refresh_health()
        assert "lost" in mgr.unhealthy_devices()[("p5", 6)]
        await mgr.refresh_health()
        await mgr.refresh_health()  # back at round 6
        assert ("p5", 6) not in mgr.unhealthy_devices()
        assert any(e.kind == "device-healthy" and e.detail == "GPU 6" for e in mgr.recent_events)


async def test_mig_devices_are_scheduled_in_place_of_their_gpu() -> None:
    provider = LocalComputeResourceProvider.from_recording(NVML / "a100_mig.json", "mig")
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        assert any("MIG devices" in n for n in mgr.inventory.notes)
        (node,) = await mgr.list_compute_nodes()
        assert node.resources["gpus"] == 4
        # MIG devices go only to requests that name their profile.
        with pytest.raises(InsufficientResourcesError, match="mig_profile"):
            await mgr.allocate_compute_group("small", {"gpus": 1})
        g = await mgr.allocate_compute_group("small", {"mig_profile": "2g.20gb"})
        assert g.env["CUDA_VISIBLE_DEVICES"].startswith("MIG-")
        assert g.resources["gpu_memory_mib"] == [19968] and g.resources["mig_profiles"] == ["2g.20gb"]
        assert g.resources["gpu_indices"] == [0]  # nvidia-smi's index of the parent GPU
        pair = await mgr.allocate_compute_group("tiny", {"mig_profile": "1g.10gb", "gpus": 2})
        assert len(set(pair.env["CUDA_VISIBLE_DEVICES"].split(","))) == 2
        with pytest.raises(InsufficientResourcesError, match=re.escape("0 of 2 1g.10gb MIG devices free")):
            await mgr.allocate_compute_group("tiny", {"mig_profile": "1g.10gb"})


# -- the nvidia-smi fallback, replayed by a fake executable ------------------------------
def fake_nvidia_smi(folder: Path, *, with_compute_cap: bool = True, with_topo: bool = True) -> Path:
    """Write an ``nvidia-smi`` script printing recorded outputs; returns its folder."""
    folder.mkdir(parents=True, exist_ok=True)
    topo = TOPO_FIXTURES / "rtx_a6000_x8_nv4_pairs.txt"
    script = folder / "nvidia-smi"
    cap_case = (
        f'  --query-gpu=index,uuid,name,pci.bus_id,memory.total,compute_cap,*) cat "{SMI / "query_gpu_a6000.csv"}";;'
        if with_compute_cap
        else "  --query-gpu=index,uuid,name,pci.bus_id,memory.total,compute_cap,*) "
        "echo 'Field \"compute_cap\" is not a valid field to query.' >&2; exit 2;;"
    )
    script.write_text(
        "#!/bin/sh\n"
        'echo "$@" >> "$(dirname "$0")/calls.log"\n'
        'case "$1" in\n'
        f"{cap_case}\n"
        f"  --query-gpu=index,uuid,name,pci.bus_id,memory.total,mig.mode.current) "
        f'cut -d, -f1-5,7 "{SMI / "query_gpu_a6000.csv"}";;\n'
        f'  --query-gpu=index,utilization.gpu,*) cat "{SMI / "sample_a6000.csv"}";;\n'
        + (f'  topo) cat "{topo}";;\n' if with_topo else "  topo) echo 'topo not supported' >&2; exit 3;;\n")
        + '  *) echo "unexpected: $*" >&2; exit 9;;\n'
        "esac\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return folder


def no_nvml() -> object:
    raise NvmlUnavailable("NVML Shared Library Not Found")


@pytest.fixture
def smi_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = fake_nvidia_smi(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    return folder


async def test_nvidia_smi_fallback_discovers_the_same_machine(smi_path: Path) -> None:
    provider = LocalComputeResourceProvider("box", nvml=no_nvml)  # type: ignore[arg-type]
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        assert provider.backend == "nvidia-smi"
        assert any("nvidia-smi" in n for n in mgr.inventory.notes)
        (spec,) = mgr.node_specs()
        assert spec.topology == parse_nvidia_smi_topo(topo_fixture("rtx_a6000_x8_nv4_pairs.txt"))
        assert [g.name for g in spec.gpus] == ["NVIDIA RTX A6000"] * 8
        assert spec.gpus[7].compute_capability == "8.6" and spec.gpus[5].numa_node == 1
        # the reconcile on start sampled health once already
        bad = mgr.unhealthy_devices()
        assert set(bad) == {("box", 5), ("box", 7)}, bad
        assert "double-bit ECC errors: 2" in bad[("box", 5)] and "row remapping failed" in bad[("box", 7)]
        assert [e.kind for e in mgr.recent_events] == ["device-unhealthy"] * 2
        assert await mgr.refresh_health() == []  # no change, no event
        g = await mgr.allocate_compute_group("pair", {"gpus": 2}, {"nvlink": True, "strategy": "spread"})
        assert set(g.resources["gpu_indices"]) not in ({4, 5}, {6, 7})
        (node,) = await mgr.list_compute_nodes()
        assert node.utilization["memory_used_mib"] >= 60224
    calls = (smi_path / "calls.log").read_text()
    assert "topo -m" in calls and "--format=csv,noheader,nounits" in calls


async def test_nvidia_smi_fallback_copes_with_old_drivers_and_no_topology(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fake_nvidia_smi(tmp_path / "old", with_compute_cap=False, with_topo=False)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    provider = LocalComputeResourceProvider("old", nvml=no_nvml)  # type: ignore[arg-type]
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        (spec,) = mgr.node_specs()
        assert len(spec.gpus) == 8 and spec.topology is None and spec.gpus[0].compute_capability == ""
        notes = " | ".join(mgr.inventory.notes)
        assert "compute_cap" in notes and "topo -m" in notes


async def test_no_nvml_and_no_nvidia_smi_is_one_cpu_node(tmp_path: Path) -> None:
    provider = LocalComputeResourceProvider("bare", nvml=no_nvml, nvidia_smi=str(tmp_path / "nope"))  # type: ignore[arg-type]
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        (spec,) = mgr.node_specs()
        assert spec.gpus == () and spec.cpus_milli > 0
        assert any("NVML unavailable" in n for n in mgr.inventory.notes)
        assert await mgr.refresh_health() == []
