"""The HTTP API of ``computegroups serve``: a real aiohttp server on loopback, a real HTTP client.

The conformance suite the Python API passes runs here through :class:`ComputeGroupsClient`, each
"manager" being a server of its own over the same SQLite file; decisions must equal the Python API's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider
from computegroups.errors import ConflictError, InsufficientResourcesError, InvalidRequestError, NotFoundError
from computegroups.service import ComputeGroupsClient, build_app, openapi
from computegroups.service.app import ROUTES, build_metrics_app
from computegroups.service.cli import listen
from tests import conformance
from tests._sqlite_worker import SPEC as WORKER_SPEC
from tests.test_conformance_simulated import EXPECTED, NODES

REPO = Path(__file__).resolve().parents[1]


@contextlib.asynccontextmanager
async def served(path: Path | str, shape: str = "uniform") -> AsyncIterator[tuple[ComputeGroupManager, str]]:
    """A manager over ``path`` behind a real server on a free loopback port."""
    provider = SimulatedComputeResourceProvider(conformance.node_specs(NODES, shape))
    async with ComputeGroupManager(provider, path) as mgr:
        runner, port = await listen(build_app(mgr), "127.0.0.1", 0)
        try:
            yield mgr, f"http://127.0.0.1:{port}"
        finally:
            await runner.cleanup()


def http_opener(tmp_path: Path, shape: str = "uniform") -> Any:
    @contextlib.asynccontextmanager
    async def open_manager() -> AsyncIterator[ComputeGroupsClient]:
        async with served(tmp_path / "state.db", shape) as (_, url), ComputeGroupsClient(url) as client:
            yield client

    return open_manager


@pytest.mark.parametrize("check", conformance.MANAGER_CHECKS, ids=lambda c: c.__name__)
async def test_conformance_over_http(check: Any, tmp_path: Path) -> None:
    await check(http_opener(tmp_path), NODES)


@pytest.mark.parametrize("shape", ["uniform", "pcie-pairs"])
async def test_same_decisions_as_the_python_api(shape: str, tmp_path: Path) -> None:
    assert await conformance.decision_transcript(http_opener(tmp_path, shape), NODES) == EXPECTED[shape]


async def _raw(url: str, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.request(method, url + path, **kw) as r:
        text = await r.text()
        return r.status, json.loads(text) if r.content_type == "application/json" else text


#: (method, path, body, status, error code, key): bad requests and refusals, each leaving the state unchanged.
BAD = [
    ("POST", "/v1/groups", "not json", 400, "invalid_request", "body"),
    ("POST", "/v1/groups", [1, 2], 400, "invalid_request", "body"),
    ("POST", "/v1/groups", {"component": "a"}, 400, "invalid_request", "requirements"),
    ("POST", "/v1/groups", {"component": "a", "requirements": {"gpus": 1}, "x": 1}, 400, "invalid_request", "x"),
    (
        "POST",
        "/v1/groups",
        {"component": "a", "requirements": {"gpus": -1}},
        400,
        "invalid_request",
        "requirements.gpus",
    ),
    ("POST", "/v1/groups", {"component": "a\n", "requirements": {"gpus": 1}}, 400, "invalid_request", "component_name"),
    ("POST", "/v1/groups", {"component": "a", "requirements": {"gpus": 1e400}}, 400, "invalid_request", None),
    ("POST", "/v1/groups", {"component": "a", "requirements": {"gpus": 9}}, 409, "insufficient_resources", None),
    (
        "POST",
        "/v1/reservations",
        {"component": "a", "requirements": {"gpus": 1}, "ttl_seconds": -1},
        400,
        "invalid_request",
        "ttl_seconds",
    ),
    ("GET", "/v1/groups/cg-nope", None, 404, "not_found", None),
    ("DELETE", "/v1/carved/cg-nope", None, 404, "not_found", None),
    ("GET", "/v1/groups?state=sleeping", None, 400, "invalid_request", None),
    ("GET", "/v1/groups?colour=red", None, 400, "invalid_request", "filters.colour"),
    ("GET", "/v1/nowhere", None, 404, "http", None),
    ("PUT", "/v1/groups", None, 405, "http", None),
]


async def test_bad_requests_are_typed_and_change_nothing(tmp_path: Path) -> None:
    async with served(tmp_path / "s.db") as (mgr, url):
        await mgr.allocate_compute_group("held", {"gpus": 8})
        before = await mgr.get_allocation_summary()
        for method, path, body, status, code, key in BAD:
            kw: dict[str, Any] = {}
            if isinstance(body, str):
                kw["data"] = body
            elif body is not None:
                kw["data"] = json.dumps(body)  # 1e400 is written as the JSON number Infinity would not be
            got_status, got = await _raw(url, method, path, **kw)
            assert (got_status, got["error"]) == (status, code), (method, path, body, got)
            assert got.get("key") == key or key is None, (path, body, got)
            assert "\n" not in got["message"] and "Traceback" not in got["message"]
        assert await mgr.get_allocation_summary() == before
        big = await _raw(url, "POST", "/v1/groups", data=b"{" + b" " * 70_000 + b"}")
        assert big[0] in (400, 413)


async def test_the_client_raises_the_python_api_errors(tmp_path: Path) -> None:
    async with served(tmp_path / "s.db") as (_, url), ComputeGroupsClient(url) as cg:
        with pytest.raises(InvalidRequestError) as bad:
            await cg.allocate_compute_group("a", {"gpus": 1, "colour": "red"})
        assert bad.value.key == "requirements.colour"
        with pytest.raises(NotFoundError):
            await cg.get_compute_group("cg-missing")
        await cg.allocate_compute_group("a", {"gpus": 4}, {"request_id": "r1"})
        with pytest.raises(ConflictError):
            await cg.allocate_compute_group("b", {"gpus": 1}, {"request_id": "r1"})
        await cg.allocate_compute_group("c", {"gpus": 8})
        with pytest.raises(InsufficientResourcesError) as full:
            await cg.allocate_compute_group("d", {"gpus": 8})
        assert full.value.reasons and sum(full.value.reasons.values()) == 2


async def test_an_idempotency_key_makes_a_retry_return_the_same_group(tmp_path: Path) -> None:
    async with served(tmp_path / "s.db") as (mgr, url):
        body = json.dumps({"component": "decode", "requirements": {"gpus": 2}})
        headers = {"Idempotency-Key": "plan-7-decode-1"}
        first = await _raw(url, "POST", "/v1/groups", data=body, headers=headers)
        again = await _raw(url, "POST", "/v1/groups", data=body, headers=headers)
        assert first[0] == again[0] == 201 and first[1]["id"] == again[1]["id"]
        assert first[1]["request_id"] == "plan-7-decode-1"
        assert len(await mgr.list_compute_groups()) == 1
        other = json.dumps({"component": "other", "requirements": {"gpus": 2}})
        assert (await _raw(url, "POST", "/v1/groups", data=other, headers=headers))[1]["error"] == "conflict"


def _samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


async def test_metrics_match_the_state(tmp_path: Path) -> None:
    async with served(tmp_path / "s.db") as (mgr, url), ComputeGroupsClient(url) as cg:
        tp = await cg.allocate_compute_group("decode", {"gpus": 2})
        share = await cg.allocate_compute_group("embed", {"gpus": 0.25})
        with pytest.raises(InsufficientResourcesError):
            await cg.allocate_compute_group("huge", {"gpus": 9})
        # A change another manager makes on the same file shows at the next scrape.
        provider = SimulatedComputeResourceProvider(conformance.node_specs(NODES))
        async with ComputeGroupManager(provider, tmp_path / "s.db") as other:
            elsewhere = await other.allocate_compute_group("prefill", {"gpus": 1})
        status, text = await _raw(url, "GET", "/metrics")
        assert status == 200
        m = _samples(text)
        gpus = {(lb["node"], lb["state"]): v for lb, v in m["computegroups_gpus"]}
        summary = await mgr.get_allocation_summary()
        assert sum(v for (_, st), v in gpus.items() if st == "allocated") == summary["allocated_gpus"] == 3.25
        assert sum(v for (_, st), v in gpus.items() if st == "free") == summary["free_gpus"] == 12.75
        info = {lb["group"]: lb for lb, _ in m["computegroups_group_info"]}
        assert set(info) == {tp.id, share.id, elsewhere.id}
        assert info[tp.id]["component"] == "decode" and info[tp.id]["state"] == "allocated"
        assigned = {
            (lb["Hostname"], lb["UUID"]): (lb["gpu"], lb["component"], v) for lb, v in m["computegroups_gpu_assignment"]
        }
        for g in (tp, share, elsewhere):
            for index, uuid in zip(g.resources["gpu_indices"], g.resources["gpu_uuids"], strict=True):
                assert assigned[(g.node_id, uuid)] == (str(index), g.component, 1.0 if g is not share else 0.25)
        requests = {(lb["operation"], lb["outcome"]): v for lb, v in m["computegroups_requests_total"]}
        assert requests == {("allocate", "ok"): 2.0, ("allocate", "insufficient_resources"): 1.0}
        count = {lb["operation"]: v for lb, v in m["computegroups_decision_seconds_count"]}
        assert count == {"allocate": 3.0}
        assert [v for _, v in m["computegroups_state_revision"]] == [float(mgr.revision)]
        # The other manager committed between this one's commits, never during one: nothing was lost.
        assert [v for _, v in m["computegroups_commit_conflicts_total"]] == [float(mgr.conflicts)] == [0.0]


async def test_commit_conflicts_are_the_managers_own_count(tmp_path: Path) -> None:
    """Two processes write one SQLite file: the commits this manager lost are counted, as it counts them."""
    state = tmp_path / "s.db"
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(WORKER_SPEC), state) as mgr:
        runner, port = await listen(build_metrics_app(mgr), "127.0.0.1", 0)
        url = f"http://127.0.0.1:{port}"
        other = subprocess.Popen(
            [sys.executable, "-m", "tests._sqlite_worker", str(state), "1", "3000", str(tmp_path / "log")], cwd=REPO
        )
        try:
            # Allocate and release until a commit is lost to the other process (or it is done).
            while mgr.conflicts == 0 and other.poll() is None:
                with contextlib.suppress(InsufficientResourcesError):
                    g = await mgr.allocate_compute_group("here", {"gpus": 1})
                    await mgr.deallocate_compute_group(g.id)
            assert mgr.conflicts > 0, "the other process never won a race"
            status, text = await _raw(url, "GET", "/metrics")
            assert status == 200
            assert [v for _, v in _samples(text)["computegroups_commit_conflicts_total"]] == [float(mgr.conflicts)]
        finally:
            other.kill()
            other.wait()
            await runner.cleanup()


async def test_health_schema_and_events(tmp_path: Path) -> None:
    async with served(tmp_path / "s.db") as (_, url), ComputeGroupsClient(url) as cg:
        status, health = await _raw(url, "GET", "/healthz")
        assert status == 200 and health["ok"] is True
        status, schema = await _raw(url, "GET", "/openapi.json")
        assert schema == json.loads(json.dumps(openapi()))
        assert {(m.upper(), p) for p, ops in schema["paths"].items() for m in ops} == {(m, p) for m, p, _, _ in ROUTES}
        stream = cg.events()
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.2)  # the stream is open before the change
        g = await cg.allocate_compute_group("decode", {"gpus": 1})
        event = await asyncio.wait_for(first, 10)
        assert event["kind"] == "allocated" and event["group_id"] == g.id and event["at"] > 0
        await stream.aclose()


def test_serve_from_the_command_line(tmp_path: Path) -> None:
    """``computegroups serve --port 0`` prints its address, answers, and stops on SIGTERM; a busy port is exit 2."""
    cmd = [
        sys.executable,
        "-m",
        "computegroups",
        "--simulate",
        "--state",
        str(tmp_path / "s.db"),
        "serve",
        "--port",
        "0",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("serving http://127.0.0.1:"), line
        url = line.split()[1].rstrip("/")
        status, health = asyncio.run(_raw(url, "GET", "/healthz"))
        assert status == 200 and health["ok"]
        port = url.rsplit(":", 1)[1]
        busy = subprocess.run(
            [sys.executable, "-m", "computegroups", "--simulate", "--state", ":memory:", "serve", "--port", port],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert busy.returncode == 2 and "--port" in busy.stderr and len(busy.stderr.strip().splitlines()) == 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
        proc.wait()


def test_supervise_serves_metrics_of_changes_made_by_other_processes(tmp_path: Path) -> None:
    """``supervise --metrics-port 0``: an allocation made by another command shows at the next scrape."""
    state = str(tmp_path / "s.db")
    base = [sys.executable, "-m", "computegroups", "--simulate", "--state", state]
    proc = subprocess.Popen(
        [*base, "supervise", "--metrics-port", "0", "--duration", "120", "--runtime-dir", str(tmp_path / "rt")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("metrics on http://127.0.0.1:"), line
        url = line.split()[2].removesuffix("/metrics")
        made = subprocess.run([*base, "--json", "allocate", "decode", "--gpus", "2"], capture_output=True, text=True)
        assert made.returncode == 0, made.stderr
        group = json.loads(made.stdout)
        status, text = asyncio.run(_raw(url, "GET", "/metrics"))
        assert status == 200
        m = _samples(text)
        allocated = {lb["node"]: v for lb, v in m["computegroups_gpus"] if lb["state"] == "allocated"}
        assert allocated[group["node_id"]] == 2.0 and sum(allocated.values()) == 2.0
        uuids = {lb["UUID"] for lb, _ in m["computegroups_gpu_assignment"] if lb["group"] == group["id"]}
        assert uuids == set(group["resources"]["gpu_uuids"])
    finally:
        proc.terminate()
        proc.wait(timeout=30)
