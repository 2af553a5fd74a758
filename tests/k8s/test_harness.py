"""Checks that the k8s test environment is a real control plane, not a mock."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest

from .harness import (
    GPU_DRA_DRIVER,
    ApiError,
    ControlPlane,
    decode_jwt_claims,
    node_is_ready,
    pinned_k8s_version,
    pod_phase,
)

pytestmark = pytest.mark.k8s


def _uid() -> str:
    return uuid.uuid4().hex[:6]


def _gpu_pod(name: str, gpus: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "example.invalid/cuda:latest",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus), "cpu": "1", "memory": "1Gi"}},
                }
            ]
        },
    }


def test_version_and_readyz(k8s_cluster: ControlPlane) -> None:
    api = k8s_cluster.client()
    assert api.get("/version")["gitVersion"] == pinned_k8s_version()
    assert api.request("GET", "/readyz") == "ok"
    assert k8s_cluster.kubeconfig.exists()
    # resource.k8s.io/v1 (DRA GA) is served.
    groups = api.get("/apis/resource.k8s.io")
    assert "v1" in [v["version"] for v in groups["versions"]]


def test_gpu_pod_is_scheduled_to_node_with_room_and_runs(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    u = _uid()
    small, big = f"gpu-small-{u}", f"gpu-big-{u}"
    n1 = k8s_cluster.make_gpu_node(small, gpus=1, dra=False)
    n2 = k8s_cluster.make_gpu_node(big, gpus=8, clique="cluster-a.1")
    assert node_is_ready(n1) and node_is_ready(n2)
    assert n2["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert n2["metadata"]["labels"]["nvidia.com/gpu.clique"] == "cluster-a.1"
    api = k8s_cluster.client()
    # Cordon every other node so only our two candidates compete.
    for node in api.get("/api/v1/nodes")["items"]:
        if node["metadata"]["name"] not in (small, big):
            api.patch(f"/api/v1/nodes/{node['metadata']['name']}", {"spec": {"unschedulable": True}})
    try:
        api.post(f"/api/v1/namespaces/{k8s_namespace}/pods", _gpu_pod("train-0", 2))
        pod = api.wait_for(
            f"/api/v1/namespaces/{k8s_namespace}/pods/train-0",
            lambda p: pod_phase(p) == "Running",
            timeout=60,
            what="pod Running",
        )
        assert pod["spec"]["nodeName"] == big
        # A pod needing more GPUs than any node has stays Pending (Unschedulable).
        api.post(f"/api/v1/namespaces/{k8s_namespace}/pods", _gpu_pod("too-big", 9))
        pod = api.wait_for(
            f"/api/v1/namespaces/{k8s_namespace}/pods/too-big",
            lambda p: any(c.get("reason") == "Unschedulable" for c in p.get("status", {}).get("conditions", []) or []),
            timeout=60,
            what="pod Unschedulable",
        )
        assert not pod["spec"].get("nodeName")
    finally:
        for node in api.get("/api/v1/nodes")["items"]:
            if node["spec"].get("unschedulable"):
                api.patch(f"/api/v1/nodes/{node['metadata']['name']}", {"spec": {"unschedulable": False}})


def test_crd_openapi_schema_rejects_invalid_object(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    api = k8s_cluster.client()
    group, plural = f"t{_uid()}.computegroups.test", "widgets"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": plural, "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "required": ["replicas"],
                                    "properties": {"replicas": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    api.post("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    api.wait_for(
        f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.{group}",
        lambda o: any(
            c["type"] == "Established" and c["status"] == "True"
            for c in (o.get("status") or {}).get("conditions") or []
        ),
        timeout=30,
        what="CRD Established",
    )
    path = f"/apis/{group}/v1/namespaces/{k8s_namespace}/{plural}"

    def widget(name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": name}, "spec": spec}

    # The discovery of a fresh CRD can lag a moment behind Established.
    deadline = time.monotonic() + 30
    while True:
        try:
            api.post(path, widget("good", {"replicas": 2}))
            break
        except ApiError as e:
            if e.status != 404 or time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with pytest.raises(ApiError) as bad:
        api.post(path, widget("bad", {"replicas": "lots"}))
    assert bad.value.status == 422, bad.value.body
    with pytest.raises(ApiError) as missing:
        api.post(path, widget("bad2", {}))
    assert missing.value.status == 422
    assert "replicas" in missing.value.body["message"]


def test_stale_resource_version_conflicts(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    api = k8s_cluster.client()
    base = f"/api/v1/namespaces/{k8s_namespace}/configmaps"
    cm = api.post(base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"a": "1"}})
    stale = dict(cm, data={"a": "stale"})
    fresh = dict(cm, data={"a": "2"})
    updated = api.put(f"{base}/cm", fresh)
    assert updated["metadata"]["resourceVersion"] != cm["metadata"]["resourceVersion"]
    with pytest.raises(ApiError) as conflict:
        api.put(f"{base}/cm", stale)
    assert conflict.value.status == 409
    assert api.get(f"{base}/cm")["data"] == {"a": "2"}


def test_watch_sees_changes(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    api = k8s_cluster.client()
    base = f"/api/v1/namespaces/{k8s_namespace}/configmaps"
    api.post(base, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "watched"}, "data": {"v": "0"}})
    rv = api.get(base)["metadata"]["resourceVersion"]

    def mutate() -> None:
        time.sleep(0.5)
        api.patch(f"{base}/watched", {"data": {"v": "1"}})
        api.delete(f"{base}/watched")

    t = threading.Thread(target=mutate)
    t.start()
    seen = []
    for event in api.watch(base, resource_version=rv, timeout=20):
        seen.append((event["type"], event["object"]["metadata"]["name"], (event["object"].get("data") or {}).get("v")))
        if event["type"] == "DELETED":
            break
    t.join()
    assert ("MODIFIED", "watched", "1") in seen
    assert seen[-1][0] == "DELETED"


def test_resource_slices_v1(k8s_cluster: ControlPlane) -> None:
    api = k8s_cluster.client()
    name = f"gpu-dra-{_uid()}"
    k8s_cluster.make_gpu_node(name, gpus=4, product="NVIDIA-H200", memory_mib=143771, clique="cluster-b.7")
    k8s_cluster.ensure_gpu_device_class()
    slices = api.get("/apis/resource.k8s.io/v1/resourceslices", fieldSelector=f"spec.nodeName={name}")
    assert slices["apiVersion"] == "resource.k8s.io/v1"
    [rs] = slices["items"]
    assert rs["spec"]["driver"] == GPU_DRA_DRIVER
    devices = rs["spec"]["devices"]
    assert [d["name"] for d in devices] == [f"gpu-{i}" for i in range(4)]
    attrs = devices[0]["attributes"]
    assert attrs["productName"] == {"string": "NVIDIA-H200"}
    assert attrs["architecture"] == {"string": "Hopper"}
    assert attrs["uuid"]["string"].startswith("GPU-")
    assert "resource.kubernetes.io/pcieRoot" in attrs
    assert devices[0]["capacity"]["memory"]["value"] == "143771Mi"
    assert attrs["resource.kubernetes.io/numaNode"] == {"int": 0}
    # Kept by the server (DRAConsumableCapacity, beta and on by default since 1.36): shareable devices.
    assert devices[0]["allowMultipleAllocations"] is True
    assert devices[0]["capacity"]["shares"] == {
        "value": "1k",
        "requestPolicy": {"default": "1k", "validRange": {"min": "1", "max": "1k"}},
    }
    assert len({d["attributes"]["uuid"]["string"] for d in devices}) == 4
    dc = api.get(f"/apis/resource.k8s.io/v1/deviceclasses/{GPU_DRA_DRIVER}")
    assert dc["spec"]["selectors"]


def test_service_account_token_and_rbac(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    ns = k8s_namespace
    token = k8s_cluster.service_account_token(ns, "provider")
    claims = decode_jwt_claims(token)
    assert claims["iss"] == ControlPlane.SA_ISSUER
    assert claims["sub"] == f"system:serviceaccount:{ns}:provider"
    sa = k8s_cluster.client(token=token)
    review = sa.post(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    assert review["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:provider"
    assert sa.status("GET", f"/api/v1/namespaces/{ns}/pods") == 403

    admin = k8s_cluster.client()
    admin.post(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "pod-reader"},
            "rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
        },
    )
    admin.post(
        f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "provider-reads-pods"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "pod-reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "provider", "namespace": ns}],
        },
    )
    deadline = time.monotonic() + 10  # RBAC informer propagation
    while sa.status("GET", f"/api/v1/namespaces/{ns}/pods") != 200:
        assert time.monotonic() < deadline, "RoleBinding never took effect"
        time.sleep(0.1)
    assert sa.status("GET", "/api/v1/namespaces/default/pods") == 403
    assert (
        sa.status(
            "POST",
            f"/api/v1/namespaces/{ns}/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}},
        )
        == 403
    )
    kc = k8s_cluster.service_account_kubeconfig(ns, "provider")
    assert "system:serviceaccount" in kc.read_text()


def test_kubeconfig_is_usable(k8s_cluster: ControlPlane) -> None:
    import yaml  # PyYAML: kubeconfig is written as JSON, which YAML loaders accept

    cfg = yaml.safe_load(k8s_cluster.kubeconfig.read_text())
    cluster = cfg["clusters"][0]["cluster"]
    assert cluster["server"] == k8s_cluster.server
    assert cluster["certificate-authority"] == str(k8s_cluster.ca_file)
    assert cfg["users"][0]["user"]["token"] == k8s_cluster.admin_token


def test_independent_control_plane_stops_without_leftovers(k8s_cluster: ControlPlane) -> None:
    """A second, private control plane comes up next to the session one and
    ``stop()`` leaves no etcd/kube-apiserver/kube-scheduler/kwok behind."""
    cp = ControlPlane.start(k8s_cluster.bin_dir)
    try:
        assert cp.server != k8s_cluster.server
        assert cp.client().get("/version")["gitVersion"] == pinned_k8s_version()
        pids = [p.popen.pid for p in cp.procs]
        assert [p.name for p in cp.procs] == [
            "etcd",
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kwok",
        ]
        assert set(cp.leftover_processes()) >= set(pids)
    finally:
        cp.stop()
    assert cp.leftover_processes() == []
    assert all(p.popen.returncode is not None for p in cp.procs)
    assert not cp.workdir.exists()


def test_dra_claim_template_allocates_gpus(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    """kube-controller-manager turns the template into a ResourceClaim, the real
    scheduler allocates devices from the fake node's ResourceSlice, KWOK runs it."""
    api = k8s_cluster.client()
    ns = k8s_namespace
    node = f"gpu-claims-{_uid()}"
    k8s_cluster.make_gpu_node(node, gpus=8, clique="cluster-c.3")
    k8s_cluster.ensure_gpu_device_class()
    api.post(
        f"/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaimtemplates",
        {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "ResourceClaimTemplate",
            "metadata": {"name": "two-gpus"},
            "spec": {
                "spec": {
                    "devices": {
                        "requests": [
                            {
                                "name": "gpus",
                                "exactly": {
                                    "deviceClassName": GPU_DRA_DRIVER,
                                    "allocationMode": "ExactCount",
                                    "count": 2,
                                    "selectors": [
                                        {"cel": {"expression": 'device.attributes["gpu.nvidia.com"].index >= 0'}}
                                    ],
                                },
                            }
                        ]
                    }
                }
            },
        },
    )
    api.post(
        f"/api/v1/namespaces/{ns}/pods",
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "dra-0"},
            "spec": {
                "nodeSelector": {"kubernetes.io/hostname": node},
                "resourceClaims": [{"name": "gpus", "resourceClaimTemplateName": "two-gpus"}],
                "containers": [
                    {
                        "name": "main",
                        "image": "example.invalid/cuda:latest",
                        "resources": {"claims": [{"name": "gpus"}]},
                    }
                ],
            },
        },
    )
    pod = api.wait_for(
        f"/api/v1/namespaces/{ns}/pods/dra-0", lambda p: pod_phase(p) == "Running", timeout=60, what="DRA pod Running"
    )
    assert pod["spec"]["nodeName"] == node
    [status] = pod["status"]["resourceClaimStatuses"]
    claim = api.get(f"/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims/{status['resourceClaimName']}")
    results = claim["status"]["allocation"]["devices"]["results"]
    assert len(results) == 2
    assert {r["driver"] for r in results} == {GPU_DRA_DRIVER}
    assert {r["pool"] for r in results} == {node}
    assert claim["status"]["reservedFor"][0]["name"] == "dra-0"


def test_job_completes_and_garbage_collection(k8s_cluster: ControlPlane, k8s_namespace: str) -> None:
    """The Job controller creates a pod, KWOK completes it, and deleting the Job
    garbage-collects the pod (kube-controller-manager is real too)."""
    api = k8s_cluster.client()
    ns = k8s_namespace
    k8s_cluster.make_gpu_node(f"gpu-job-{_uid()}", gpus=8, dra=False)
    api.post(
        f"/apis/batch/v1/namespaces/{ns}/jobs",
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": "once"},
            "spec": {
                "backoffLimit": 0,
                "template": {
                    "spec": {
                        "restartPolicy": "Never",
                        "containers": [
                            {
                                "name": "main",
                                "image": "example.invalid/cuda:latest",
                                "resources": {"limits": {"nvidia.com/gpu": "1"}},
                            }
                        ],
                    }
                },
            },
        },
    )
    api.wait_for(
        f"/apis/batch/v1/namespaces/{ns}/jobs/once",
        lambda j: any(
            c["type"] == "Complete" and c["status"] == "True" for c in j.get("status", {}).get("conditions", []) or []
        ),
        timeout=90,
        what="Job Complete",
    )
    pods = api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="job-name=once")["items"]
    assert [pod_phase(p) for p in pods] == ["Succeeded"]
    api.request("DELETE", f"/apis/batch/v1/namespaces/{ns}/jobs/once", {"propagationPolicy": "Background"})
    deadline = time.monotonic() + 60
    while api.get(f"/api/v1/namespaces/{ns}/pods", labelSelector="job-name=once")["items"]:
        assert time.monotonic() < deadline, "garbage collector did not delete the Job's pod"
        time.sleep(0.2)


def test_two_word_architectures_make_valid_labels(k8s_cluster: ControlPlane) -> None:
    """L40/L4 are Ada Lovelace: the family label is ``ada-lovelace`` (a label value has no spaces)."""
    name = f"l40-{uuid.uuid4().hex[:8]}"
    node = k8s_cluster.make_gpu_node(name, product="NVIDIA-L40S", memory_mib=46068, dra=False)
    assert node["metadata"]["labels"]["nvidia.com/gpu.family"] == "ada-lovelace"
    k8s_cluster.delete_node(name)
