"""Kubernetes discovery rules on plain API objects: devices others hold are taken, never renumbered.

The same rules run against the real control plane in tests/k8s; here each rule is pinned on dicts.
"""

from __future__ import annotations

import copy
from typing import Any

from computegroups.decide import Ledger
from computegroups.model import MILLI, AllocationState, DeviceShare, GroupRecord
from computegroups.providers.k8s.discovery import build_node_specs, node_view, pick_taken


def _node(name: str, gpus: int = 8) -> dict[str, Any]:
    alloc = {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": str(gpus)}
    return {"metadata": {"name": name, "labels": {}}, "status": {"allocatable": alloc}}


def _pod(name: str, node: str, gpus: int, ns: str = "other", labels: dict[str, str] | None = None) -> dict[str, Any]:
    container = {"name": "c", "resources": {"limits": {"nvidia.com/gpu": str(gpus)}}}
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "spec": {"nodeName": node, "containers": [container]},
        "status": {"phase": "Running"},
    }


def _slice(node: str, n: int) -> dict[str, Any]:
    devices = [
        {"name": f"gpu-{i}", "attributes": {"index": {"int": i}, "uuid": {"string": f"GPU-{node}-{i}"}}}
        for i in range(n)
    ]
    return {"spec": {"driver": "gpu.nvidia.com", "nodeName": node, "pool": {"name": node}, "devices": devices}}


def _claim(name: str, ns: str, node: str, device: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    result = {"driver": "gpu.nvidia.com", "pool": node, "device": device}
    return {
        "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
        "status": {"allocation": {"devices": {"results": [result]}}},
    }


def test_pick_taken_avoids_our_slots_and_stays_put() -> None:
    assert pick_taken(8, 3) == [5, 6, 7]
    assert pick_taken(8, 3, held={3, 4, 5}) == [2, 6, 7]
    assert pick_taken(8, 3, held={3, 4, 5}, previous=[0, 7]) == [0, 6, 7]  # last time's marks stay
    assert pick_taken(8, 2, held={6, 7}, previous=[6, 7]) == [4, 5]  # ours now: the marks move off them
    assert pick_taken(4, 3, held={0, 1, 2}) == [1, 2, 3]  # others hold more than we left: ours too
    assert pick_taken(4, 9) == [0, 1, 2, 3] and pick_taken(4, 0) == []


def test_device_plugin_node_keeps_every_slot() -> None:
    found = build_node_specs([_node("a")], [_pod("p", "a", 3)], held={"a": [3, 4, 5]})
    (spec,) = found.nodes
    assert [g.index for g in spec.gpus] == list(range(8))
    assert [g.uuid for g in spec.gpus] == [f"k8s-a-gpu{i}" for i in range(8)]
    assert sorted(found.taken) == [("a", 2), ("a", 6), ("a", 7)]
    assert found.taken[("a", 2)] == "taken: 3 of 8 GPUs are requested by other pods (other/p)"


def test_dra_node_keeps_every_device_and_marks_foreign_claims() -> None:
    ours = {"app.kubernetes.io/managed-by": "computegroups", "computegroups.dev/store": "default"}
    claims = [
        _claim("theirs", "other", "a", "gpu-0"),
        _claim("mine", "cg", "a", "gpu-1", ours),
        _claim("another-store", "cg", "a", "gpu-2", {**ours, "computegroups.dev/store": "blue"}),
    ]
    found = build_node_specs([_node("a")], slices=[_slice("a", 4)], claims=claims, store=("cg", "default"))
    (spec,) = found.nodes
    assert [(g.index, g.uuid) for g in spec.gpus] == [(i, f"GPU-a-{i}") for i in range(4)]
    assert sorted(found.taken) == [("a", 0), ("a", 2)]  # our own claim is not another workload's
    assert "ResourceClaim other/theirs" in found.taken[("a", 0)]


def test_taken_devices_are_not_allocatable_nor_free() -> None:
    found = build_node_specs([_node("a", 4)], [_pod("p", "a", 1)])
    ledger = Ledger(found.nodes, (), (), found.taken)
    (st,) = ledger.cluster.nodes
    assert st.free_count == 3 and st.gpus_free() == 3.0 and not st.free_mask >> 3 & 1
    rec = GroupRecord(
        id="g",
        node_id="a",
        state=AllocationState.ALLOCATED,
        component="x",
        devices=(DeviceShare(0, "k8s-a-gpu0", MILLI, 0),),
    )
    ledger.reload(1, [rec])  # marks outlive a full reload of the records
    assert ledger.cluster.nodes[0].free_count == 2 and ("a", 3) in ledger.unhealthy


def test_a_node_heartbeat_changes_nothing_discovery_reads() -> None:
    """``node_view``: the node informer signals a change only when discovery would see one."""
    node = _node("a")
    ready = {"type": "Ready", "status": "True", "reason": "KubeletReady", "lastHeartbeatTime": "2026-12-02T10:00:00Z"}
    node["status"]["conditions"] = [ready]
    beat = copy.deepcopy(node)
    beat["status"]["conditions"][0]["lastHeartbeatTime"] = "2026-12-02T10:00:20Z"
    beat["metadata"]["resourceVersion"] = "2"
    assert node_view(beat) == node_view(node)
    for change in (
        lambda n: n["status"]["conditions"][0].update(status="False", reason="KubeletNotReady"),
        lambda n: n["metadata"]["labels"].update({"nvidia.com/gpu.clique": "c1"}),
        lambda n: n.update(spec={"unschedulable": True}),
        lambda n: n["status"]["allocatable"].update({"nvidia.com/gpu": "7"}),
    ):
        moved = copy.deepcopy(node)
        change(moved)
        assert node_view(moved) != node_view(node)
