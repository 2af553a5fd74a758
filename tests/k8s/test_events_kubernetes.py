"""The Kubernetes store's event log as core Events, on the real control plane, as the shipped ServiceAccount.

A manager's changes and refusals become ``v1 Event`` objects about the ComputeGroup (or the ledger) that
``kubectl get events`` shows and that ``computegroups events --watch`` in another process prints as they
are written; identical events are counted on one object; the write limiter drops what it cannot let
through and counts it; an Event write the API server refuses does not fail the commit.
"""

from __future__ import annotations

import asyncio
import copy
import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from computegroups import InsufficientResourcesError
from computegroups.events import Event
from computegroups.kube.names import cr_name
from computegroups.state.kubernetes import KubernetesStateStore

from .harness import ControlPlane
from .test_provider_kubernetes import REPO, live_groups, make_nodes, manager, sa  # noqa: F401  (sa is a fixture)

pytestmark = pytest.mark.k8s

_RUN: dict[str, Any] = {"capture_output": True, "text": True, "cwd": REPO, "timeout": 120}
SELECTOR = "app.kubernetes.io/managed-by=computegroups,computegroups.dev/store=default"


def events_of(cp: ControlPlane, namespace: str, **params: str) -> list[dict[str, Any]]:
    """The store's Event objects, read as kubectl reads them (as cluster admin)."""
    path = f"/api/v1/namespaces/{namespace}/events"
    return list(cp.client().get(path, labelSelector=SELECTOR, **params)["items"])


def _lines(proc: subprocess.Popen[str], out: queue.Queue[tuple[float, str]]) -> None:
    assert proc.stdout is not None
    for line in proc.stdout:
        out.put((time.time(), line))


async def _next(
    printed: queue.Queue[tuple[float, str]], proc: subprocess.Popen[str], deadline: float
) -> tuple[float, Any]:
    """The next line the CLI printed (its time, decoded), waiting until ``deadline`` (monotonic)."""
    while True:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "the watching CLI printed nothing more"
        try:
            at, line = await asyncio.to_thread(printed.get, True, 1.0)
        except queue.Empty:
            continue
        return at, json.loads(line)


async def test_a_watching_cli_prints_each_commits_event_as_it_is_written(
    k8s_cluster: ControlPlane,
    k8s_namespace: str,
    sa: Path,  # noqa: F811
) -> None:
    _, selector = make_nodes(k8s_cluster, 1, dra=False)
    cmd = [sys.executable, "-m", "computegroups", "--provider", "kubernetes", "--kubeconfig", str(sa)]
    cmd += ["--namespace", k8s_namespace, "events", "--watch", "-o", "json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    printed: queue.Queue[tuple[float, str]] = queue.Queue()
    threading.Thread(target=_lines, args=(proc, printed), daemon=True).start()
    seen: list[tuple[float, dict[str, Any]]] = []
    try:
        deadline = time.monotonic() + 30
        async with manager(sa, k8s_namespace, selector) as mgr:
            # Once the CLI printed this one it is watching: what follows arrives by its watch.
            mgr.emit(Event("note", detail="watching?"))
            while not any(e["kind"] == "note" for _, e in seen):
                seen.append(await _next(printed, proc, deadline))
            g = await mgr.allocate_compute_group("decode", {"gpus": 2})
            committed = {"allocated": time.time()}
            while not any(e["group_id"] == g.id for _, e in seen):
                seen.append(await _next(printed, proc, deadline))
            assert await mgr.deallocate_compute_group(g.id)
            committed["released"] = time.time()
            while not any(e["kind"] == "released" for _, e in seen):
                seen.append(await _next(printed, proc, deadline))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    mine = [(at, e) for at, e in seen if e["group_id"] == g.id]
    assert [e["kind"] for _, e in mine] == ["allocated", "released"]
    assert all(e["component"] == "decode" and e["node_id"] == g.node_id for _, e in mine)
    seqs = [e["seq"] for _, e in seen]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)  # in order, each once
    delays = {e["kind"]: round(at - committed[e["kind"]], 3) for at, e in mine}
    print(f"printed this long after each commit (s): {delays}")
    # Another process, later, from the number of the first: the same events after it, in the same order.
    note = next(e["seq"] for _, e in seen if e["kind"] == "note")
    later = subprocess.run([*cmd[:-4], "events", "--since", str(note), "-o", "json"], **_RUN)
    assert later.returncode == 0, later.stderr
    assert [json.loads(line) for line in later.stdout.splitlines()] == [e for _, e in seen if e["seq"] > note]


async def test_events_are_core_events_about_the_compute_group(
    k8s_cluster: ControlPlane,
    k8s_namespace: str,
    sa: Path,  # noqa: F811
) -> None:
    _, selector = make_nodes(k8s_cluster, 1, dra=False)
    async with manager(sa, k8s_namespace, selector) as mgr:
        g = await mgr.allocate_compute_group("decode", {"gpus": 1})
        assert await mgr.deallocate_compute_group(g.id)
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("big", {"gpus": 16})
        assert isinstance(mgr.store, KubernetesStateStore)
        log = mgr.store.event_log
    assert log.failed == 0 and log.dropped == 0
    name = cr_name(g.id)
    path = f"/apis/computegroups.dev/v1alpha1/namespaces/{k8s_namespace}/computegroups/{name}"
    group = k8s_cluster.client().get(path)
    # As `kubectl describe computegroup` finds them: by the involved object's kind, name and uid.
    about = events_of(
        k8s_cluster,
        k8s_namespace,
        fieldSelector=f"involvedObject.kind=ComputeGroup,involvedObject.name={name},"
        f"involvedObject.uid={group['metadata']['uid']}",
    )
    by_reason = {e["reason"]: e for e in about}
    assert sorted(by_reason) == ["Allocated", "Released"]
    for e in about:
        assert e["involvedObject"]["apiVersion"] == "computegroups.dev/v1alpha1"
        assert e["involvedObject"]["namespace"] == k8s_namespace
        assert e["type"] == "Normal" and e["count"] == 1 and e["source"]["component"] == "computegroups"
        assert e["firstTimestamp"] and e["lastTimestamp"] and e["eventTime"] and e["reportingInstance"]
        assert g.id in e["message"] and "decode" in e["message"]
    refused = events_of(k8s_cluster, k8s_namespace, fieldSelector="reason=Refused")
    assert len(refused) == 1 and refused[0]["type"] == "Warning" and refused[0]["count"] == 1
    assert refused[0]["involvedObject"]["kind"] == "ComputeGroupLedger"
    assert refused[0]["involvedObject"]["name"] == "default"
    assert "InsufficientResourcesError" in refused[0]["message"]
    # Read back by another store: exactly the events the manager emitted, numbered in write order.
    reader = KubernetesStateStore(sa, namespace=k8s_namespace)
    await reader.open()
    try:
        got = await reader.events_since(0)
    finally:
        await reader.close()
    emitted = [e for e in mgr.recent_events if e.kind in ("allocated", "released", "refused")]
    assert [e.kind for e in got] == ["allocated", "released", "refused"]
    assert [_fields(e) for e in got] == [_fields(e) for e in emitted]
    assert [e.seq for e in got] == sorted(e.seq for e in got) and got[0].seq > 0
    reader = KubernetesStateStore(sa, namespace=k8s_namespace)
    await reader.open()
    try:
        assert await reader.events_since(got[0].seq) == got[1:]
        assert await reader.events_since(got[0].seq, limit=1) == got[1:2]
        assert await reader.events_since(got[-1].seq) == []
    finally:
        await reader.close()


def _fields(e: Event) -> tuple[object, ...]:
    return (e.kind, e.group_id, e.node_id, e.component, e.detail, e.at)


async def test_identical_refusals_are_counted_on_one_event(
    k8s_cluster: ControlPlane,
    k8s_namespace: str,
    sa: Path,  # noqa: F811
) -> None:
    _, selector = make_nodes(k8s_cluster, 1, dra=False)
    async with manager(sa, k8s_namespace, selector) as mgr:
        for _ in range(50):
            with pytest.raises(InsufficientResourcesError):
                await mgr.allocate_compute_group("big", {"gpus": 16})
        assert isinstance(mgr.store, KubernetesStateStore)
        log = mgr.store.event_log
    refused = events_of(k8s_cluster, k8s_namespace, fieldSelector="reason=Refused")
    assert len(refused) == 1  # one object, counted
    assert refused[0]["count"] + log.dropped == 50 and log.failed == 0
    assert refused[0]["firstTimestamp"] <= refused[0]["lastTimestamp"]
    print(f"50 refusals: {log.written} writes, {log.dropped} dropped")


async def test_the_limiter_drops_and_counts_what_it_cannot_let_through(
    k8s_cluster: ControlPlane,
    k8s_namespace: str,
    sa: Path,  # noqa: F811
) -> None:
    store = KubernetesStateStore(sa, namespace=k8s_namespace, name="flood", event_burst=5, event_rate=0.001)
    await store.open()
    try:
        await store.record([Event("refused", None, None, "c", f"refusal {n}") for n in range(50)])
        await store.event_log.flush(timeout_s=1.0)  # what is still queued after this is dropped
        assert store.event_log.written == 5 and store.event_log.dropped == 45
    finally:
        await store.close()
    items = k8s_cluster.client().get(
        f"/api/v1/namespaces/{k8s_namespace}/events",
        labelSelector="app.kubernetes.io/managed-by=computegroups,computegroups.dev/store=flood",
    )["items"]
    assert sorted(i["message"] for i in items) == [f"refusal {n}" for n in range(5)]


def _take_event_rights(cp: ControlPlane, namespace: str) -> None:
    """Remove the ServiceAccount's rights on events (a real RBAC change) and wait until it is in force."""
    api = cp.client()
    path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/computegroups"
    role = copy.deepcopy(api.get(path))
    role["rules"] = [r for r in role["rules"] if r.get("resources") != ["events"]]
    api.put(path, role)
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"namespace": namespace, "verb": "create", "resource": "events"}},
    }
    as_sa = cp.client(cp.service_account_token(namespace, "computegroups"))
    deadline = time.monotonic() + 30
    while as_sa.post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)["status"]["allowed"]:
        assert time.monotonic() < deadline, "the RBAC change did not take effect"
        time.sleep(0.1)


async def test_a_refused_event_write_does_not_fail_the_commit(
    k8s_cluster: ControlPlane,
    k8s_namespace: str,
    sa: Path,  # noqa: F811
) -> None:
    _, selector = make_nodes(k8s_cluster, 1, dra=False)
    _take_event_rights(k8s_cluster, k8s_namespace)
    async with manager(sa, k8s_namespace, selector) as mgr:
        g = await mgr.allocate_compute_group("decode", {"gpus": 2})
        kept = await mgr.allocate_compute_group("encode", {"gpus": 1})
        assert await mgr.deallocate_compute_group(g.id)
        assert isinstance(mgr.store, KubernetesStateStore)
        log = mgr.store.event_log
    assert log.failed >= 3 and log.dropped == 0  # allocated, allocated, released: each refused (403)
    assert [x["spec"]["id"] for x in live_groups(k8s_cluster, k8s_namespace)] == [kept.id]  # the commits stand
    assert events_of(k8s_cluster, k8s_namespace) == []
