"""KubernetesComputeResourceProvider and KubernetesStateStore against a real API server.

Everything runs as the ServiceAccount of the shipped RBAC (deploy/), not as cluster admin.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from computegroups import ComputeGroupManager, KubernetesComputeResourceProvider, ProviderError, StateError
from computegroups.state.kubernetes import MIRROR_LAG, KubernetesStateStore

from .harness import ApiError, ControlPlane, gpu_uuid

pytestmark = pytest.mark.k8s

REPO = Path(__file__).resolve().parents[2]
_PATHS = {
    "CustomResourceDefinition": "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
    "ClusterRole": "/apis/rbac.authorization.k8s.io/v1/clusterroles",
    "ClusterRoleBinding": "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
}
_NS_PATHS = {
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "Role": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/roles",
    "RoleBinding": "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}/rolebindings",
}


def install_crds(cp: ControlPlane) -> None:
    api = cp.client()
    for doc in yaml.safe_load_all((REPO / "deploy" / "crds.yaml").read_text()):
        try:
            api.post(_PATHS["CustomResourceDefinition"], doc)
        except ApiError as e:
            if e.status != 409:
                raise
        api.wait_for(
            f"{_PATHS['CustomResourceDefinition']}/{doc['metadata']['name']}",
            lambda o: any(
                c["type"] == "Established" and c["status"] == "True"
                for c in (o.get("status") or {}).get("conditions") or []
            ),
            timeout=30,
            what="CRD established",
        )


def deploy(cp: ControlPlane, namespace: str) -> Path:
    """Apply deploy/ (CRDs once, RBAC into ``namespace``); return a kubeconfig of its ServiceAccount."""
    install_crds(cp)
    api = cp.client()
    text = (REPO / "deploy" / "rbac.yaml").read_text()
    text = text.replace("computegroups-discovery", f"computegroups-discovery-{namespace}")
    text = text.replace("namespace: computegroups", f"namespace: {namespace}")
    for doc in yaml.safe_load_all(text):
        kind = doc["kind"]
        if kind == "Namespace":
            continue
        path = _PATHS.get(kind) or _NS_PATHS[kind].format(ns=namespace)
        try:
            api.post(path, doc)
        except ApiError as e:
            if e.status != 409:
                raise
    return cp.service_account_kubeconfig(namespace, "computegroups")


def provider(kubeconfig: Path, namespace: str, selector: str, **kw: Any) -> KubernetesComputeResourceProvider:
    return KubernetesComputeResourceProvider(kubeconfig, namespace=namespace, node_selector=selector, **kw)


def make_nodes(cp: ControlPlane, n: int = 2, **kw: Any) -> tuple[list[str], str]:
    """n fresh 8-GPU nodes labelled with a unique set label; returns (names, label selector)."""
    tag = uuid.uuid4().hex[:6]
    names = [f"cg-{tag}-{chr(ord('a') + i)}" for i in range(n)]
    for name in names:
        cp.make_gpu_node(name, labels={"computegroups-test": tag}, **kw)
    return names, f"computegroups-test={tag}"


@pytest.fixture
def sa(k8s_cluster: ControlPlane, k8s_namespace: str) -> Path:
    """deploy/ applied to ``k8s_namespace`` (CRDs, RBAC); a kubeconfig of its ServiceAccount."""
    return deploy(k8s_cluster, k8s_namespace)


@contextlib.asynccontextmanager
async def manager(kubeconfig: Path, namespace: str, selector: str, **kw: Any) -> AsyncIterator[ComputeGroupManager]:
    p = provider(kubeconfig, namespace, selector, **kw)
    async with ComputeGroupManager(p, p.state_store()) as mgr:
        yield mgr


def live_groups(cp: ControlPlane, namespace: str) -> list[dict[str, Any]]:
    items = cp.client().get(f"/apis/computegroups.dev/v1alpha1/namespaces/{namespace}/computegroups")["items"]
    live = [i for i in items if not i["spec"].get("deleted") and i["spec"]["record"]["state"] != "released"]
    labelled = cp.client().get(
        f"/apis/computegroups.dev/v1alpha1/namespaces/{namespace}/computegroups",
        labelSelector="computegroups.dev/state notin (released,deleted)",
    )["items"]
    assert sorted(i["metadata"]["name"] for i in labelled) == sorted(i["metadata"]["name"] for i in live)
    return live


# -- discovery ------------------------------------------------------------------------
async def test_discovery_dra_and_counts(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    names, selector = make_nodes(k8s_cluster, 1, clique="fabric-1.0")
    plain, plain_sel = make_nodes(k8s_cluster, 1, dra=False, gpus=4, product="NVIDIA-A100-SXM4-40GB", memory_mib=40960)
    async with provider(sa, k8s_namespace, selector) as p:
        inv = await p.discover_resources()
    (node,) = inv.nodes
    assert node.id == names[0] and len(node.gpus) == 8
    assert [g.uuid for g in node.gpus] == [gpu_uuid(names[0], i) for i in range(8)]
    assert node.gpus[0].name == "NVIDIA H100 80GB HBM3" and node.gpus[0].memory_mib == 81559
    assert node.labels["nvidia.com/gpu.clique"] == "fabric-1.0"
    assert node.topology is not None and node.topology.is_nvlink(0, 7)  # one NVLink clique
    assert [g.numa_node for g in node.gpus] == [0] * 4 + [1] * 4  # resource.kubernetes.io/numaNode
    async with provider(sa, k8s_namespace, plain_sel) as p:
        inv = await p.discover_resources()
    (node,) = inv.nodes
    assert node.topology is None and len(node.gpus) == 4
    assert [g.uuid for g in node.gpus] == [f"k8s-{plain[0]}-gpu{i}" for i in range(4)]
    assert node.gpus[0].name == "NVIDIA A100 SXM4 40GB" and node.gpus[0].memory_mib == 40960


async def test_foreign_pods_cordon_and_health(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    names, selector = make_nodes(k8s_cluster, 2, dra=False)
    api = k8s_cluster.client()
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "someone-else", "namespace": k8s_namespace},
        "spec": {
            "nodeName": names[0],
            "containers": [{"name": "x", "image": "x", "resources": {"limits": {"nvidia.com/gpu": "3"}}}],
        },
    }
    api.post(f"/api/v1/namespaces/{k8s_namespace}/pods", pod)
    api.patch(f"/api/v1/nodes/{names[1]}", {"spec": {"unschedulable": True}})
    async with manager(sa, k8s_namespace, selector) as mgr:
        by_id = {n.id: n for n in mgr.node_specs()}
        assert len(by_id[names[0]].gpus) == 8  # every slot keeps its place; 3 are taken by another pod
        assert sorted(i for (n, i) in mgr.unhealthy_devices() if n == names[0]) == [5, 6, 7]
        assert names[1] in mgr.inventory.cordoned
        g = await mgr.allocate_compute_group("x", {"gpus": 4})
        assert g.node_id == names[0]  # the cordoned node takes nothing new
        with pytest.raises(Exception, match="cordon"):
            await mgr.allocate_compute_group("y", {"gpus": 2})
        health = await mgr.provider.sample_health()
        sick = [h for h in health if not h.healthy]
        assert len(health) == 16 and [(h.node_id, h.index) for h in sick] == [(names[0], i) for i in (5, 6, 7)]
        assert all(h.reason.startswith("taken: 3 of 8 GPUs are requested by other pods") for h in sick)


async def _health_events(mgr: ComputeGroupManager, n: int) -> list[Any]:
    """The health events of the open manager, once there are ``n`` (at most 30 s)."""
    for _ in range(300):
        events = [e for e in mgr.recent_events if e.kind.startswith("device-")]
        if len(events) >= n:
            return events
        await asyncio.sleep(0.1)
    return events


async def test_node_not_ready_marks_gpus_unhealthy(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    names, selector = make_nodes(k8s_cluster, 1, dra=False)
    async with manager(sa, k8s_namespace, selector) as mgr:
        assert not await mgr.refresh_health()
        api = k8s_cluster.client()
        # kwok keeps fake nodes Ready; stop it managing this one, then report it NotReady.
        api.patch(f"/api/v1/nodes/{names[0]}", {"metadata": {"annotations": {"kwok.x-k8s.io/node": None}}})
        node = api.get(f"/api/v1/nodes/{names[0]}")
        for c in node["status"]["conditions"]:
            if c["type"] == "Ready":
                c.update(status="False", reason="KubeletNotReady")
        api.put(f"/api/v1/nodes/{names[0]}/status", node)
        events = await _health_events(mgr, 8)  # seen by the watch of nodes, without a call
        assert len(events) == 8 and all(e.kind == "device-unhealthy" for e in events)
        assert "KubeletNotReady" in events[0].detail
        with pytest.raises(Exception, match=r"no node can take"):
            await mgr.allocate_compute_group("x", {"gpus": 1})


# -- materialisation --------------------------------------------------------------------
async def test_run_pod_dra_claims_exact_devices(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    k8s_cluster.ensure_gpu_device_class()
    _, selector = make_nodes(k8s_cluster, 1)
    api = k8s_cluster.client()
    async with manager(sa, k8s_namespace, selector) as mgr:
        await mgr.allocate_compute_group("warm", {"gpus": 1})
        g = await mgr.allocate_compute_group("decode", {"gpus": 2})
        p = mgr.provider
        assert isinstance(p, KubernetesComputeResourceProvider)
        made = await p.run_pod(g, "busybox", ["sleep", "3600"])
        name = made["metadata"]["name"]
        pod = api.wait_for(
            f"/api/v1/namespaces/{k8s_namespace}/pods/{name}",
            lambda o: o.get("status", {}).get("phase") == "Running",
            timeout=60,
            what="pod Running",
        )
        assert pod["spec"]["nodeName"] == g.node_id
        claim = api.get(f"/apis/resource.k8s.io/v1/namespaces/{k8s_namespace}/resourceclaims/{name}")
        results = claim["status"]["allocation"]["devices"]["results"]
        assert sorted(r["device"] for r in results) == sorted(f"gpu-{i}" for i in g.resources["gpu_indices"])
        cr = api.get(f"/apis/computegroups.dev/v1alpha1/namespaces/{k8s_namespace}/computegroups/{g.id}")
        assert cr["status"] == {"pod": name, "resourceClaim": name}
        assert await mgr.deallocate_compute_group(g.id)
        gone = api.get(f"/api/v1/namespaces/{k8s_namespace}/pods", labelSelector=f"computegroups.dev/group={g.id}")
        assert all(p.get("metadata", {}).get("deletionTimestamp") for p in gone["items"])


async def test_device_taint_marks_gpu_unhealthy(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    names, selector = make_nodes(k8s_cluster, 1)
    api = k8s_cluster.client()
    async with manager(sa, k8s_namespace, selector) as mgr:
        assert not await mgr.refresh_health()
        path = f"/apis/resource.k8s.io/v1/resourceslices/{names[0]}-gpu.nvidia.com"
        rs = api.get(path)
        rs["spec"]["devices"][2]["taints"] = [{"key": "gpu.nvidia.com/xid", "value": "79", "effect": "NoSchedule"}]
        api.put(path, rs)
        events = await _health_events(mgr, 1)  # seen by the watch of slices, without a call
        assert [(e.kind, e.node_id, e.detail) for e in events] == [
            ("device-unhealthy", names[0], "GPU 2: device taint gpu.nvidia.com/xid=79:NoSchedule")
        ]
        g = await mgr.allocate_compute_group("x", {"gpus": 7})  # every GPU but the tainted one
        assert sorted(g.resources["gpu_indices"]) == [0, 1, 3, 4, 5, 6, 7]


async def test_gpu_shares_are_consumable_capacity_claims(
    k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path
) -> None:
    """Two half-GPU groups on one DRA device: each pod's claim is allocated by the real scheduler as a
    share of that same device; a third half does not fit there."""
    k8s_cluster.ensure_gpu_device_class()
    names, selector = make_nodes(k8s_cluster, 1)
    api = k8s_cluster.client()
    claims = f"/apis/resource.k8s.io/v1/namespaces/{k8s_namespace}/resourceclaims"
    async with manager(sa, k8s_namespace, selector) as mgr:
        p = mgr.provider
        assert isinstance(p, KubernetesComputeResourceProvider)
        halves = [await mgr.allocate_compute_group(f"half-{i}", {"gpus": 0.5}) for i in range(2)]
        (index,) = set(halves[0].resources["gpu_indices"]) | set(halves[1].resources["gpu_indices"])
        results = []
        for g in halves:
            made = await p.run_pod(g, "busybox", ["sleep", "3600"])
            name = made["metadata"]["name"]
            assert made["spec"]["resourceClaims"] == [{"name": "gpus", "resourceClaimName": name}]
            env = {e["name"]: e["value"] for e in made["spec"]["containers"][0]["env"]}
            assert env["COMPUTEGROUPS_GPU_SHARE"] == "0.500" and "CUDA_VISIBLE_DEVICES" not in env
            api.wait_for(
                f"/api/v1/namespaces/{k8s_namespace}/pods/{name}",
                lambda o: o.get("status", {}).get("phase") == "Running",
                timeout=60,
                what="pod Running",
            )
            claim = api.get(f"{claims}/{name}")
            assert claim["spec"]["devices"]["requests"][0]["exactly"]["capacity"] == {
                "requests": {"memory": "40779Mi", "shares": "500"}
            }
            (result,) = claim["status"]["allocation"]["devices"]["results"]
            results.append(result)
        assert {r["device"] for r in results} == {f"gpu-{index}"}
        assert all(r["consumedCapacity"] == {"shares": "500", "memory": "40779Mi"} for r in results)
        share_ids = [r.get("shareID") for r in results]
        assert all(share_ids) and share_ids[0] != share_ids[1]

        # Another workload's third half of that device: the real scheduler finds no room for it.
        pick = f'device.attributes["gpu.nvidia.com"].uuid == "{gpu_uuid(names[0], index)}"'
        api.post(
            claims,
            {
                "apiVersion": "resource.k8s.io/v1",
                "kind": "ResourceClaim",
                "metadata": {"name": "third-half"},
                "spec": {
                    "devices": {
                        "requests": [
                            {
                                "name": "gpu",
                                "exactly": {
                                    "deviceClassName": "gpu.nvidia.com",
                                    "selectors": [{"cel": {"expression": pick}}],
                                    "capacity": {"requests": {"shares": "500", "memory": "40779Mi"}},
                                },
                            }
                        ]
                    }
                },
            },
        )
        api.post(
            f"/api/v1/namespaces/{k8s_namespace}/pods",
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "third-half"},
                "spec": {
                    "resourceClaims": [{"name": "gpu", "resourceClaimName": "third-half"}],
                    "containers": [{"name": "x", "image": "x", "resources": {"claims": [{"name": "gpu"}]}}],
                },
            },
        )
        pod = api.wait_for(
            f"/api/v1/namespaces/{k8s_namespace}/pods/third-half",
            lambda o: any(
                c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable"
                for c in (o.get("status") or {}).get("conditions") or []
            ),
            timeout=60,
            what="pod Unschedulable",
        )
        assert not pod["spec"].get("nodeName")
        assert not api.get(f"{claims}/third-half").get("status", {}).get("allocation")
        api.delete(f"/api/v1/namespaces/{k8s_namespace}/pods/third-half")
        api.delete(f"{claims}/third-half")

        # The manager puts a third half on another GPU; releasing the halves frees the device.
        third = await mgr.allocate_compute_group("half-2", {"gpus": 0.5})
        assert third.resources["gpu_indices"] != [index]
        for g in halves:
            assert await mgr.deallocate_compute_group(g.id)


async def test_run_pod_device_plugin_counts(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    names, selector = make_nodes(k8s_cluster, 1, dra=False)
    api = k8s_cluster.client()
    async with manager(sa, k8s_namespace, selector) as mgr:
        g = await mgr.allocate_compute_group("decode", {"gpus": 3})
        made = await mgr.provider.run_pod(g, "busybox", ["true"])  # type: ignore[attr-defined]
        c = made["spec"]["containers"][0]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "3"
        pod = api.wait_for(
            f"/api/v1/namespaces/{k8s_namespace}/pods/{made['metadata']['name']}",
            lambda o: o.get("spec", {}).get("nodeName"),
            timeout=60,
            what="pod scheduled",
        )
        assert pod["spec"]["nodeName"] == names[0]
        assert await mgr.deallocate_compute_group(g.id)


# -- permissions ------------------------------------------------------------------------
async def test_without_rights_a_clear_error(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    _, selector = make_nodes(k8s_cluster, 1, dra=False)
    nobody = k8s_cluster.service_account_kubeconfig(k8s_namespace, "nobody")
    with pytest.raises(ProviderError) as err:
        async with provider(nobody, k8s_namespace, selector) as p:
            await p.discover_resources()
    msg = str(err.value)
    assert "\n" not in msg and "forbidden: cannot list nodes" in msg, msg
    store = KubernetesStateStore(nobody, namespace=k8s_namespace)
    with pytest.raises(StateError) as serr:
        await store.open()
    assert "\n" not in str(serr.value) and "computegroupledgers.computegroups.dev" in str(serr.value)
    assert "forbidden: cannot get" in str(serr.value)


# -- two processes ------------------------------------------------------------------------
WORKER = """
import asyncio, json, os, sys
from computegroups import ComputeGroupManager, InsufficientResourcesError, KubernetesComputeResourceProvider

async def main(kubeconfig, ns, selector, who, sync):
    p = KubernetesComputeResourceProvider(kubeconfig, namespace=ns, node_selector=selector)
    got = []
    async with ComputeGroupManager(p, p.state_store()) as mgr:
        # Start allocating together, so the two really race.
        open(os.path.join(sync, who), "w").close()
        while not os.path.exists(os.path.join(sync, "go")):
            await asyncio.sleep(0.01)
        for n in range(40):
            try:
                g = await mgr.allocate_compute_group(f"{who}-{n}", {"gpus": 1 + n % 2})
            except InsufficientResourcesError:
                break
            got.append([g.node_id, g.resources["gpu_indices"]])
    print(json.dumps(got))

asyncio.run(main(*sys.argv[1:]))
"""


def race(worker: str, args: list[str], tmp_path: Path, *extra: str) -> list[dict[str, Any]]:
    """Two worker processes ("a" and "b") released together once both are set up; their last JSON lines."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", worker, *args, who, str(tmp_path), *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for who in ("a", "b")
    ]
    deadline = time.monotonic() + 120
    while not ((tmp_path / "a").exists() and (tmp_path / "b").exists()):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a worker did not start"
        time.sleep(0.02)
    (tmp_path / "go").touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_two_processes_never_share_a_gpu(
    k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path, tmp_path: Path
) -> None:
    _, selector = make_nodes(k8s_cluster, 4, dra=False)  # 32 GPUs: a race long enough for both to take part
    start = time.monotonic()
    outs = race(WORKER, [str(sa), k8s_namespace, selector], tmp_path)
    elapsed = time.monotonic() - start
    claimed = [(node, i) for got in outs for node, idx in got for i in idx]
    assert len(claimed) == len(set(claimed)) == 32, (outs, elapsed)
    assert outs[0] and outs[1]  # both processes got some
    # And from the custom resources afterwards:
    groups = live_groups(k8s_cluster, k8s_namespace)
    from_crs = [(g["spec"]["nodeName"], d[0]) for g in groups for d in g["spec"]["record"]["devices"]]
    assert sorted(from_crs) == sorted(claimed)
    ledger = k8s_cluster.client().get(
        f"/apis/computegroups.dev/v1alpha1/namespaces/{k8s_namespace}/computegroupledgers/default"
    )
    assert ledger["spec"]["revision"] == len(groups)


async def test_store_contract(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    from tests import conformance

    await conformance.check_store(lambda: KubernetesStateStore(sa, namespace=k8s_namespace, name="contract"))


async def test_crash_between_commit_and_group_objects(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    """A commit whose writer dies after the ledger update is seen whole by readers and finished by the next writer."""
    from tests.conformance import _record

    store = KubernetesStateStore(sa, namespace=k8s_namespace, name="crash")
    await store.open()
    rev = (await store.changes_since(-1)).revision

    async def die(*args: Any) -> None:
        raise asyncio.CancelledError  # the process "dies" right after the commit point

    store._write = die  # type: ignore[method-assign]
    await store.commit(rev, [_record("g1"), _record("g2", index=1)])
    await asyncio.sleep(0.1)  # the group-object writer dies at its first write (or at close)
    with contextlib.suppress(asyncio.CancelledError):
        await store.close()
    api = k8s_cluster.client()
    assert not [
        i
        for i in api.get(f"/apis/computegroups.dev/v1alpha1/namespaces/{k8s_namespace}/computegroups")["items"]
        if i["metadata"]["labels"].get("computegroups.dev/store") == "crash"
    ]
    other = KubernetesStateStore(sa, namespace=k8s_namespace, name="crash")
    await other.open()
    try:
        seen = await other.changes_since(rev)
        assert seen.revision == rev + 1 and sorted(r.id for r in seen.upserts) == ["g1", "g2"]
        assert (await other.changes_since(-1)).upserts and other.client.requests["list"] == 1
        await other.commit(rev + 1, [], ["g1"])
        await other.flush()

        def objects() -> list[tuple[str, bool]]:
            return sorted(
                (i["spec"]["id"], bool(i["spec"].get("deleted")))
                for i in api.get(f"/apis/computegroups.dev/v1alpha1/namespaces/{k8s_namespace}/computegroups")["items"]
                if i["metadata"]["labels"].get("computegroups.dev/store") == "crash"
            )

        assert objects() == [("g1", True)]  # the dead writer's change set is still only in the ledger's log
        r = rev + 2
        for n in range(MIRROR_LAG):  # until it is old enough for the next writer to finish it
            r = await other.commit(r, [_record(f"h{n}", index=2 + n % 6)])
        await other.flush()
        assert ("g2", False) in objects() and ("g1", True) in objects()
        fresh = await other.changes_since(-1)
        assert (
            fresh.revision == r and "g2" in {x.id for x in fresh.upserts} and "g1" not in {x.id for x in fresh.upserts}
        )
    finally:
        await other.close()
