"""The local runtime under a real circus daemon: real worker processes get their group's devices."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from computegroups import ComputeGroupManager, LocalComputeResourceProvider
from computegroups.runtime import REQUEST_PREFIX, CircusDaemon, LocalRuntime

pytestmark = pytest.mark.circus

NVML = Path(__file__).resolve().parent / "fixtures" / "nvml"

REPORTER = """
import json, os, sys, time
keys = ["CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "COMPUTEGROUPS_GROUP_ID", "COMPUTEGROUPS_COMPONENT",
        "COMPUTEGROUPS_GPU_SHARE", "COMPUTEGROUPS_GPU_MEMORY_FRACTION", "CUDA_MPS_ACTIVE_THREAD_PERCENTAGE",
        "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"]
out = {k: os.environ.get(k) for k in keys}
out["pid"] = os.getpid()
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    json.dump(out, f)
os.replace(tmp, sys.argv[1])
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 600)
sys.exit(int(sys.argv[3]) if len(sys.argv) > 3 else 0)
"""


@pytest.fixture
async def rt(tmp_path: Path, daemon: CircusDaemon) -> AsyncIterator[LocalRuntime]:
    provider = LocalComputeResourceProvider.from_recording(NVML / "hgx_h100_8_nvswitch.json", "p5", cpus=192)
    mgr = ComputeGroupManager(provider, tmp_path / "state.db", reconcile_on_start=False)
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=5)
    async with mgr:
        yield runtime
        for row in await runtime.ps():
            if row["state"] == "running":
                await runtime.stop(row["group_id"])


def reporter(tmp_path: Path) -> Path:
    script = tmp_path / "reporter.py"
    script.write_text(REPORTER)
    return script


async def wait_file(path: Path, timeout: float = 20.0) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while not path.exists():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"worker did not write {path}")
        await asyncio.sleep(0.02)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive for our purposes
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


async def test_each_worker_gets_its_groups_devices(rt: LocalRuntime, tmp_path: Path) -> None:
    script = reporter(tmp_path)
    started = []
    for component, gpus in (("prefill", 2), ("decode", 4), ("router", 1)):
        out = tmp_path / f"{component}.json"
        group, worker = await rt.run(component, {"gpus": gpus}, [sys.executable, str(script), str(out)])
        assert group.request_id and group.request_id.startswith(REQUEST_PREFIX)
        assert worker.state == "running" and worker.pids
        started.append((group, worker, out))
    seen: set[str] = set()
    for group, worker, out in started:
        got = await wait_file(out)
        assert got["CUDA_VISIBLE_DEVICES"] == ",".join(group.resources["gpu_uuids"])
        assert got["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        assert got["COMPUTEGROUPS_GROUP_ID"] == group.id and got["COMPUTEGROUPS_COMPONENT"] == group.component
        assert got["pid"] in worker.pids
        uuids = set(got["CUDA_VISIBLE_DEVICES"].split(","))
        assert not uuids & seen  # no GPU given to two workers
        seen |= uuids
    rows = {r["group_id"]: r for r in await rt.ps()}
    assert all(rows[g.id]["state"] == "running" and rows[g.id]["group_state"] == "allocated" for g, _, _ in started)

    group, worker, out = started[1]
    pid = json.loads(out.read_text())["pid"]
    assert await rt.stop(group.id) is True
    assert not alive(pid)
    assert (await rt.manager.get_compute_group(group.id)).allocation_state == "released"
    row = {r["group_id"]: r for r in await rt.ps()}[group.id]
    assert row["state"] == "stopped" and row["pids"] == []
    # The worker stops first; only then is the group released (nobody else can get its GPUs before).
    assert [e.kind for e in rt.manager.recent_events if e.group_id == group.id][-2:] == ["worker-stopped", "released"]


async def test_a_share_of_a_gpu_gets_sharing_hints(rt: LocalRuntime, tmp_path: Path) -> None:
    out = tmp_path / "share.json"
    group, _ = await rt.run(
        "embed", {"gpus": 0.25, "gpu_memory_mib": 20000}, [sys.executable, str(reporter(tmp_path)), str(out)], mps=True
    )
    got = await wait_file(out)
    assert got["CUDA_VISIBLE_DEVICES"] == group.resources["gpu_uuids"][0]
    assert got["COMPUTEGROUPS_GPU_SHARE"] == "0.250"
    assert got["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
    mem = group.resources["gpu_memory_mib"][0]
    assert got["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == f"0={mem}M"
    assert got["COMPUTEGROUPS_GPU_MEMORY_FRACTION"] == f"{mem / 81559:.3f}"


async def test_a_worker_that_exits_releases_its_group(rt: LocalRuntime, tmp_path: Path) -> None:
    out = tmp_path / "short.json"
    group, _ = await rt.run("batch", {"gpus": 8}, [sys.executable, str(reporter(tmp_path)), str(out), "0.2", "3"])
    await wait_file(out)
    for _ in range(200):
        events = await rt.check_workers()
        if events:
            break
        await asyncio.sleep(0.05)
    assert [e.kind for e in events] == ["worker-exited"]
    assert (await rt.manager.get_compute_group(group.id)).allocation_state == "released"
    row = {r["group_id"]: r for r in await rt.ps()}[group.id]
    assert row["state"] == "exited" and "group released" in row["note"]
    again, _ = await rt.run("batch", {"gpus": 8}, [sys.executable, str(reporter(tmp_path)), str(out)])
    assert again.id != group.id


async def test_a_worker_under_the_restart_policy_is_restarted_on_the_same_group(
    rt: LocalRuntime, tmp_path: Path
) -> None:
    out = tmp_path / "flaky.json"
    cmd = [sys.executable, str(reporter(tmp_path)), str(out), "0.1", "1"]
    group, worker = await rt.run("flaky", {"gpus": 1}, cmd, policy="restart")
    first = worker.pids
    restarts = 0
    for _ in range(200):
        await rt.check_workers()
        row = {r["group_id"]: r for r in await rt.ps()}[group.id]
        restarts = row["restarts"]
        if restarts >= 2:
            break
        await asyncio.sleep(0.05)
    assert restarts >= 2 and row["state"] == "running" and row["pids"] != first
    assert "group kept" in row["note"]
    assert (await rt.manager.get_compute_group(group.id)).allocation_state == "allocated"
    got = await wait_file(out)
    assert got["CUDA_VISIBLE_DEVICES"] == group.resources["gpu_uuids"][0]
    assert await rt.stop(group.id)


async def test_reconcile_repairs_what_a_crash_left(rt: LocalRuntime, tmp_path: Path) -> None:
    mgr = rt.manager
    # died after allocating, before launching: an allocation without a worker
    leaked = await mgr.allocate_compute_group("ghost", {"gpus": 2}, {"request_id": REQUEST_PREFIX + "x1"})
    # died after stopping nothing, before releasing... the other way round: a worker whose group is gone
    out = tmp_path / "orphan.json"
    orphan, _ = await rt.run("orphan", {"gpus": 1}, [sys.executable, str(reporter(tmp_path)), str(out)])
    pid = (await wait_file(out))["pid"]
    hooks, mgr.release_hooks[:] = list(mgr.release_hooks), []  # released by a process without this runtime
    await mgr.deallocate_compute_group(orphan.id)
    mgr.release_hooks[:] = hooks
    # a group allocated by someone else (not the runtime) is none of its business
    other = await mgr.allocate_compute_group("library-user", {"gpus": 1})
    events = await mgr.reconcile()
    kinds = {(e.kind, e.group_id) for e in events}
    assert ("reconcile-released", leaked.id) in kinds and ("reconcile-stopped", orphan.id) in kinds
    assert (await mgr.get_compute_group(leaked.id)).allocation_state == "released"
    assert (await mgr.get_compute_group(other.id)).allocation_state == "allocated"
    assert not alive(pid)
    assert await mgr.reconcile() == []  # nothing left to repair


def test_the_control_socket_is_private_and_there_is_no_multicast(daemon: CircusDaemon) -> None:
    daemon.ensure_started()
    assert oct(daemon.socket_path.stat().st_mode & 0o777) == "0o600"
    assert oct(daemon.dir.stat().st_mode & 0o777) == "0o700"
    ini = (daemon.dir / "circus.ini").read_text()
    assert "multicast_endpoint =\n" in ini and "tcp://" not in ini
    assert daemon.endpoint.startswith("ipc://")
    import psutil

    pid = daemon.pid()
    assert pid is not None
    assert psutil.Process(pid).net_connections(kind="inet") == []  # no TCP, no UDP multicast


async def test_workers_of_a_killed_daemon_are_ended_before_their_groups_are_released(tmp_path: Path) -> None:
    import signal

    folder = Path(tempfile.mkdtemp(prefix="cgkill-", dir="/tmp"))
    daemon = CircusDaemon(folder, check_delay=0.1)
    try:
        provider = LocalComputeResourceProvider.from_recording(NVML / "a100_mig.json", "mig")
        mgr = ComputeGroupManager(provider, tmp_path / "state.db")
        rt = LocalRuntime(mgr, daemon, graceful_timeout_s=2)
        async with mgr:
            out = tmp_path / "w.json"
            group, _ = await rt.run(
                "svc", {"gpus": 1, "mig_profile": "1g.10gb"}, [sys.executable, str(reporter(tmp_path)), str(out)]
            )
            pid = (await wait_file(out))["pid"]
            daemon_pid = daemon.pid()
            assert daemon_pid is not None
            os.kill(daemon_pid, signal.SIGKILL)
            while alive(daemon_pid):
                await asyncio.sleep(0.02)
            assert alive(pid)  # orphaned, still on the GPU
            events = await mgr.reconcile()
            assert ("reconcile-released", group.id) in {(e.kind, e.group_id) for e in events}
            assert not alive(pid)
            assert (await mgr.get_compute_group(group.id)).allocation_state == "released"
    finally:
        daemon.quit()
        shutil.rmtree(folder, ignore_errors=True)


def test_the_runtime_folder_is_private_and_never_adopted(tmp_path: Path) -> None:
    from computegroups.runtime import CircusError

    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    CircusDaemon(loose)._prepare_dir()
    assert (loose.stat().st_mode & 0o777) == 0o700  # ours, tightened
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(CircusError, match="not a folder"):
        CircusDaemon(tmp_path / "link")._prepare_dir()
    (tmp_path / "file").write_text("")
    with pytest.raises(CircusError, match="not a folder"):
        CircusDaemon(tmp_path / "file")._prepare_dir()
    if os.getuid() == 0:  # as root, a folder can be handed to someone else to show it is refused
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        with pytest.raises(CircusError, match="owned by uid 65534"):
            CircusDaemon(theirs)._prepare_dir()


async def test_a_damaged_worker_registry_is_an_error_not_an_empty_one(rt: LocalRuntime) -> None:
    from computegroups.errors import ProviderError

    rt.daemon._prepare_dir()
    registry = rt.dir / "workers.json"
    for damage in ("{not json", '["a", "list"]', '{"cg-1": 7}'):
        registry.write_text(damage)
        with pytest.raises(ProviderError, match="damaged"):
            await rt.ps()
    registry.unlink()
    assert await rt.ps() == []


async def test_a_worker_gets_exactly_its_argv(rt: LocalRuntime, tmp_path: Path) -> None:
    # A program in a folder with a space, and arguments circus would otherwise rewrite or split.
    folder = tmp_path / "my dir"
    folder.mkdir()
    prog = folder / "prog"
    out = tmp_path / "argv.json"
    tmp = f"{out}.tmp"
    prog.write_text(
        f"#!{sys.executable}\nimport json, os, sys\n"
        f"open({tmp!r}, 'w').write(json.dumps(sys.argv))\nos.replace({tmp!r}, {str(out)!r})\n"
    )
    prog.chmod(0o755)
    args = ["$(circus.env.HOME)", "$(circus.wid)", "two words", "", "--x=$HOME"]
    group, _ = await rt.run("argv", {"gpus": 1}, [str(prog), *args])
    got = await wait_file(out)
    assert got == [str(prog), *args]
    await rt.manager.deallocate_compute_group(group.id)


async def test_a_crashing_worker_backs_off_then_fails_and_its_group_is_released(
    rt: LocalRuntime, tmp_path: Path
) -> None:
    rt.restart_backoff_s, rt.restart_backoff_max_s, rt.max_restarts = 0.2, 0.4, 3
    out = tmp_path / "crash.json"
    cmd = [sys.executable, str(reporter(tmp_path)), str(out), "0", "3"]  # exits with code 3 at once
    group, _ = await rt.run("crashy", {"gpus": 1}, cmd, policy="restart")
    deadline = asyncio.get_running_loop().time() + 60
    row: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        await rt.check_workers()
        row = {r["group_id"]: r for r in await rt.ps()}[group.id]
        if row["state"] == "failed":
            break
        await asyncio.sleep(0.02)
    assert row["state"] == "failed", row
    assert row["restarts"] == 3 and row["last_exit_code"] == 3 and row["last_exit_at"] is not None
    assert "3 restarts" in row["note"] and "exit code 3" in row["note"] and "group released" in row["note"]
    gaps = [b - a for a, b in zip(row["restart_times"], row["restart_times"][1:], strict=False)]
    assert len(gaps) == 2 and gaps[0] >= 0.2 and gaps[1] >= 0.4  # each waited at least its backoff
    assert (await rt.manager.get_compute_group(group.id)).allocation_state == "released"
    assert any(e.kind == "worker-failed" and e.group_id == group.id for e in rt.manager.recent_events)


async def test_the_exit_code_of_a_worker_is_kept(rt: LocalRuntime, tmp_path: Path) -> None:
    out = tmp_path / "done.json"
    group, _ = await rt.run("once", {"gpus": 1}, [sys.executable, str(reporter(tmp_path)), str(out), "0", "7"])
    await wait_file(out)
    deadline = asyncio.get_running_loop().time() + 30
    row: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline and row.get("state") != "exited":
        await rt.check_workers()
        row = {r["group_id"]: r for r in await rt.ps()}[group.id]
        await asyncio.sleep(0.02)
    assert row["state"] == "exited" and row["last_exit_code"] == 7 and "exit code 7" in row["note"]
