"""The manager's monitor (live utilization, health) and its reconciliation of state with reality."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from computegroups import ComputeGroupManager, LocalComputeResourceProvider, SimulatedComputeResourceProvider
from computegroups.manager import Event
from computegroups.monitor import Monitor
from computegroups.providers.nvml import ReplayNvml

NVML = Path(__file__).resolve().parent / "fixtures" / "nvml"


def h100(recording: dict[str, Any] | None = None) -> LocalComputeResourceProvider:
    if recording is None:
        return LocalComputeResourceProvider.from_recording(NVML / "hgx_h100_8_nvswitch.json", "p5", cpus=192)
    replay = ReplayNvml(recording)
    return LocalComputeResourceProvider("p5", lambda: replay, nvidia_smi=None, cpus=192)


async def wait_for(pred: Any, timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


async def test_monitor_keeps_utilization_live_and_marks_devices_unhealthy() -> None:
    async with ComputeGroupManager(h100(), ":memory:", monitor_interval=0.02) as mgr:
        assert mgr.monitor is not None
        g = await mgr.allocate_compute_group("decode", {"gpus": 1})
        await wait_for(lambda: ("p5", 3) in mgr.unhealthy_devices())
        assert g.utilization  # read live from the monitor's samples
        (node,) = await mgr.list_compute_nodes()
        assert node.utilization["gpu"] > 0 and node.resources["unhealthy_gpus"] == [3]
        assert mgr.monitor.rounds >= 2 and mgr.monitor.errors == 0  # round 0 was the reconcile on start
    assert mgr.monitor.rounds >= 2  # stopped with the manager


async def test_operator_clears_a_device_and_it_is_used_again() -> None:
    async with ComputeGroupManager(h100(), ":memory:", reconcile_on_start=False) as mgr:
        for _ in range(3):
            await mgr.refresh_health()
        assert ("p5", 3) in mgr.unhealthy_devices()
        assert await mgr.clear_device_health("p5", 3) is True
        assert await mgr.clear_device_health("p5", 3) is False
        assert mgr.recent_events[-1].kind == "device-healthy" and "operator" in mgr.recent_events[-1].detail
        await mgr.refresh_health()  # the XID is not seen again: it stays healthy
        assert ("p5", 3) not in mgr.unhealthy_devices()
        got = await mgr.allocate_compute_group("all", {"gpus": 8})
        assert 3 in got.resources["gpu_indices"]


async def test_simulated_health_goes_through_the_same_monitor() -> None:
    provider = SimulatedComputeResourceProvider.from_spec({"nodes": [{"id": "n", "preset": "hgx-a100"}]})
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        monitor = Monitor(mgr, 60)
        provider.set_health("n", 0, False, "XID 79")
        events = await monitor.tick()
        assert [e.kind for e in events] == ["device-unhealthy"]
        g = await mgr.allocate_compute_group("x", {"gpus": 7})
        assert 0 not in g.resources["gpu_indices"]
    with pytest.raises(ValueError):
        Monitor(mgr, 0)


async def test_a_change_the_provider_signals_is_taken_in_without_a_monitor_or_a_call() -> None:
    """``provider.changes()``: the manager's follower samples again on its own; a sample that fails is
    tried again until one succeeds."""
    provider = SimulatedComputeResourceProvider.from_spec({"nodes": [{"id": "n", "preset": "hgx-a100"}]})
    async with ComputeGroupManager(provider, ":memory:") as mgr:
        assert mgr.monitor is None and mgr.follower is not None
        provider.set_health("n", 2, False, "XID 79")
        await wait_for(lambda: ("n", 2) in mgr.unhealthy_devices())
        assert [e.kind for e in mgr.recent_events if e.node_id == "n"] == ["device-unhealthy"]
        real, fails = provider.sample_health, [2]

        async def flaky() -> list[Any]:
            if fails[0]:
                fails[0] -= 1
                raise OSError("the provider is away for a moment")
            return await real()

        provider.sample_health = flaky  # type: ignore[method-assign]
        provider.set_health("n", 2, True)
        await wait_for(lambda: not mgr.unhealthy_devices())
        assert fails == [0] and [e.kind for e in mgr.recent_events][-1] == "device-healthy"
    assert mgr.follower.rounds >= 4


async def test_monitor_hooks_run_each_round() -> None:
    seen: list[int] = []

    async def hook(mgr: ComputeGroupManager) -> list[Event]:
        seen.append(mgr.revision)
        return [Event("hooked")]

    mgr = ComputeGroupManager(h100(), ":memory:")
    mgr.monitor_hooks.append(hook)
    async with mgr:
        events = await Monitor(mgr, 1).tick()
    assert seen and events[-1].kind == "hooked"


async def test_reconcile_on_start_releases_groups_whose_device_vanished(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    async with ComputeGroupManager(h100(), state) as mgr:
        g = await mgr.allocate_compute_group("decode", {"gpus": 8})
        keep_free = await mgr.create_compute_group({"gpus": 0, "cpus": 1})
    rec = json.loads((NVML / "hgx_h100_8_nvswitch.json").read_text())
    rec["devices"][5]["uuid"] = "GPU-00000000-0000-0000-0000-000000000005"  # the board was swapped
    async with ComputeGroupManager(h100(rec), state) as mgr:
        after = await mgr.get_compute_group(g.id)
        assert after.allocation_state == "released"
        (e,) = [e for e in mgr.recent_events if e.kind == "group-device-vanished"]
        assert e.group_id == g.id and "GPU 5" in e.detail
        assert (await mgr.get_compute_group(keep_free.id)).allocation_state == "free"  # no GPU, untouched
        again = await mgr.allocate_compute_group("decode", {"gpus": 8})
        assert again.env["CUDA_VISIBLE_DEVICES"].count("GPU-00000000-0000-0000-0000-000000000005") == 1


async def test_reconcile_reports_groups_on_unhealthy_devices() -> None:
    async with ComputeGroupManager(h100(), ":memory:") as mgr:
        g = await mgr.allocate_compute_group("decode", {"gpus": 8})
        await mgr.refresh_health()  # round 1
        events = await mgr.reconcile()  # round 2: XID 79 on GPU 3
        kinds = [e.kind for e in events]
        assert kinds == ["device-unhealthy", "group-unhealthy"]
        assert events[1].group_id == g.id and "XID 79" in events[1].detail
        assert mgr.group_health(await mgr.get_compute_group(g.id)) == [events[1].detail]
        assert (await mgr.get_compute_group(g.id)).allocation_state == "allocated"  # the owner decides
