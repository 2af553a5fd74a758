"""Dynamo planner integration against Dynamo's own code, a real etcd and a real circus daemon.

The planner is Dynamo 1.6.1's ``VirtualConnectorCoordinator`` (package ai-dynamo-runtime) in a
process of its own (tests/_dynamo_planner.py), counting workers as Dynamo's planner does: clients
of ``{namespace}.{component}.{endpoint}`` and their instance ids. The workers
(tests/_dynamo_worker.py --register) serve a real Dynamo endpoint on a ``DistributedRuntime`` and so
register in Dynamo's discovery in etcd; they also record the CUDA_VISIBLE_DEVICES and Dynamo
settings they were given. Worker GPU sets are checked from those records, mapped to GPU indices
through the simulated UUIDs. Every server binds the loopback interface.

Skipped when the etcd binary is not built (scripts/k8s-testenv/build) or Dynamo's runtime is not
installed (extra ``dynamo-test``); failed instead with COMPUTEGROUPS_REQUIRE_ETCD=1 /
COMPUTEGROUPS_REQUIRE_DYNAMO=1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider
from computegroups.errors import InvalidRequestError
from computegroups.integrations.dynamo import (
    ComputeGroupsConnector,
    Decision,
    DynamoActuator,
    HealthReadiness,
    WorkerSpec,
    component_name,
    instances_prefix,
    root_key,
)
from computegroups.integrations.dynamo.metrics import ActuatorCollector
from computegroups.integrations.dynamo.readiness import parse_instance
from computegroups.integrations.etcd import EtcdClient, prefix_end
from computegroups.providers.simulated import simulated_uuid
from computegroups.runtime import CircusDaemon, LocalRuntime
from computegroups.service.cli import serve_metrics
from tests._dynamo_planner import LOOPBACK, RealPlanner, RecordPlanner
from tests.conftest import a6000_spec

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_dynamo_worker.py"
NODE = "box"
SPEC = {"nodes": [{"id": NODE, "preset": "pcie-a6000-nvlink-pairs"}]}
PAIRS = [{0, 1}, {2, 3}, {4, 5}, {6, 7}]
UUID_TO_INDEX = {simulated_uuid(NODE, i): i for i in range(8)}
DYNAMO_COMPONENT = {"prefill": "prefill", "decode": "backend"}


# -- pure parts --------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, Decision()),
        ({"num_prefill_workers": "2", "num_decode_workers": "1", "decision_id": "0"}, Decision(2, 1, 0)),
        ({"num_decode_workers": "3", "decision_id": "7", "scaled_decision_id": "6"}, Decision(None, 3, 7, 6)),
        ({"num_prefill_workers": "two", "decision_id": "-1"}, Decision()),
        ({"num_prefill_workers": " 4\n"}, Decision(4)),
        # Dynamo's next format: one JSON record, authoritative over the three keys
        (
            {
                "scaling_decision": '{"num_prefill_workers": 1, "num_decode_workers": 3, "decision_id": 5}',
                "num_prefill_workers": "9",
                "decision_id": "9",
                "scaled_decision_id": "4",
            },
            Decision(1, 3, 5, 4, source="record"),
        ),
        (
            {"scaling_decision": '{"num_prefill_workers": -1, "num_decode_workers": null, "decision_id": 0}'},
            Decision(None, None, 0, source="record"),
        ),
        (
            {"scaling_decision": '{"num_prefill_workers": true, "decision_id": 1.5}'},
            Decision(None, None, None, source="record"),
        ),
    ],
)
def test_decision_parsing(values: dict[str, str], expected: Decision) -> None:
    assert Decision.from_values(values) == expected


def test_an_unreadable_record_is_an_error_not_a_fallback() -> None:
    d = Decision.from_values({"scaling_decision": "[1, 2", "num_prefill_workers": "2", "decision_id": "3"})
    assert d.decision_id is None and d.source == "record"
    assert d.error is not None and "not a JSON object" in d.error


def test_keys_and_names() -> None:
    assert root_key("dynamo") == "v1/dynamo/planner/"
    assert component_name("dynamo", "prefill") == "dynamo/dynamo/prefill"
    assert instances_prefix("ns", "backend", "generate") == "v1/instances/ns/backend/generate/"
    assert prefix_end("v1/ns/planner/") == "v1/ns/planner0"
    with pytest.raises(InvalidRequestError, match="whole number"):
        WorkerSpec(-1, ("x",))
    with pytest.raises(InvalidRequestError, match="not a Dynamo name"):
        WorkerSpec(1, ("x",), dynamo_component="a.b")
    with pytest.raises(InvalidRequestError, match="not a Dynamo name"):
        WorkerSpec(1, ("x",), dynamo_endpoint="")
    with pytest.raises(InvalidRequestError, match=r"only \{port\} and \{group_id\}"):
        HealthReadiness("http://127.0.0.1:{pot}/health")
    with pytest.raises(InvalidRequestError, match="not an http"):
        HealthReadiness("127.0.0.1/health")


def test_parse_instance() -> None:
    # A key and value as Dynamo 1.6.1's etcd discovery writes them.
    key = "v1/instances/ns/backend/generate/2040a23384d14c16"
    value = json.dumps(
        {
            "type": "Endpoint",
            "component": "backend",
            "endpoint": "generate",
            "namespace": "ns",
            "instance_id": 2324035749878516758,
            "transport": {"tcp": "127.0.0.1:38245/2040a23384d14c16/ns/backend/generate"},
        }
    )
    inst = parse_instance(key, value)
    assert inst is not None
    assert (inst.namespace, inst.component, inst.endpoint) == ("ns", "backend", "generate")
    assert (inst.instance_id, inst.host, inst.port) == (2324035749878516758, "127.0.0.1", 38245)
    nats = parse_instance(key, json.dumps({"type": "Endpoint", "transport": {"nats_tcp": "subject"}}))
    assert nats is not None and nats.port is None and nats.component == "backend"
    assert parse_instance(key, "not json") is None
    assert parse_instance("v1/instances/short", "{}") is None


@pytest.mark.parametrize(
    "argv",
    [
        ["--namespace", "a.b", "--decode-cmd", "true"],
        ["--namespace", "ns", "--decode-cmd", "true", "--decode-component", "x/y"],
        ["--namespace", "ns", "--decode-cmd", "true", "--ready", "health"],
        ["--namespace", "ns", "--decode-cmd", "true", "--health-url", "http://127.0.0.1:{port}/health"],
        ["--namespace", "ns", "--decode-cmd", "true", "--max-start-failures", "0"],
        ["--namespace", "ns", "--decode-cmd", "true", "--ready", "health", "--health-url", "h:{port}"],
        ["--namespace", "ns", "--decode-cmd", "true", "--etcd", "ftp://127.0.0.1:2379"],
        ["--namespace", "ns", "--decode-cmd", "true", "--etcd", "http://127.0.0.1:2379", "--etcd-ca", "/etc/hostname"],
        ["--namespace", "ns", "--decode-cmd", "true", "--etcd", "https://127.0.0.1:2379", "--etcd-ca", "/nonexistent"],
        [
            "--namespace",
            "ns",
            "--decode-cmd",
            "true",
            "--etcd",
            "https://127.0.0.1:2379",
            "--etcd-cert",
            "/etc/hostname",
        ],
        ["--namespace", "ns", "--decode-cmd", "true", "--etcd-user", "root"],
        ["--namespace", "ns"],
    ],
)
def test_cli_bad_input_is_exit_2_with_one_line(argv: list[str], tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "computegroups.cli", "--simulate", "--state", str(tmp_path / "s.db")]
    out = subprocess.run(
        [*cli, "dynamo-actuate", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2, out
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


# -- etcd and Dynamo's runtime ------------------------------------------------------------
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


def _start_etcd(work: Path, scheme: str, *extra: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = _etcd_binary()
    if binary is None or (scheme == "https" and shutil.which("openssl") is None):
        message = "etcd is not built (scripts/k8s-testenv/build, or COMPUTEGROUPS_ETCD_BIN) or openssl is missing"
        if os.environ.get("COMPUTEGROUPS_REQUIRE_ETCD") == "1":
            pytest.fail(message)
        pytest.skip(message)
    client, peer = _free_ports(2)
    url, peer_url = f"{scheme}://127.0.0.1:{client}", f"http://127.0.0.1:{peer}"
    log = open(work / "etcd.log", "wb")  # noqa: SIM115 - the process holds it
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
            *extra,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    return proc, url


def _wait_healthy(proc: subprocess.Popen[bytes], url: str, work: Path, context: ssl.SSLContext | None) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=1, context=context) as resp:
                if json.load(resp).get("health") == "true":
                    return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"etcd did not start: {(work / 'etcd.log').read_text()[-2000:]}")
        time.sleep(0.1)


def _stop(proc: subprocess.Popen[bytes], work: Path) -> None:
    proc.terminate()
    proc.wait(10)
    shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def etcd_url() -> Iterator[str]:
    """A real etcd on loopback (built from Go modules), for the module's tests."""
    work = Path(tempfile.mkdtemp(prefix="cg-etcd-"))
    proc, url = _start_etcd(work, "http")
    try:
        _wait_healthy(proc, url, work, None)
        yield url
    finally:
        _stop(proc, work)


@pytest.fixture(scope="module")
def dynamo_runtime() -> None:
    """Dynamo's own runtime (ai-dynamo-runtime) must be importable."""
    try:
        import dynamo._core  # noqa: F401
    except ImportError as exc:
        message = f"Dynamo's runtime is not installed (pip install -e '.[dynamo-test]'): {exc}"
        if os.environ.get("COMPUTEGROUPS_REQUIRE_DYNAMO") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def loopback_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """This process's environment for workers: Dynamo's servers on loopback; no namespace or etcd of its own."""
    for name in list(os.environ):
        if name.startswith("DYN_") or name == "ETCD_ENDPOINTS":
            monkeypatch.delenv(name)
    for name, value in LOOPBACK.items():
        monkeypatch.setenv(name, value)
    return dict(os.environ)


# -- what the workers recorded, and what discovery holds ---------------------------------------------
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
    data: dict[str, Any]


def records(record_dir: Path) -> list[Seen]:
    out = []
    for f in sorted(record_dir.glob("*.json")):
        r = json.loads(f.read_text())
        gpus = {UUID_TO_INDEX[u] for u in r["cuda_visible_devices"].split(",") if u}
        out.append(Seen(r["pid"], r["mode"], gpus, r["group_id"], (record_dir / f"{r['pid']}.term").exists(), r))
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


def registered(etcd: EtcdClient, namespace: str, record_dir: Path) -> dict[str, list[Seen]]:
    """Per role, the recorded workers that own a key in Dynamo's discovery now (each key must be owned by one)."""
    listeners = {
        c.laddr.port: c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.pid and c.laddr
    }
    by_pid = {s.pid: s for s in records(record_dir)}
    out: dict[str, list[Seen]] = {}
    for role, comp in DYNAMO_COMPONENT.items():
        kvs, _ = etcd.get_prefix(instances_prefix(namespace, comp, "generate"))
        out[role] = []
        for key, kv in kvs.items():
            inst = parse_instance(key, kv.value)
            assert inst is not None and inst.port is not None, (key, kv.value)
            owner = by_pid.get(listeners.get(inst.port, -1))
            assert owner is not None and alive(owner.pid), f"{key} belongs to no live worker"
            assert owner.mode == role, (key, owner)
            out[role].append(owner)
    return out


def scrape(url: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """GET ``url``/metrics, parsed by Prometheus's own parser: samples by name."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def per_role(samples: dict[str, list[tuple[dict[str, str], float]]], name: str, namespace: str) -> dict[str, float]:
    """A per-role series by role, each labelled with the role's compute-group component."""
    out = {}
    for labels, value in samples.get(name, []):
        assert labels["component"] == component_name(namespace, labels["role"]), labels
        out[labels["role"]] = value
    return out


def decisions_of(samples: dict[str, list[tuple[dict[str, str], float]]], namespace: str) -> dict[str, float]:
    """``computegroups_dynamo_decisions_total`` of ``namespace`` by outcome."""
    series = samples["computegroups_dynamo_decisions_total"]
    return {lb["outcome"]: v for lb, v in series if lb["namespace"] == namespace}


async def held_groups(state: Path, namespace: str) -> dict[str, set[int]]:
    """Held groups of the namespace's components: group id -> GPU indices."""
    provider = SimulatedComputeResourceProvider.from_spec(SPEC)
    async with ComputeGroupManager(provider, state, reconcile_on_start=False) as mgr:
        groups = await mgr.list_compute_groups()
    prefix = f"dynamo/{namespace}/"
    return {g.id: set(g.resources["gpu_indices"]) for g in groups if (g.component or "").startswith(prefix)}


def worker_cmd(record_dir: Path, mode: str, *extra: str) -> str:
    """The worker's command: nothing about the namespace, the component or etcd on it."""
    return (
        f"{sys.executable} {WORKER} --record-dir {record_dir} --model Qwen/Qwen3-0.6B "
        f"--disaggregation-mode {mode} --tensor-parallel-size 2 " + " ".join(extra)
    ).strip()


def worker_specs(
    record_dir: Path, prefill: tuple[str, ...] = ("--register",), decode: tuple[str, ...] = ("--register",)
) -> dict[str, WorkerSpec]:
    return {
        role: WorkerSpec(2, tuple(worker_cmd(record_dir, role, *extra).split()), constraints={"nvlink": True})
        for role, extra in (("prefill", prefill), ("decode", decode))
    }


# -- what docs/dynamo.md says Dynamo 1.6.1 does, observed on its own code -------------------------------------
def _lease_ttl(etcd_url: str, lease: int) -> int:
    request = urllib.request.Request(
        etcd_url + "/v3/lease/timetolive", json.dumps({"ID": str(lease)}).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        return int(json.load(resp)["grantedTTL"])


@pytest.mark.etcd
def test_dynamo_1_6_1_facts(etcd_url: str, dynamo_runtime: None, loopback_env: dict[str, str], tmp_path: Path) -> None:
    ns = "facts"
    root = root_key(ns)
    etcd = EtcdClient(etcd_url)
    planner = RealPlanner(etcd_url, ns, tmp_path / "planner.log")
    try:
        assert planner.is_ready()  # no decision yet
        assert planner.decide(2, 1) == 0
        kvs, _ = etcd.get_prefix(root)
        assert {k.removeprefix(root): kv.value for k, kv in kvs.items()} == {
            "num_prefill_workers": "2",
            "num_decode_workers": "1",
            "decision_id": "0",
        }
        # One transaction (one revision), under one lease of 30 s.
        assert len({kv.mod_revision for kv in kvs.values()}) == 1
        (lease,) = {kv.lease for kv in kvs.values()}
        assert lease and _lease_ttl(etcd_url, lease) == 30
        assert not planner.is_ready()
        # Dropped while the last decision is unacknowledged.
        assert planner.decide(3, 3) == 0
        etcd.put(root + "scaled_decision_id", "0")
        wait_until(planner.is_ready, 30, "the coordinator to see the acknowledgement")
        # A role once set is written again with every decision.
        assert planner.decide(None, 3) == 1
        after, _ = etcd.get_prefix(root)
        assert after[root + "num_prefill_workers"].value == "2"
        assert after[root + "num_prefill_workers"].mod_revision == after[root + "decision_id"].mod_revision
        assert after[root + "num_prefill_workers"].mod_revision > kvs[root + "num_prefill_workers"].mod_revision
        # Ready means scaled_decision_id >= decision_id: a larger, stale acknowledgement passes.
        etcd.put(root + "scaled_decision_id", "7")
        wait_until(planner.is_ready, 30, "the coordinator to take a larger acknowledgement")
        # Killed, its keys stay until the lease runs out, and a new coordinator continues from them.
        planner.kill()
        assert etcd.get(root + "decision_id") == "1"
        planner = RealPlanner(etcd_url, ns, tmp_path / "planner.log")
        assert planner.state() == {"prefill": 2, "decode": 3, "decision_id": 1}
        assert planner.decide(1, 1) == 2  # (its keys are now under its own lease)
        kvs, _ = etcd.get_prefix(root)
        assert {kv.lease for k, kv in kvs.items() if k != root + "scaled_decision_id"} != {lease}
        # Stopped, its runtime revokes the lease: the keys go at once.
        planner.stop()
        assert set(etcd.get_prefix(root)[0]) == {root + "scaled_decision_id"}
    finally:
        planner.kill()

    # A worker's registration: v1/instances/NS/COMPONENT/ENDPOINT/ID under a 30 s lease, gone on SIGTERM.
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    env = {
        **loopback_env,
        "ETCD_ENDPOINTS": etcd_url,
        "DYN_NAMESPACE": ns,
        "COMPUTEGROUPS_DYNAMO_COMPONENT": "backend",
        "COMPUTEGROUPS_DYNAMO_ENDPOINT": "generate",
    }
    with open(tmp_path / "worker.log", "wb") as log:
        worker = subprocess.Popen(
            worker_cmd(record_dir, "decode", "--register").split(), env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_until(lambda: etcd.get_prefix(instances_prefix(ns, "backend", "generate"))[0], 60, "registration")
            ((key, kv),) = etcd.get_prefix(instances_prefix(ns, "backend", "generate"))[0].items()
            inst = parse_instance(key, kv.value)
            assert inst is not None and (inst.namespace, inst.component, inst.endpoint) == (ns, "backend", "generate")
            assert inst.host == "127.0.0.1" and inst.port is not None
            assert _lease_ttl(etcd_url, kv.lease) == 30
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(30) == 0
            assert etcd.get(key) is None
        finally:
            if worker.poll() is None:
                worker.kill()
                worker.wait(10)


# -- the scaling sequence: Dynamo's real coordinator, real registered workers, the actuator as its own process ---
@pytest.mark.etcd
@pytest.mark.circus
def test_real_planner_scaling_sequence_restart_and_sigkill(
    etcd_url: str, dynamo_runtime: None, daemon: CircusDaemon, loopback_env: dict[str, str], tmp_path: Path
) -> None:
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
        "--graceful-timeout", "10", "-v",
        # Each worker "loads" for a second before it registers: running is not ready.
        "--prefill-cmd", worker_cmd(record_dir, "prefill", "--register", "--load-time", "1"),
        "--decode-cmd", worker_cmd(record_dir, "decode", "--register", "--load-time", "1"),
    ]  # fmt: skip
    logs = tmp_path / "actuator.log"
    # The actuator's own environment names no etcd, and Dynamo's default namespace: neither may reach
    # the workers, who must join the planner's namespace and the --etcd given.
    assert "ETCD_ENDPOINTS" not in loopback_env
    actuator_env = {**loopback_env, "DYN_NAMESPACE": "dynamo"}

    def start_actuator() -> subprocess.Popen[bytes]:
        with open(logs, "ab") as fh:
            return subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=actuator_env)

    def counts() -> dict[str, int]:
        out = {"prefill": 0, "decode": 0}
        for s in live(record_dir):
            out[s.mode] += 1
        return out

    def step(planner: RealPlanner, p: int, d: int, decision_id: int | None = None) -> int:
        """One decision; once the real coordinator says it is ready, discovery holds exactly the workers decided."""
        if decision_id is None:
            decision_id = planner.decide(p, d)
        planner.wait_ready(90)
        # The acknowledgement is written only after registration: what discovery holds now is final.
        found = registered(etcd, ns, record_dir)
        assert {r: len(v) for r, v in found.items()} == {"prefill": p, "decode": d}, found
        wait_until(lambda: planner.counts() == (p, d), 30, f"the planner's discovery to count {p} + {d}")
        agree(p, d, decision_id, found)
        return decision_id

    def agree(p: int, d: int, decision_id: int, found: dict[str, list[Seen]]) -> None:
        """Registered workers, running workers, held groups and the acknowledgement agree; nothing leaked."""
        assert counts() == {"prefill": p, "decode": d}
        workers = live(record_dir)
        check_gpus(workers)
        assert {s.pid for v in found.values() for s in v} == {s.pid for s in workers}
        for s in workers:  # each joined the planner's namespace and etcd with nothing on its command line
            assert s.data["namespace"] == ns and s.data["etcd_endpoints"] == etcd_url
            assert s.data["dynamo_component"] == DYNAMO_COMPONENT[s.mode]
            assert ns not in s.data["argv"] and etcd_url not in s.data["argv"]
        groups = asyncio.run(held_groups(state, ns))
        assert {w.group_id for w in workers} == set(groups), (workers, groups)
        for w in workers:
            assert groups[w.group_id] == w.gpus
        registry = json.loads((daemon.dir / "workers.json").read_text())
        running = {
            gid for gid, w in registry.items() if w["state"] == "running" and w["component"].startswith(f"dynamo/{ns}/")
        }
        assert running == set(groups), "the runtime's registry disagrees with the held groups"
        for s in records(record_dir):  # every worker that ever ran is either counted or gone
            assert alive(s.pid) == (s.group_id in groups), s
        assert etcd.get(root_key(ns) + "scaled_decision_id") == str(decision_id)

    actuator = start_actuator()
    planner = RealPlanner(etcd_url, ns, tmp_path / "planner.log")
    try:
        # 0 -> 2 prefill + 1 decode
        assert step(planner, 2, 1) == 0
        before = {s.pid: s for s in live(record_dir)}

        # down: 1 prefill + 1 decode; the newest prefill gets SIGTERM and leaves discovery
        assert step(planner, 1, 1) == 1
        gone = [s for s in records(record_dir) if s.pid in before and not alive(s.pid)]
        assert len(gone) == 1 and gone[0].mode == "prefill" and gone[0].terminated
        assert gone[0].pid == max((s for s in before.values() if s.mode == "prefill"), key=lambda s: s.pid).pid

        # planner restart: its lease is revoked and its keys vanish, the actuator withdraws its ack,
        # and the new coordinator starts again from decision_id 0
        planner.stop()
        wait_until(lambda: etcd.get(root_key(ns) + "scaled_decision_id") is None, 30, "ack withdrawn")
        planner = RealPlanner(etcd_url, ns, tmp_path / "planner.log")
        assert planner.state()["decision_id"] == -1
        assert step(planner, 1, 2) == 0

        # actuator SIGKILLed in the middle of scaling to 3 prefill + 1 decode, then restarted
        terms = set(record_dir.glob("*.term"))
        did = planner.decide(3, 1)
        assert did == 1
        wait_until(lambda: set(record_dir.glob("*.term")) != terms, 30, "the scale-down step")
        actuator.send_signal(signal.SIGKILL)
        actuator.wait(10)
        actuator = start_actuator()
        step(planner, 3, 1, decision_id=did)

        # planner killed and restarted before its lease ran out: the new coordinator reads the old
        # keys back and goes on counting from there
        planner.kill()
        planner = RealPlanner(etcd_url, ns, tmp_path / "planner.log")
        assert planner.state() == {"prefill": 3, "decode": 1, "decision_id": 1}
        assert step(planner, 2, 1) == 2
        planner.stop()
    finally:
        planner.kill()
        actuator.terminate()
        actuator.wait(30)
        for s in live(record_dir):
            os.kill(s.pid, signal.SIGTERM)
        if os.environ.get("CG_DYNAMO_SHOW_LOG"):
            print(logs.read_text())


# -- a planner that dies and is restarted at once must not be held up when its old keys run out ---------------
@pytest.mark.etcd
@pytest.mark.circus
@pytest.mark.slow
async def test_planner_killed_and_restarted_is_not_blocked_when_its_old_keys_expire(
    etcd_url: str, dynamo_runtime: None, daemon: CircusDaemon, loopback_env: dict[str, str], tmp_path: Path
) -> None:
    ns = "expire"
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    etcd = EtcdClient(etcd_url)
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "state.db")
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=10)
    async with mgr:
        actuator = DynamoActuator(runtime, etcd, ns, worker_specs(record_dir), poll_interval_s=0.5)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(actuator.run(stop))
        planner = await asyncio.to_thread(RealPlanner, etcd_url, ns, tmp_path / "planner.log")
        try:
            assert await asyncio.to_thread(planner.decide, 1, 1) == 0
            await asyncio.to_thread(planner.wait_ready, 90)
            # Killed, and restarted at once: the new coordinator reads decision 0 back and counts on from it,
            # while the keys stay under the dead planner's lease until it runs out (30 s).
            await asyncio.to_thread(planner.kill)
            planner = await asyncio.to_thread(RealPlanner, etcd_url, ns, tmp_path / "planner.log")
            assert (await asyncio.to_thread(planner.state))["decision_id"] == 0
            await asyncio.to_thread(
                wait_until, lambda: etcd.get(root_key(ns) + "decision_id") is None, 60, "the old lease to run out"
            )
            await asyncio.sleep(1.5)  # the actuator has seen the keys go
            # The acknowledgement stays, so the coordinator's next decision is not dropped.
            assert etcd.get(root_key(ns) + "scaled_decision_id") == "0"
            assert await asyncio.to_thread(planner.is_ready)
            assert await asyncio.to_thread(planner.decide, 2, 1) == 1
            await asyncio.to_thread(planner.wait_ready, 90)
            found = await asyncio.to_thread(registered, etcd, ns, record_dir)
            assert {r: len(v) for r, v in found.items()} == {"prefill": 2, "decode": 1}
        finally:
            stop.set()
            await task
            await asyncio.to_thread(planner.stop)
            for s in live(record_dir):
                os.kill(s.pid, signal.SIGTERM)


# -- a worker that exits at start-up: retried with backoff, never ready; then the shortfall is acknowledged -----
@pytest.mark.etcd
@pytest.mark.circus
async def test_crashing_worker_is_retried_then_the_shortfall_acknowledged(
    etcd_url: str, dynamo_runtime: None, daemon: CircusDaemon, loopback_env: dict[str, str], tmp_path: Path
) -> None:
    ns = "crash"
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    etcd = EtcdClient(etcd_url)
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "state.db")
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=10)
    specs = worker_specs(record_dir, decode=("--crash",))
    async with mgr:
        actuator = DynamoActuator(
            runtime, etcd, ns, specs, poll_interval_s=0.3, max_start_failures=3, retry_backoff_s=0.2
        )
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(actuator.run(stop))
        planner = await asyncio.to_thread(RealPlanner, etcd_url, ns, tmp_path / "planner.log")
        try:
            assert await asyncio.to_thread(planner.decide, 1, 1) == 0
            await asyncio.to_thread(planner.wait_ready, 90)
            # Acknowledged only after the decode worker failed its whole budget, each time replaced.
            crashed = [s for s in records(record_dir) if s.mode == "decode"]
            assert len(crashed) >= 3, crashed
            assert all(not alive(s.pid) for s in crashed)
            found = await asyncio.to_thread(registered, etcd, ns, record_dir)
            assert {r: len(v) for r, v in found.items()} == {"prefill": 1, "decode": 0}
            shortfalls = [e for e in mgr.recent_events if e.kind == "dynamo-shortfall"]
            assert shortfalls and shortfalls[0].component == component_name(ns, "decode")
            assert "exited before it was registered in Dynamo's discovery" in shortfalls[0].detail
            assert "3 time(s) in a row" in shortfalls[0].detail and "crashing at start-up" in shortfalls[0].detail
            assert actuator.last_outcome is not None and actuator.last_outcome.shortfall == {"decode": 1}
            exits = [e for e in mgr.recent_events if e.kind == "worker-exited"]
            assert len(exits) >= 3
            # The planner counts the ready prefill worker and no decode worker.
            await asyncio.to_thread(wait_until, lambda: planner.counts() == (1, 0), 30, "the planner's count")
        finally:
            stop.set()
            await task
            await asyncio.to_thread(planner.stop)
            for s in live(record_dir):
                os.kill(s.pid, signal.SIGTERM)


@pytest.mark.etcd
@pytest.mark.circus
async def test_a_role_past_its_retry_budget_is_retried_until_it_works(
    etcd_url: str, dynamo_runtime: None, daemon: CircusDaemon, loopback_env: dict[str, str], tmp_path: Path
) -> None:
    ns = "retry"
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    etcd = EtcdClient(etcd_url)
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "state.db")
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=10)
    specs = worker_specs(record_dir, decode=("--register", "--crash-first", "4"))
    async with mgr:
        actuator = DynamoActuator(
            runtime, etcd, ns, specs, poll_interval_s=0.3, max_start_failures=2, retry_backoff_s=0.1
        )
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(actuator.run(stop))
        planner = await asyncio.to_thread(RealPlanner, etcd_url, ns, tmp_path / "planner.log")
        try:
            assert await asyncio.to_thread(planner.decide, 1, 1) == 0
            await asyncio.to_thread(planner.wait_ready, 90)  # after 2 failures: the shortfall acknowledged
            assert [e for e in mgr.recent_events if e.kind == "dynamo-shortfall"]
            # Later rounds try again (after 0.2 s, 0.4 s, ...): the 5th start works.
            deadline = time.monotonic() + 60
            while not any(e.kind == "dynamo-converged" for e in mgr.recent_events):
                assert time.monotonic() < deadline, "the role was not retried until it worked"
                await asyncio.sleep(0.1)
            assert int((record_dir / "starts-decode").read_text()) == 5
            found = await asyncio.to_thread(registered, etcd, ns, record_dir)
            assert {r: len(v) for r, v in found.items()} == {"prefill": 1, "decode": 1}
            assert await actuator.ready_counts() == {"prefill": 1, "decode": 1}
        finally:
            stop.set()
            await task
            await asyncio.to_thread(planner.stop)
            for s in live(record_dir):
                os.kill(s.pid, signal.SIGTERM)


# -- Dynamo's next format: the scaling_decision record -----------------------------------------------------------
@pytest.mark.etcd
@pytest.mark.circus
async def test_record_format_is_carried_out_and_acknowledged(
    etcd_url: str, dynamo_runtime: None, daemon: CircusDaemon, loopback_env: dict[str, str], tmp_path: Path
) -> None:
    ns = "record"
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    etcd = EtcdClient(etcd_url)
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "state.db")
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=10)
    async with mgr:
        actuator = DynamoActuator(runtime, etcd, ns, worker_specs(record_dir), poll_interval_s=0.3)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(actuator.run(stop))
        planner = RecordPlanner(etcd, ns)
        try:
            # Stale three keys of an older coordinator: the record wins over them.
            for key, value in (("num_prefill_workers", "3"), ("num_decode_workers", "1"), ("decision_id", "7")):
                await etcd.aput(root_key(ns) + key, value, lease=planner.lease)
            assert await asyncio.to_thread(planner.decide, 1, 2) == 0
            await asyncio.to_thread(planner.wait_ready, 90)
            assert planner.scaled() == 0
            found = await asyncio.to_thread(registered, etcd, ns, record_dir)
            assert {r: len(v) for r, v in found.items()} == {"prefill": 1, "decode": 2}
            check_gpus(live(record_dir))

            # A record without a prefill count leaves prefill alone.
            assert await asyncio.to_thread(planner.decide, None, 1) == 1
            await asyncio.to_thread(planner.wait_ready, 90)
            found = await asyncio.to_thread(registered, etcd, ns, record_dir)
            assert {r: len(v) for r, v in found.items()} == {"prefill": 1, "decode": 1}

            # An unreadable record is not carried out, and does not withdraw the acknowledgement.
            await asyncio.to_thread(planner.put_raw, "{not json")
            await asyncio.sleep(1.5)
            assert planner.scaled() == 1
            assert await actuator.counts() == {"prefill": 1, "decode": 1}

            assert await asyncio.to_thread(planner.decide, 0, 0) == 2
            await asyncio.to_thread(planner.wait_ready, 90)
            assert await asyncio.to_thread(registered, etcd, ns, record_dir) == {"prefill": [], "decode": []}
            assert all(s.terminated for s in records(record_dir))
        finally:
            stop.set()
            await task
            await asyncio.to_thread(planner.stop)
            for s in live(record_dir):
                os.kill(s.pid, signal.SIGTERM)


# -- an unmeetable decision: acknowledged, reported, and converged later (actuator in process) ---------------
@pytest.mark.etcd
@pytest.mark.circus
async def test_shortfall_acknowledged_reported_and_converged(
    etcd_url: str, dynamo_runtime: None, daemon: CircusDaemon, loopback_env: dict[str, str], tmp_path: Path
) -> None:
    ns = "short"
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    etcd = EtcdClient(etcd_url)
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "state.db")
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=10)
    async with mgr, contextlib.AsyncExitStack() as served:
        foreign = await mgr.allocate_compute_group("someone-else", {"gpus": 2}, {"nvlink": True})
        actuator = DynamoActuator(runtime, etcd, ns, worker_specs(record_dir), poll_interval_s=0.3)
        # /metrics as dynamo-actuate --metrics-port serves it: the manager's series and the actuator's
        port = await serve_metrics(served, mgr, "127.0.0.1", 0, [ActuatorCollector(actuator)])
        url = f"http://127.0.0.1:{port}"
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(actuator.run(stop))
        planner = await asyncio.to_thread(RealPlanner, etcd_url, ns, tmp_path / "planner.log")
        try:
            # 2 + 2 workers of 2 GPUs need 8; 6 are free: acknowledged anyway, shortfall reported
            assert await asyncio.to_thread(planner.decide, 2, 2) == 0
            await asyncio.to_thread(planner.wait_ready, 90)
            assert await actuator.counts() == {"prefill": 2, "decode": 1}
            shortfalls = [e for e in mgr.recent_events if e.kind == "dynamo-shortfall"]
            assert shortfalls, "the shortfall was not reported"
            assert shortfalls[-1].component == component_name(ns, "decode")
            assert "1 short" in shortfalls[-1].detail and "wants 2 decode" in shortfalls[-1].detail
            assert "no node can take" in shortfalls[-1].detail
            outcome = actuator.last_outcome
            assert outcome is not None and outcome.shortfall == {"decode": 1}
            m = await asyncio.to_thread(scrape, url)
            assert per_role(m, "computegroups_dynamo_shortfall", ns) == {
                role: outcome.shortfall.get(role, 0) for role in ("prefill", "decode")
            }
            assert per_role(m, "computegroups_dynamo_target_replicas", ns) == {"prefill": 2, "decode": 2}
            assert per_role(m, "computegroups_dynamo_ready_replicas", ns) == outcome.ready
            assert outcome.ready == {"prefill": 2, "decode": 1}
            assert decisions_of(m, ns) == {"met": 0, "short": 1, "superseded": 0}
            # ... beside the manager's series, on one registry: 3 workers of 2 GPUs and the foreign pair
            assert sum(v for lb, v in m["computegroups_gpus"] if lb["state"] == "allocated") == 8

            # capacity frees: the actuator keeps converging, without a new decision
            await mgr.deallocate_compute_group(foreign.id)
            deadline = time.monotonic() + 60
            while not any(e.kind == "dynamo-converged" for e in mgr.recent_events):
                assert time.monotonic() < deadline, "did not converge after capacity freed"
                await asyncio.sleep(0.1)
            found = await asyncio.to_thread(registered, etcd, ns, record_dir)
            assert {r: len(v) for r, v in found.items()} == {"prefill": 2, "decode": 2}
            check_gpus(live(record_dir))
            m = await asyncio.to_thread(scrape, url)
            assert per_role(m, "computegroups_dynamo_shortfall", ns) == {"prefill": 0, "decode": 0}
            assert per_role(m, "computegroups_dynamo_ready_replicas", ns) == {"prefill": 2, "decode": 2}

            # scale to zero before leaving
            await asyncio.to_thread(planner.decide, 0, 0)
            await asyncio.to_thread(planner.wait_ready, 90)
            assert await actuator.counts() == {"prefill": 0, "decode": 0}
            assert all(s.terminated for s in records(record_dir))
            m = await asyncio.to_thread(scrape, url)
            assert per_role(m, "computegroups_dynamo_target_replicas", ns) == {"prefill": 0, "decode": 0}
            assert per_role(m, "computegroups_dynamo_shortfall", ns) == {"prefill": 0, "decode": 0}
            assert decisions_of(m, ns) == {"met": 1, "short": 1, "superseded": 0}
        finally:
            stop.set()
            await task
            await asyncio.to_thread(planner.stop)
            for s in live(record_dir):
                os.kill(s.pid, signal.SIGTERM)


# -- dynamo-actuate --metrics-port: the same series from the command, scraped over HTTP ------------------------
@pytest.mark.etcd
@pytest.mark.circus
def test_actuate_serves_metrics_of_the_last_decision(
    etcd_url: str, daemon: CircusDaemon, loopback_env: dict[str, str], tmp_path: Path
) -> None:
    """``--config FILE --metrics-port 0``: the address is printed; /metrics has the shortfall of an unmeetable
    decision, then 0 once a decision is met, beside the manager's series; /healthz answers; a busy port is exit 2
    naming the flag."""
    ns = "metrics"
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(SPEC))
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    etcd = EtcdClient(etcd_url)

    # The configuration from a file (docs/schema/actuator.schema.json), etcd and the port from flags.
    config = tmp_path / "actuator.yaml"
    config.write_text(
        json.dumps(
            {
                "namespace": ns,
                "decode": {"command": worker_cmd(record_dir, "decode").split(), "gpus": 2},
                "constraints": {"nvlink": True},
                "readiness": {"mode": "settle", "settle_s": 0.2},
                "poll_interval_s": 0.3,
                "graceful_timeout_s": 10,
                "metrics": {"port": 1, "host": "127.0.0.1"},  # the flag's port wins
            }
        )
    )

    def argv(state: Path, runtime_dir: Path, port: int) -> list[str]:
        return [
            sys.executable, "-m", "computegroups.cli", "--spec", str(spec_file), "--state", str(state),
            "dynamo-actuate", "--config", str(config), "--etcd", etcd_url, "--runtime-dir", str(runtime_dir),
            "--metrics-port", str(port),
        ]  # fmt: skip

    with open(tmp_path / "actuator.log", "wb") as log:
        proc = subprocess.Popen(
            argv(tmp_path / "state.db", daemon.dir, 0), stdout=subprocess.PIPE, stderr=log, cwd=REPO, env=loopback_env
        )
    planner = RecordPlanner(etcd, ns)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("metrics on http://127.0.0.1:"), (line, (tmp_path / "actuator.log").read_text())
        url = line.split()[2].removesuffix("/metrics")
        # 5 decode workers of 2 GPUs need 10 GPUs; the node has 8: 4 run, 1 is short (prefill has no command).
        planner.decide(None, 5)
        planner.wait_ready(60)
        m = scrape(url)
        assert per_role(m, "computegroups_dynamo_target_replicas", ns) == {"decode": 5}
        assert per_role(m, "computegroups_dynamo_ready_replicas", ns) == {"decode": 4}
        assert per_role(m, "computegroups_dynamo_shortfall", ns) == {"decode": 1}
        assert decisions_of(m, ns) == {"met": 0, "short": 1, "superseded": 0}
        decode = component_name(ns, "decode")
        held = {lb["group"] for lb, _ in m["computegroups_group_info"] if lb["component"] == decode}
        assert held == {s.group_id for s in live(record_dir)} and len(held) == 4
        with urllib.request.urlopen(url + "/healthz", timeout=10) as resp:
            assert json.load(resp)["ok"] is True

        port = int(url.rsplit(":", 1)[1])
        busy = subprocess.run(
            argv(tmp_path / "other.db", tmp_path / "rt", port), capture_output=True, text=True, timeout=60, cwd=REPO
        )
        assert busy.returncode == 2, busy
        assert len(busy.stderr.strip().splitlines()) == 1 and "--metrics-port: cannot listen" in busy.stderr

        planner.decide(None, 3)
        planner.wait_ready(60)
        m = scrape(url)
        assert per_role(m, "computegroups_dynamo_shortfall", ns) == {"decode": 0}
        assert per_role(m, "computegroups_dynamo_ready_replicas", ns) == {"decode": 3}
        assert decisions_of(m, ns) == {"met": 1, "short": 1, "superseded": 0}
    finally:
        proc.terminate()
        proc.wait(30)
        planner.stop()
        for s in live(record_dir):
            os.kill(s.pid, signal.SIGTERM)


# -- workers asking for their NIC: on the real topology that lists NICs (actuator in process) -------------
@pytest.mark.etcd
@pytest.mark.circus
async def test_workers_asking_for_a_nic_get_the_gpus_near_it(
    etcd_url: str, dynamo_runtime: None, daemon: CircusDaemon, loopback_env: dict[str, str], tmp_path: Path
) -> None:
    """tests/fixtures/nvidia-smi-topo/rtx_a6000_x8_nv4_pairs.txt: NIC0 and NIC1 are PHB to GPU6 and NODE to
    GPUs 4, 5 and 7, SYS to the rest: two TP=2 workers fit near a NIC (6-7, then 4-5), a third does not."""
    ns = "nic"
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    etcd = EtcdClient(etcd_url)
    spec = a6000_spec(id=NODE)
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(spec), tmp_path / "state.db")
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=10)
    specs = {
        role: WorkerSpec(2, tuple(worker_cmd(record_dir, role, "--register").split()), constraints={"nic": "any"})
        for role in ("prefill", "decode")
    }
    async with mgr:
        actuator = DynamoActuator(runtime, etcd, ns, specs, poll_interval_s=0.3)
        stop = asyncio.Event()
        task = asyncio.get_running_loop().create_task(actuator.run(stop))
        planner = await asyncio.to_thread(RealPlanner, etcd_url, ns, tmp_path / "planner.log")
        try:
            assert await asyncio.to_thread(planner.decide, 1, 1) == 0
            await asyncio.to_thread(planner.wait_ready, 90)
            by_role = {s.mode: s.gpus for s in live(record_dir)}
            assert sorted(map(sorted, by_role.values())) == [[4, 5], [6, 7]], by_role
            # A third worker has no NVLink-free pair left near a NIC: acknowledged as a shortfall, with the reason.
            assert await asyncio.to_thread(planner.decide, 2, 1) == 1
            await asyncio.to_thread(planner.wait_ready, 90)
            assert actuator.last_outcome is not None and actuator.last_outcome.shortfall == {"prefill": 1}
            shortfalls = [e for e in mgr.recent_events if e.kind == "dynamo-shortfall"]
            assert shortfalls and "within NODE of a NIC" in shortfalls[-1].detail, shortfalls
            held = {g for s in live(record_dir) for g in s.gpus}
            assert held == {4, 5, 6, 7}  # GPUs 0-3, SYS to both NICs, stayed free
            await asyncio.to_thread(planner.decide, 0, 0)
            await asyncio.to_thread(planner.wait_ready, 90)
            assert await actuator.counts() == {"prefill": 0, "decode": 0}
        finally:
            stop.set()
            await task
            await asyncio.to_thread(planner.stop)
            for s in live(record_dir):
                os.kill(s.pid, signal.SIGTERM)


# -- the fallback for workers that do not register: their health URL ---------------------------------------
@pytest.mark.etcd
@pytest.mark.circus
async def test_health_url_readiness(
    etcd_url: str, dynamo_runtime: None, daemon: CircusDaemon, loopback_env: dict[str, str], tmp_path: Path
) -> None:
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "state.db")
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=10)
    readiness = HealthReadiness("http://127.0.0.1:{port}/health")
    env = {**loopback_env, "ETCD_ENDPOINTS": etcd_url}  # the workers still need an etcd to start
    async with mgr:
        specs = worker_specs(record_dir)
        actuator = DynamoActuator(runtime, None, "health", specs, readiness=readiness, env=env)
        outcome = await actuator.converge({"prefill": 1, "decode": None})
        assert outcome.met and outcome.ready["prefill"] == 1
        (worker,) = live(record_dir)
        port = actuator._load_state()["health_ports"][worker.group_id]
        # Dynamo's own system status server of that worker answers ready on the port it was given.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            assert json.load(resp)["status"] == "ready"
        outcome = await actuator.converge({"prefill": 0})
        assert outcome.met and not live(record_dir)


# -- the in-process PlannerConnector ------------------------------------------------------------------
@dataclass
class Target:
    """Shaped like Dynamo's TargetReplica."""

    sub_component_type: str
    desired_replicas: int
    component_name: str | None = None


@pytest.mark.circus
async def test_connector_settle_readiness(daemon: CircusDaemon, tmp_path: Path) -> None:
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "state.db")
    runtime = LocalRuntime(mgr, daemon, graceful_timeout_s=5)
    specs = worker_specs(record_dir, prefill=(), decode=())  # workers that register nowhere
    async with mgr:
        conn = ComputeGroupsConnector(runtime, "inproc", specs, "Qwen/Qwen3-0.6B")
        await conn.async_init()
        await conn.validate_deployment()
        assert conn.get_model_name() == "qwen/qwen3-0.6b"
        assert conn.get_gpu_counts() == (2, 2)
        p_shape, d_shape = conn.get_gpu_shapes()
        assert (p_shape.gpus_per_engine, d_shape.gpus_per_replica) == (2, 2)
        info = conn.get_worker_info("decode")
        assert (info.component_name, info.endpoint, info.model_name) == ("backend", "generate", "qwen/qwen3-0.6b")
        assert conn.get_worker_info("prefill").component_name == "prefill"

        await conn.set_component_replicas([Target("prefill", 1), Target("decode", 2)])
        assert await conn.get_actual_worker_counts() == (1, 2, True)
        assert await conn.get_actual_worker_counts(None, "backend") == (0, 2, True)
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


@pytest.mark.etcd
@pytest.mark.circus
async def test_connector_workers_resolve_in_dynamo_discovery(
    etcd_url: str, dynamo_runtime: None, daemon: CircusDaemon, loopback_env: dict[str, str], tmp_path: Path
) -> None:
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    manager = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "state.db")
    runtime = LocalRuntime(manager, daemon, graceful_timeout_s=10)
    etcd = EtcdClient(etcd_url)
    async with manager:
        conn = ComputeGroupsConnector(runtime, "conn", worker_specs(record_dir), "m", etcd=etcd)
        await conn.async_init()
        await conn.set_component_replicas([Target("prefill", 1), Target("decode", 2)])
        assert await conn.get_actual_worker_counts() == (1, 2, True)
        p_info, d_info = conn.get_worker_info("prefill"), conn.get_worker_info("decode")
        # Dynamo's planner, given these WorkerInfos, finds the workers in discovery.
        planner = await asyncio.to_thread(
            RealPlanner,
            etcd_url,
            "conn",
            tmp_path / "planner.log",
            components=(p_info.component_name, d_info.component_name),
            endpoint=d_info.endpoint,
        )
        try:
            await asyncio.to_thread(wait_until, lambda: planner.counts() == (1, 2), 30, "the planner's count")
        finally:
            await asyncio.to_thread(planner.stop)
        await conn.set_component_replicas([Target("prefill", 0), Target("decode", 0)])
        assert await conn.get_actual_worker_counts() == (0, 0, True)
        await conn.close()
