"""Shared parts of the Kubernetes benchmarks: KWOK GPU nodes in bulk, kube-scheduler's binding rate.

Both ``bench.k8s_commits`` and ``bench.k8s_scale`` run on the control plane of ``tests/k8s``
(``tests/k8s/harness.py``); this module holds the one copy of what they share.

:func:`make_nodes` creates KWOK GPU nodes from a thread pool and waits until all are Ready (one list
per poll, not one GET per node). :func:`scheduler_binding_rate` measures kube-scheduler on the same
control plane: ``pods`` pods, each requesting ``nvidia.com/gpu: 1`` and selecting the given nodes
by label, created from a thread pool; the time runs from the first create until every pod has a
``spec.nodeName`` (one list per poll), and the rate is ``pods / that time``; once with
kube-scheduler stopped during the creates (its own rate), once not (bounded by the creates). The
pods are deleted afterwards and waited for, so the GPUs are free again.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
#: Threads creating nodes and pods (the API server, not the client, is the limit on 2 cores).
THREADS = 8


def start_control_plane() -> Any:
    """The ``tests/k8s`` control plane, started from the already built binaries."""
    sys.path.insert(0, str(REPO))
    from tests.k8s.harness import ControlPlane, find_binaries

    return ControlPlane.start(find_binaries(build=False))


def deploy_namespace(cp: Any, prefix: str = "b") -> tuple[str, Path]:
    """A fresh namespace with the CRDs and RBAC of ``deploy/``; returns it and its kubeconfig."""
    from tests.k8s.test_provider_kubernetes import deploy

    ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
    cp.ensure_namespace(ns)
    return ns, deploy(cp, ns)


def _items(cp: Any, path: str, selector: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cont: str | None = None
    while True:
        params: dict[str, Any] = {"labelSelector": selector, "limit": 500}
        if cont:
            params["continue"] = cont
        page = cp.client().get(path, **params)
        items.extend(page.get("items") or [])
        cont = (page.get("metadata") or {}).get("continue")
        if not cont:
            return items


def make_nodes(cp: Any, count: int, labels: dict[str, str], *, gpus: int = 8, dra: bool = True) -> float:
    """Create ``count`` KWOK nodes of ``gpus`` GPUs carrying ``labels``; return the seconds until all are Ready."""
    from tests.k8s.harness import node_is_ready

    tag = uuid.uuid4().hex[:6]
    start = time.monotonic()

    def one(i: int) -> None:
        cp.make_gpu_node(f"n-{tag}-{i}", gpus=gpus, labels=labels, dra=dra, wait_ready=False)

    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(one, range(count)))
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    deadline = start + 60 + count * 0.2
    while sum(node_is_ready(n) for n in _items(cp, "/api/v1/nodes", selector)) < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{count} nodes labelled {selector} not Ready in time")
        time.sleep(0.5)
    return time.monotonic() - start


def delete_nodes(cp: Any, labels: dict[str, str]) -> None:
    """Delete the nodes carrying ``labels`` (and their ResourceSlices)."""
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    names = [n["metadata"]["name"] for n in _items(cp, "/api/v1/nodes", selector)]
    with ThreadPoolExecutor(THREADS) as pool:
        list(pool.map(cp.delete_node, names))


def gpu_pod(name: str, run: str, node_labels: dict[str, str]) -> dict[str, Any]:
    """A pod requesting one ``nvidia.com/gpu``, limited to the nodes carrying ``node_labels``."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"computegroups-bench-pods": run}},
        "spec": {
            "nodeSelector": dict(node_labels),
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": "main",
                    "image": "example.invalid/cuda:latest",
                    "resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "100m", "memory": "128Mi"}},
                }
            ],
        },
    }


def _scheduler(cp: Any) -> Any:
    return next(p.popen for p in cp.procs if p.name == "kube-scheduler")


def _bind(cp: Any, namespace: str, pods: int, node_labels: dict[str, str], paused: bool) -> dict[str, Any]:
    run = uuid.uuid4().hex[:6]
    api = cp.client()
    path = f"/api/v1/namespaces/{namespace}/pods"
    selector = f"computegroups-bench-pods={run}"
    sched = _scheduler(cp)
    if paused:
        sched.send_signal(signal.SIGSTOP)
    try:
        start = time.monotonic()
        with ThreadPoolExecutor(THREADS) as pool:
            list(pool.map(lambda i: api.post(path, gpu_pod(f"p-{run}-{i}", run, node_labels)), range(pods)))
        created = time.monotonic() - start
    finally:
        if paused:
            sched.send_signal(signal.SIGCONT)
    if paused:
        start = time.monotonic()
    deadline = start + 120 + pods * 0.5
    while True:
        items = _items(cp, path, selector)
        bound = sum(1 for p in items if (p.get("spec") or {}).get("nodeName"))
        if bound >= pods:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"kube-scheduler bound {bound} of {pods} pods in time")
        time.sleep(0.05)
    took = time.monotonic() - start
    body = {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 0}
    api.request("DELETE", path, body, params={"labelSelector": selector})
    while _items(cp, path, selector):
        time.sleep(0.2)
    return {"seconds": round(took, 2), "create_s": round(created, 2), "pods_per_s": round(pods / took, 1)}


def scheduler_binding_rate(cp: Any, namespace: str, pods: int, node_labels: dict[str, str]) -> dict[str, Any]:
    """kube-scheduler binding ``pods`` one-GPU pods onto the nodes carrying ``node_labels``, twice.

    ``scheduler``: kube-scheduler is stopped (SIGSTOP) while the pods are created and the time runs
    from its SIGCONT until all have ``spec.nodeName``: its binding rate alone. ``with_creates``: the
    time runs from the first create, so the API server's pod-create rate bounds it. Each gives the
    seconds, the seconds the creates took, and pods per second. The pods are deleted after each.
    """
    return {
        "pods": pods,
        "scheduler": _bind(cp, namespace, pods, node_labels, paused=True),
        "with_creates": _bind(cp, namespace, pods, node_labels, paused=False),
    }


def cpu_seconds(cp: Any) -> dict[str, float]:
    """CPU seconds (user + system) each control-plane process has used so far, by name."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for proc in cp.procs:
        try:
            fields = Path(f"/proc/{proc.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[proc.name] = (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return out


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages now."""
    return [round(x, 2) for x in os.getloadavg()]
