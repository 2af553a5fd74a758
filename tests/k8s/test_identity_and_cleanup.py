"""Stable device identity and durable clean-up, against the real control plane.

Devices other workloads hold keep their index and UUID and are marked taken; a live group and
its Running pod survive whatever another namespace schedules. A pod whose deletion fails (denied
by RBAC for a moment, a real 403) is deleted later by the same manager or by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from computegroups import ComputeGroupManager, InsufficientResourcesError, KubernetesComputeResourceProvider

from .harness import ApiError, ControlPlane, gpu_uuid
from .test_provider_kubernetes import deploy, make_nodes, provider

pytestmark = pytest.mark.k8s


@contextlib.asynccontextmanager
async def manager(kubeconfig: Path, namespace: str, selector: str, **kw: Any) -> AsyncIterator[ComputeGroupManager]:
    """A manager over the provider and its own store; ``kw`` goes to the manager."""
    p = provider(kubeconfig, namespace, selector)
    async with ComputeGroupManager(p, p.state_store(), **kw) as mgr:
        yield mgr


@pytest.fixture
def sa(k8s_cluster: ControlPlane, k8s_namespace: str) -> Path:
    """deploy/ applied to ``k8s_namespace``; a kubeconfig of its ServiceAccount."""
    return deploy(k8s_cluster, k8s_namespace)


def _pod(name: str, namespace: str, node: str, gpus: int = 0, claim: str | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": "x", "image": "busybox", "command": ["sleep", "3600"]}
    spec: dict[str, Any] = {"nodeSelector": {"kubernetes.io/hostname": node}, "containers": [container]}
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    if claim:
        container["resources"] = {"claims": [{"name": "gpu"}]}
        spec["resourceClaims"] = [{"name": "gpu", "resourceClaimName": claim}]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace}, "spec": spec}


def _running(cp: ControlPlane, namespace: str, name: str) -> dict[str, Any]:
    return cp.client().wait_for(
        f"/api/v1/namespaces/{namespace}/pods/{name}",
        lambda o: (o.get("status") or {}).get("phase") == "Running",
        timeout=60,
        what="pod Running",
    )


def _other_namespace(cp: ControlPlane) -> str:
    name = f"o-{uuid.uuid4().hex[:8]}"
    cp.ensure_namespace(name)
    return name


async def _live_uuids(mgr: ComputeGroupManager) -> list[str]:
    return [d.uuid for g in await mgr.list_compute_groups() for d in g.record.devices]


async def test_device_plugin_node_keeps_its_slots(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    """w (3 GPUs) and k (3) allocated, k runs, w released, another namespace takes 3 GPUs there."""
    (node,), selector = make_nodes(k8s_cluster, 1, dra=False)
    api = k8s_cluster.client()
    async with manager(sa, k8s_namespace, selector) as mgr:
        w = await mgr.allocate_compute_group("w", {"gpus": 3})
        k = await mgr.allocate_compute_group("k", {"gpus": 3})
        assert (w.resources["gpu_indices"], k.resources["gpu_indices"]) == ([0, 1, 2], [3, 4, 5])
        made = await mgr.provider.run_pod(k, "busybox", ["sleep", "3600"])  # type: ignore[attr-defined]
        pod_name = made["metadata"]["name"]
        _running(k8s_cluster, k8s_namespace, pod_name)
        assert await mgr.deallocate_compute_group(w.id)
    other = _other_namespace(k8s_cluster)
    api.post(f"/api/v1/namespaces/{other}/pods", _pod("someone-else", other, node, gpus=3))
    assert _running(k8s_cluster, other, "someone-else")["spec"]["nodeName"] == node

    for reconcile in (True, False):
        async with manager(sa, k8s_namespace, selector, reconcile_on_start=reconcile) as mgr:
            assert [len(n.gpus) for n in mgr.node_specs()] == [8]  # no slot dropped, none renumbered
            assert not [e for e in mgr.recent_events if e.kind == "group-device-vanished"]
            again = await mgr.get_compute_group(k.id)
            assert again.record.state.value == "allocated" and again.resources["gpu_indices"] == [3, 4, 5]
            taken = sorted(i for (n, i) in mgr.unhealthy_devices() if n == node)
            assert len(taken) == 3 and not set(taken) & {3, 4, 5}
            assert (await mgr.get_allocation_summary())["free_gpus"] == 2  # 8 - k's 3 - the other pod's 3
            pod = api.get(f"/api/v1/namespaces/{k8s_namespace}/pods/{pod_name}")
            assert pod["status"]["phase"] == "Running" and not pod["metadata"].get("deletionTimestamp")
            if not reconcile:
                g = await mgr.allocate_compute_group("fits", {"gpus": 2})
                assert not set(g.resources["gpu_indices"]) & ({3, 4, 5} | set(taken))
                with pytest.raises(InsufficientResourcesError):
                    await mgr.allocate_compute_group("too-many", {"gpus": 1})
                uuids = await _live_uuids(mgr)
                assert len(uuids) == len(set(uuids)) == 5
                assert await mgr.deallocate_compute_group(g.id)


async def test_dra_node_foreign_claim_on_a_lower_device(
    k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path
) -> None:
    """A claim of another namespace takes GPU 0, below k's GPUs; k and its pod and claim survive."""
    k8s_cluster.ensure_gpu_device_class()
    (node,), selector = make_nodes(k8s_cluster, 1)
    api = k8s_cluster.client()
    async with manager(sa, k8s_namespace, selector) as mgr:
        w = await mgr.allocate_compute_group("w", {"gpus": 1})
        k = await mgr.allocate_compute_group("k", {"gpus": 2})
        assert w.resources["gpu_indices"] == [0] and 0 not in k.resources["gpu_indices"]
        made = await mgr.provider.run_pod(k, "busybox", ["sleep", "3600"])  # type: ignore[attr-defined]
        pod_name = made["metadata"]["name"]
        _running(k8s_cluster, k8s_namespace, pod_name)
        assert await mgr.deallocate_compute_group(w.id)
    other = _other_namespace(k8s_cluster)
    foreign_uuid = gpu_uuid(node, 0)
    claim = {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {"name": "theirs", "namespace": other},
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "gpu",
                        "exactly": {
                            "deviceClassName": "gpu.nvidia.com",
                            "selectors": [
                                {"cel": {"expression": f'device.attributes["gpu.nvidia.com"].uuid == "{foreign_uuid}"'}}
                            ],
                        },
                    }
                ]
            }
        },
    }
    api.post(f"/apis/resource.k8s.io/v1/namespaces/{other}/resourceclaims", claim)
    api.post(f"/api/v1/namespaces/{other}/pods", _pod("someone-else", other, node, claim="theirs"))
    _running(k8s_cluster, other, "someone-else")

    for reconcile in (True, False):
        async with manager(sa, k8s_namespace, selector, reconcile_on_start=reconcile) as mgr:
            (spec,) = mgr.node_specs()
            assert [g.uuid for g in spec.gpus] == [gpu_uuid(node, i) for i in range(8)]  # stable identity
            assert list(mgr.unhealthy_devices()) == [(node, 0)]
            assert "ResourceClaim" in mgr.unhealthy_devices()[(node, 0)]
            again = await mgr.get_compute_group(k.id)
            assert again.record.state.value == "allocated" and again.resources["gpu_uuids"] == k.resources["gpu_uuids"]
            pod = api.get(f"/api/v1/namespaces/{k8s_namespace}/pods/{pod_name}")
            assert pod["status"]["phase"] == "Running" and not pod["metadata"].get("deletionTimestamp")
            mine = api.get(f"/apis/resource.k8s.io/v1/namespaces/{k8s_namespace}/resourceclaims/{pod_name}")
            assert not mine["metadata"].get("deletionTimestamp")
            assert (await mgr.get_allocation_summary())["free_gpus"] == 5
            if not reconcile:
                g = await mgr.allocate_compute_group("rest", {"gpus": 5})
                with pytest.raises(InsufficientResourcesError):
                    await mgr.allocate_compute_group("one-more", {"gpus": 1})
                uuids = [*await _live_uuids(mgr), foreign_uuid]
                assert len(uuids) == len(set(uuids)) == 8  # no UUID held twice
                assert await mgr.deallocate_compute_group(g.id)


def _set_pod_deletes(cp: ControlPlane, namespace: str, allowed: bool) -> None:
    """Grant or take away the ServiceAccount's right to delete pods (a real RBAC change)."""
    api = cp.client()
    path = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/roles/computegroups"
    role = copy.deepcopy(api.get(path))
    for rule in role["rules"]:
        if rule.get("resources") == ["pods"]:
            rule["verbs"] = ["create", "delete", "deletecollection"] if allowed else ["create"]
    api.put(path, role)
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SelfSubjectAccessReview",
        "spec": {"resourceAttributes": {"namespace": namespace, "verb": "delete", "resource": "pods"}},
    }
    sa_client = cp.client(cp.service_account_token(namespace, "computegroups"))
    deadline = time.monotonic() + 30
    while (
        sa_client.post("/apis/authorization.k8s.io/v1/selfsubjectaccessreviews", review)["status"]["allowed"] != allowed
    ):
        assert time.monotonic() < deadline, "the RBAC change did not take effect"
        time.sleep(0.1)


def _deleting(cp: ControlPlane, namespace: str, name: str) -> bool:
    try:
        pod = cp.client().get(f"/api/v1/namespaces/{namespace}/pods/{name}")
    except ApiError as e:
        if e.status == 404:
            return True
        raise
    return bool(pod["metadata"].get("deletionTimestamp"))


async def test_failed_pod_deletion_is_finished_later(
    k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, selector = make_nodes(k8s_cluster, 1, dra=False)
    async with manager(sa, k8s_namespace, selector) as mgr:
        p = mgr.provider
        assert isinstance(p, KubernetesComputeResourceProvider)
        one, two = [await mgr.allocate_compute_group(c, {"gpus": 1}) for c in ("one", "two")]
        names = [(await p.run_pod(g, "busybox", ["sleep", "3600"]))["metadata"]["name"] for g in (one, two)]
        for name in names:
            _running(k8s_cluster, k8s_namespace, name)
        podless = await mgr.allocate_compute_group("podless", {"gpus": 1})
        _set_pod_deletes(k8s_cluster, k8s_namespace, allowed=False)
        try:
            # A group that never had a pod sends nothing to delete: no request, so no failure.
            assert await mgr.deallocate_compute_group(podless.id)
            assert not [e for e in mgr.recent_events if e.kind == "provider-error"]
            # The same manager: the deletion is refused (403), the group is released anyway.
            assert await mgr.deallocate_compute_group(one.id)
            errors = [e for e in mgr.recent_events if e.kind == "provider-error"]
            assert len(errors) == 1 and "forbidden" in errors[0].detail
            assert not await mgr.deallocate_compute_group(one.id)  # idempotent: already released
            assert not _deleting(k8s_cluster, k8s_namespace, names[0])
            await asyncio.sleep(1.0)  # the provider retries meanwhile; still refused
            assert not _deleting(k8s_cluster, k8s_namespace, names[0])
        finally:
            _set_pod_deletes(k8s_cluster, k8s_namespace, allowed=True)
        for _ in range(200):  # retries back off from 0.5 s; the next one succeeds
            if _deleting(k8s_cluster, k8s_namespace, names[0]):
                break
            await asyncio.sleep(0.1)
        assert _deleting(k8s_cluster, k8s_namespace, names[0])
        # Another manager: this one fails to delete the pod of "two" and goes away before a retry works.
        _set_pod_deletes(k8s_cluster, k8s_namespace, allowed=False)
        try:
            assert await mgr.deallocate_compute_group(two.id)
        finally:
            await mgr.provider.close()  # the retry dies with this process's provider
    _set_pod_deletes(k8s_cluster, k8s_namespace, allowed=True)
    assert not _deleting(k8s_cluster, k8s_namespace, names[1])
    with caplog.at_level(logging.INFO, logger="computegroups.k8s"):
        async with manager(sa, k8s_namespace, selector) as mgr:
            assert _deleting(k8s_cluster, k8s_namespace, names[1])  # opening finished the clean-up
            assert not await mgr.deallocate_compute_group(two.id)
    assert any("released group" in r.getMessage() and two.id in r.getMessage() for r in caplog.records)


async def test_an_open_manager_sees_gpus_another_workload_takes(
    k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path
) -> None:
    """No monitor, no call: the provider's watch of pods marks what another namespace takes, and
    frees it again when that pod is gone, while the manager stays open."""
    (node,), selector = make_nodes(k8s_cluster, 1, dra=False)
    async with manager(sa, k8s_namespace, selector) as mgr:
        assert mgr.monitor is None and mgr.follower is not None
        mine = await mgr.allocate_compute_group("mine", {"gpus": 2})
        other = _other_namespace(k8s_cluster)
        api = k8s_cluster.client()
        api.post(f"/api/v1/namespaces/{other}/pods", _pod("someone-else", other, node, gpus=6))
        for _ in range(300):
            if len(mgr.unhealthy_devices()) == 6:
                break
            await asyncio.sleep(0.1)
        taken = sorted(i for (n, i) in mgr.unhealthy_devices() if n == node)
        assert taken == [2, 3, 4, 5, 6, 7] and not set(taken) & set(mine.resources["gpu_indices"])
        assert any(e.kind == "device-unhealthy" and "taken: 6 of 8" in e.detail for e in mgr.recent_events)
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("more", {"gpus": 1})
        assert (await mgr.get_allocation_summary())["free_gpus"] == 0
        assert (await mgr.get_compute_group(mine.id)).record.state.value == "allocated"
        api.request("DELETE", f"/api/v1/namespaces/{other}/pods/someone-else", {"gracePeriodSeconds": 0})
        for _ in range(300):
            if not mgr.unhealthy_devices():
                break
            await asyncio.sleep(0.1)
        assert (await mgr.get_allocation_summary())["free_gpus"] == 6
        more = await mgr.allocate_compute_group("more", {"gpus": 6})
        assert set(more.resources["gpu_indices"]) == {2, 3, 4, 5, 6, 7}
