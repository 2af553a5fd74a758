"""Dynamo planner integration against a real etcd, a real circus daemon and stand-in workers.

The stand-in planner (tests/_dynamo_planner.py) writes keys exactly as Dynamo's virtual
connector does; the stand-in workers (tests/_dynamo_worker.py) record the CUDA_VISIBLE_DEVICES
they were given and exit cleanly on SIGTERM. Worker GPU sets are checked from those records,
mapped to GPU indices through the simulated UUIDs.

Skipped when the etcd binary is not built (scripts/k8s-testenv/build), failed instead when
COMPUTEGROUPS_REQUIRE_ETCD=1.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider
from computegroups.integrations.dynamo import (
    ComputeGroupsConnector,
    Decision,
    DynamoActuator,
    WorkerSpec,
    component_name,
    root_key,
)
from computegroups.integrations.etcd import EtcdClient, prefix_end
from computegroups.providers.simulated import simulated_uuid
from computegroups.runtime import CircusDaemon, LocalRuntime
from tests._dynamo_planner import StandInPlanner

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_dynamo_worker.py"
NODE = "box"
SPEC = {"nodes": [{"id": NODE, "preset": "pcie-a6000-nvlink-pairs"}]}
PAIRS = [{0, 1}, {2, 3}, {4, 5}, {6, 7}]
UUID_TO_INDEX = {simulated_uuid(NODE, i): i for i in range(8)}


# -- pure parts --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, Decision()),
        ({"num_prefill_workers": "2", "num_decode_workers": "1", "decision_id": "0"}, Decision(2, 1, 0)),
        ({"num_decode_workers": "3", "decision_id": "7", "scaled_decision_id": "6"}, Decision(None, 3, 7, 6)),
        ({"num_prefill_workers": "two", "decision_id": "-1"}, Decision()),
        ({"num_prefill_workers": " 4\n"}, Decision(4)),
    ],
)
def test_decision_parsing(values: dict[str, str], expected: Decision) -> None:
    assert Decision.from_values(values) == expected


def test_keys_and_names() -> None:
    assert root_key("dynamo") == "v1/dynamo/planner/"
    assert component_name("dynamo", "prefill") == "dynamo/dynamo/prefill"
    assert prefix_end("v1/ns/planner/") == "v1/ns/planner0"
    with pytest.raises(Exception, match="whole number"):
        WorkerSpec(-1, ("x",))


# -- etcd ---------------------------------------------------------------------------------
def _etcd_binary() -> Path | None:
    explicit = os.environ.get("COMPUTEGROUPS_ETCD_BIN")
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    script = REPO / "scripts" / "k8s-testenv" / "build"
    if script.exists():
        done = subprocess.run(["bash", str(script), "--print-bin-dir"], capture_output=True, text=True, check=False)
        candidate = Path(done.stdout.strip().splitlines()[-1]) / "etcd" if done.stdout.strip() else None
        if candidate is not None and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("etcd")
    return Path(found) if found else None


def _free_ports(n: int) -> list[int]:
    import socket

    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def etcd_url() -> Iterator[str]:
    binary = _etcd_binary()
    if binary is None:
        message = "etcd is not built: run scripts/k8s-testenv/build (or set COMPUTEGROUPS_ETCD_BIN)"
        if os.environ.get("COMPUTEGROUPS_REQUIRE_ETCD") == "1":
            pytest.fail(message)
        pytest.skip(message)
    work = Path(tempfile.mkdtemp(prefix="cg-etcd-"))
    client, peer = _free_ports(2)
    url, peer_url = f"http://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    log = open(work / "etcd.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            str(binary),
            "--name=default",
            f"--data-dir={work / 'data'}",
            f"--listen-client-urls={url}",
            f"--advertise-client-urls={url}",
            f"--listen-peer-urls={peer_url}",
            f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=default={peer_url}",
            "--unsafe-no-fsync",
            "--log-level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if json.load(urllib.request.urlopen(url + "/health", timeout=1)).get("health") == "true":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"etcd did not start: {(work / 'etcd.log').read_text()[-2000:]}")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


# -- what the workers recorded ------------------------------------------------------------------
def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Seen:
    pid: int
    mode: str
    gpus: set[int]
    group_id: str
    terminated: bool


def records(record_dir: Path) -> list[Seen]:
    out = []
    for f in sorted(record_dir.glob("*.json")):
        r = json.loads(f.read_text())
        gpus = {UUID_TO_INDEX[u] for u in r["cuda_visible_devices"].split(",") if u}
        out.append(Seen(r["pid"], r["mode"], gpus, r["group_id"], (record_dir / f"{r['pid']}.term").exists()))
    return out


def live(record_dir: Path) -> list[Seen]:
    return [s for s in records(record_dir) if alive(s.pid)]


def check_gpus(workers: list[Seen], tp: int = 2) -> None:
    """Disjoint GPU sets, each of the TP size and on one NVLink pair."""
    held: set[int] = set()
    for w in workers:
        assert len(w.gpus) == tp, w
        assert w.gpus in PAIRS, f"worker {w.pid} got GPUs {sorted(w.gpus)}, not an NVLink pair"
        assert not (held & w.gpus), f"GPUs {sorted(held & w.gpus)} given twice"
        held |= w.gpus


def wait_until(cond: Any, timeout_s: float = 30.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


async def held_groups(state: Path, namespace: str) -> dict[str, set[int]]:
    """Held groups of the namespace's components: group id -> GPU indices."""
    provider = SimulatedComputeResourceProvider.from_spec(SPEC)
    async with ComputeGroupManager(provider, state, reconcile_on_start=False) as mgr:
        groups = await mgr.list_compute_groups()
    prefix = f"dynamo/{namespace}/"
    return {g.id: set(g.resources["gpu_indices"]) for g in groups if (g.component or "").startswith(prefix)}


def worker_cmd(record_dir: Path, mode: str) -> str:
    return (
        f"{sys.executable} {WORKER} --record-dir {record_dir} --model Qwen/Qwen3-0.6B "
        f"--disaggregation-mode {mode} --tensor-parallel-size 2"
    )


# -- the scaling scenario, with the actuator as its own process ----------------------------------------
@pytest.mark.etcd
@pytest.mark.circus
def test_scaling_scenario_restart_and_sigkill(etcd_url: str, daemon: CircusDaemon, tmp_path: Path) -> None:
    ns = "scen"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    state = tmp_path / "state.db"
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    etcd = EtcdClient(etcd_url)
    argv = [
        sys.executable, "-m", "computegroups.cli", "--spec", str(spec_file), "--state", str(state),
        "dynamo-actuate", "--namespace", ns, "--etcd", etcd_url, "--runtime-dir", str(daemon.dir),
        "--prefill-gpus", "2", "--decode-gpus", "2", "--nvlink", "--poll-interval", "0.5",
        "--graceful-timeout", "5", "-v",
        "--prefill-cmd", worker_cmd(record_dir, "prefill"), "--decode-cmd", worker_cmd(record_dir, "decode"),
    ]  # fmt: skip
    logs = tmp_path / "actuator.log"

    def start_actuator() -> subprocess.Popen[bytes]:
        with open(logs, "ab") as fh:
            return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)

    def counts() -> dict[str, int]:
        out = {"prefill": 0, "decode": 0}
        for s in live(record_dir):
            out[s.mode] += 1
        return out

    def agree(p: int, d: int, decision_id: int) -> None:
        """Running workers, held groups and the acknowledged decision agree; nothing orphaned or leaked."""
        wait_until(lambda: counts() == {"prefill": p, "decode": d}, 20, f"{p} prefill + {d} decode")
        workers = live(record_dir)
        check_gpus(workers)
        groups = asyncio.run(held_groups(state, ns))
        assert {w.group_id for w in workers} == set(groups), (workers, groups)
        for w in workers:
            assert groups[w.group_id] == w.gpus
        registry = json.loads((daemon.dir / "workers.json").read_text())
        running = {
            gid for gid, w in registry.items() if w["state"] == "running" and w["component"].startswith(f"dynamo/{ns}/")
        }
        assert running == set(groups), "the runtime's registry disagrees with the held groups"
        assert {f"w-{gid}" for gid in groups} <= set(daemon.watchers())
        for s in records(record_dir):  # every worker that ever ran is either counted or gone
            assert alive(s.pid) == (s.group_id in groups), s
        assert etcd.get(root_key(ns) + "scaled_decision_id") == str(decision_id)

    actuator = start_actuator()
    try:
        planner = StandInPlanner(etcd, ns)
        t0 = time.monotonic()
        # 0 -> 2 prefill + 1 decode
        assert planner.decide(2, 1) == 0
        agree(2, 1, 0)
        up_s = time.monotonic() - t0
        before = {s.pid: s for s in live(record_dir)}

        # down: 1 prefill + 1 decode; the newest prefill gets SIGTERM and is waited for
        assert planner.decide(1, 1) == 1
        agree(1, 1, 1)
        gone = [s for s in records(record_dir) if s.pid in before and not alive(s.pid)]
        assert len(gone) == 1 and gone[0].mode == "prefill" and gone[0].terminated
        newest_prefill = max((s for s in before.values() if s.mode == "prefill"), key=lambda s: s.pid)
        assert gone[0].pid == newest_prefill.pid

        # planner restart: its keys vanish with its lease, the actuator withdraws its ack,
        # and the new planner starts again from decision_id 0
        planner.stop()
        wait_until(lambda: etcd.get(root_key(ns) + "scaled_decision_id") is None, 15, "ack withdrawn")
        planner = StandInPlanner(etcd, ns)
        assert planner.decide(1, 2) == 0
        agree(1, 2, 0)

        # actuator SIGKILLed in the middle of scaling to 3 prefill + 1 decode, then restarted
        terms = set(record_dir.glob("*.term"))
        planner.decide(3, 1, wait=False)
        # kill right after the scale-down step (a decode stopped), while the scale-up is under way
        wait_until(lambda: set(record_dir.glob("*.term")) != terms, 20, "the scale-down step")
        actuator.send_signal(signal.SIGKILL)
        actuator.wait(10)
        at_kill = counts()
        actuator = start_actuator()
        planner.wait_ready(30)
        agree(3, 1, 1)
        print(f"scale-up 0 -> 2+1 took {up_s:.2f}s; workers when the actuator was killed: {at_kill}")
        planner.stop()
    finally:
        actuator.terminate()
        actuator.wait(15)
        for s in live(record_dir):
            os.kill(s.pid, signal.SIGTERM)
        if os.environ.get("CG_DYNAMO_SHOW_LOG"):
            print(logs.read_text())


# -- an unmeetable decision: acknowledged, reported, and converged later (actuator in process) ---------------
@pytest.mark.etcd
@pytest.mark.circus
async def test_shortfall_acknowledged_reported_and_converged(
    etcd_url: str, daemon: CircusDaemon, tmp_path: Path
) -> None:
    ns = "short"
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    etcd = EtcdClient(etcd_url)
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "state.db")
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=5)
    specs = {
        role: WorkerSpec(2, tuple(worker_cmd(record_dir, role).split()), constraints={"nvlink": True})
        for role in ("prefill", "decode")
    }
    async with mgr:
        foreign = await mgr.allocate_compute_group("someone-else", {"gpus": 2}, {"nvlink": True})
        actuator = DynamoActuator(runtime, etcd, ns, specs, poll_interval_s=0.3)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(actuator.run(stop))
        planner = StandInPlanner(etcd, ns)
        try:
            # 2 + 2 workers of 2 GPUs need 8; 6 are free: acknowledged anyway, shortfall reported
            did = await asyncio.to_thread(planner.decide, 2, 2, wait=False)
            await asyncio.to_thread(planner.wait_ready, 30)
            assert planner.scaled() == did == 0
            assert await actuator.counts() == {"prefill": 2, "decode": 1}
            shortfalls = [e for e in mgr.recent_events if e.kind == "dynamo-shortfall"]
            assert shortfalls, "the shortfall was not reported"
            assert shortfalls[-1].component == component_name(ns, "decode")
            assert "1 short" in shortfalls[-1].detail and "wants 2 decode" in shortfalls[-1].detail
            assert actuator.last_outcome is not None and actuator.last_outcome.shortfall == {"decode": 1}

            # capacity frees: the actuator keeps converging, without a new decision
            await mgr.deallocate_compute_group(foreign.id)
            deadline = time.monotonic() + 20
            while not any(e.kind == "dynamo-converged" for e in mgr.recent_events):
                assert time.monotonic() < deadline, "did not converge after capacity freed"
                await asyncio.sleep(0.1)
            assert await actuator.counts() == {"prefill": 2, "decode": 2}
            check_gpus(live(record_dir))
            assert len(live(record_dir)) == 4

            # scale to zero before leaving
            await asyncio.to_thread(planner.decide, 0, 0)
            assert await actuator.counts() == {"prefill": 0, "decode": 0}
            assert all(s.terminated for s in records(record_dir))
        finally:
            stop.set()
            await task
            await asyncio.to_thread(planner.stop)
            for s in live(record_dir):
                os.kill(s.pid, signal.SIGTERM)


# -- the in-process PlannerConnector ------------------------------------------------------------------
@dataclass
class Target:
    """Shaped like Dynamo's TargetReplica."""

    sub_component_type: str
    desired_replicas: int
    component_name: str | None = None


@pytest.mark.circus
async def test_connector(daemon: CircusDaemon, tmp_path: Path) -> None:
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "state.db")
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=5)
    specs = {
        "prefill": WorkerSpec(2, tuple(worker_cmd(record_dir, "prefill").split()), constraints={"nvlink": True}),
        "decode": WorkerSpec(2, tuple(worker_cmd(record_dir, "decode").split()), constraints={"nvlink": True}),
    }
    async with mgr:
        conn = ComputeGroupsConnector(runtime, "inproc", specs, "Qwen/Qwen3-0.6B")
        await conn.async_init()
        await conn.validate_deployment()
        assert conn.get_model_name() == "qwen/qwen3-0.6b"
        assert conn.get_gpu_counts() == (2, 2)
        p_shape, d_shape = conn.get_gpu_shapes()
        assert (p_shape.gpus_per_engine, d_shape.gpus_per_replica) == (2, 2)
        info = conn.get_worker_info("decode")
        assert info.component_name == "dynamo/inproc/decode" and info.model_name == "qwen/qwen3-0.6b"

        await conn.set_component_replicas([Target("prefill", 1), Target("decode", 2)])
        assert await conn.get_actual_worker_counts() == (1, 2, True)
        check_gpus(live(record_dir))
        await conn.set_component_replicas([Target("decode", 1)], blocking=False)
        await conn.wait_for_deployment_ready()
        assert await conn.get_actual_worker_counts() == (1, 1, True)
        await conn.set_component_replicas([Target("prefill", 0), Target("decode", 0)])
        assert await conn.get_actual_worker_counts() == (0, 0, True)
        await conn.close()

        too_big = ComputeGroupsConnector(runtime, "big", {"prefill": WorkerSpec(16, ("true",))}, "m")
        with pytest.raises(Exception, match="largest node has 8"):
            await too_big.validate_deployment(require_decode=False)
        with pytest.raises(Exception, match="no command"):
            await too_big.validate_deployment(require_prefill=False)
