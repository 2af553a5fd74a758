"""Cordoning and draining whole nodes: committed like any change, seen by every manager, kept across restarts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from computegroups import (
    ComputeGroupManager,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
    SimulatedComputeResourceProvider,
)
from computegroups.state.memory import MemoryStateStore

SPEC = {
    "nodes": [
        {"id": "a", "gpus": 4, "gpu": {"model": "GPU", "memory_mib": 16384}, "cpus": 32},
        {"id": "b", "gpus": 4, "gpu": {"model": "GPU", "memory_mib": 16384}, "cpus": 32},
    ]
}


def _manager(state: object) -> ComputeGroupManager:
    return ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), state)  # type: ignore[arg-type]


async def test_a_cordoned_node_takes_nothing_new_and_its_groups_keep_their_owners(tmp_path: Path) -> None:
    async with _manager(tmp_path / "s.db") as mgr:
        held = await mgr.allocate_compute_group("decode", {"gpus": 2}, {"node_id": "a"})
        assert await mgr.cordon_node("a", "kernel upgrade") is True
        assert await mgr.cordon_node("a", "kernel upgrade") is False
        node = {n.id: n for n in await mgr.list_compute_nodes()}
        assert node["a"].cordoned == "kernel upgrade" and node["a"].resources["cordoned"] == "kernel upgrade"
        assert node["b"].cordoned is None
        with pytest.raises(InsufficientResourcesError) as refused:
            await mgr.allocate_compute_group("decode", {"gpus": 1}, {"node_id": "a"})
        assert refused.value.reasons["node is cordoned"] == 1
        others = [await mgr.allocate_compute_group("w", {"gpus": 1}) for _ in range(4)]
        assert {g.node_id for g in others} == {"b"}  # binpack would have chosen a's free GPUs first
        assert (await mgr.get_compute_group(held.id)).allocation_state == "allocated"
        assert (await mgr.get_allocation_summary())["cordoned_nodes"] == 1
        assert await mgr.uncordon_node("a") is True
        assert await mgr.uncordon_node("a") is False
        assert (await mgr.allocate_compute_group("decode", {"gpus": 2})).node_id == "a"
        kinds = [(e.kind, e.node_id, e.detail) for e in mgr.recent_events if e.kind.endswith("cordoned")]
        assert kinds == [("cordoned", "a", "kernel upgrade"), ("uncordoned", "a", "was: kernel upgrade")]


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_another_manager_sees_a_cordon_at_its_next_call(tmp_path: Path, kind: str) -> None:
    state: object = tmp_path / "s.db" if kind == "sqlite" else MemoryStateStore()
    async with _manager(state) as one, _manager(state) as two:
        await one.cordon_node("a")
        with pytest.raises(InsufficientResourcesError):
            await two.allocate_compute_group("x", {"gpus": 1}, {"node_id": "a"})
        assert {n.id: n.cordoned for n in await two.list_compute_nodes()} == {"a": "cordoned by an operator", "b": None}
        assert await two.uncordon_node("a") is True
        assert (await one.allocate_compute_group("x", {"gpus": 1}, {"node_id": "a"})).node_id == "a"


async def test_a_cordon_survives_a_restart_and_a_full_reload(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with _manager(path) as mgr:
        await mgr.cordon_node("b", "bad fan")
        await mgr.cordon_node("a", "gone")
        await mgr.uncordon_node("a")
    async with _manager(path) as mgr:  # a new manager reads everything (a full read)
        assert {n.id: n.cordoned for n in await mgr.list_compute_nodes()} == {"a": None, "b": "bad fan"}
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("x", {"gpus": 1}, {"node_id": "b"})


async def test_draining_a_node_drains_every_group_on_it_in_one_change(tmp_path: Path) -> None:
    async with _manager(tmp_path / "s.db") as mgr:
        gang = await mgr.allocate_compute_group("train", {"gpus": 1, "nodes": 2})
        one = await mgr.allocate_compute_group("decode", {"gpus": 1}, {"node_id": "a"})
        held = await mgr.reserve_compute_group("prefill", {"gpus": 1}, {"node_id": "a"})
        carved = await mgr.create_compute_group({"gpus": 1}, "a")
        elsewhere = await mgr.allocate_compute_group("router", {"gpus": 1}, {"node_id": "b"})
        revision = mgr.revision
        drained = await mgr.drain_node("a", "replace a GPU")
        assert mgr.revision == revision + 1  # the cordon and every drain in one commit
        assert sorted(g.id for g in drained) == sorted([gang.id, one.id, held.id, carved.id])
        states = {g.id: (g.allocation_state, g.component) for g in await mgr.list_compute_groups()}
        assert states[gang.id] == ("draining", "train") and states[one.id] == ("draining", "decode")
        assert states[held.id] == ("draining", "prefill") and states[carved.id] == ("draining", None)
        assert states[elsewhere.id] == ("allocated", "router")  # the multi-node group drained whole, b's own not
        assert {n.id: n.cordoned for n in await mgr.list_compute_nodes()}["a"] == "replace a GPU"
        assert await mgr.drain_node("a", "replace a GPU") == []  # nothing left to drain
        assert await mgr.deallocate_compute_group(one.id) is True  # owners release when they are ready
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("decode", {"gpus": 1}, {"node_id": "a"})


@pytest.mark.parametrize(
    ("call", "args", "error", "key"),
    [
        ("cordon_node", ("nowhere",), NotFoundError, None),
        ("drain_node", ("nowhere",), NotFoundError, None),
        ("uncordon_node", ("nowhere",), NotFoundError, None),
        ("cordon_node", (7,), InvalidRequestError, "node_id"),
        ("cordon_node", ("a", ""), InvalidRequestError, "reason"),
        ("drain_node", ("a", "line\nbreak"), InvalidRequestError, "reason"),
        ("uncordon_node", (None,), InvalidRequestError, "node_id"),
    ],
)
async def test_bad_node_requests_are_refused_and_change_nothing(
    tmp_path: Path, call: str, args: tuple[object, ...], error: type[Exception], key: str | None
) -> None:
    async with _manager(tmp_path / "s.db") as mgr:
        g = await mgr.allocate_compute_group("x", {"gpus": 1}, {"node_id": "a"})
        revision = mgr.revision
        with pytest.raises(error) as refused:
            await getattr(mgr, call)(*args)
        assert getattr(refused.value, "key", None) == key
        assert mgr.revision == revision and (await mgr.get_compute_group(g.id)).allocation_state == "allocated"
        assert all(n.cordoned is None for n in await mgr.list_compute_nodes())


def _cli(spec: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "computegroups", "--spec", str(spec), "--state", str(state), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_cordon_uncordon_and_drain_from_the_command_line(tmp_path: Path) -> None:
    spec, state = tmp_path / "cluster.json", tmp_path / "s.db"
    spec.write_text(json.dumps(SPEC))
    made = json.loads(_cli(spec, state, "--json", "allocate", "decode", "--gpus", "1", "--node", "a").stdout)
    assert _cli(spec, state, "cordon", "a", "--reason", "new driver").stdout == "node/a cordoned\n"
    assert _cli(spec, state, "cordon", "a").stdout == "node/a already cordoned\n"
    refused = _cli(spec, state, "allocate", "x", "--gpus", "1", "--node", "a")
    assert refused.returncode == 3 and "node is cordoned" in refused.stderr
    table = _cli(spec, state, "get", "nodes").stdout.splitlines()
    assert table[0].split()[:2] == ["NAME", "STATUS"]
    assert [line.split()[:2] for line in table[1:]] == [["a", "Ready,SchedulingDisabled"], ["b", "Ready"]]
    nodes = json.loads(_cli(spec, state, "get", "nodes", "-o", "json").stdout)
    assert {n["id"]: n["resources"]["cordoned"] for n in nodes} == {"a": "new driver", "b": None}
    assert "Unschedulable:  true (new driver)" in _cli(spec, state, "describe", "node", "a").stdout
    assert [r["cordoned"] for r in json.loads(_cli(spec, state, "--json", "map").stdout)] == ["new driver", None]
    drained = json.loads(_cli(spec, state, "--json", "drain", "--node", "a").stdout)
    assert drained == {"node_id": "a", "cordoned": True, "drained": [made["id"]]}
    shown = json.loads(_cli(spec, state, "get", "groups", made["id"], "-o", "json").stdout)
    assert shown[0]["allocation_state"] == "draining"
    assert _cli(spec, state, "uncordon", "a").stdout == "node/a uncordoned\n"
    kinds = [e["kind"] for e in map(json.loads, _cli(spec, state, "events", "-o", "json").stdout.splitlines())]
    assert kinds == ["allocated", "cordoned", "refused", "drained", "uncordoned"]


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (("drain",), "drain: give a GROUP_ID or --node NODE"),
        (("drain", "cg-1", "--node", "a"), "drain: give a GROUP_ID or --node NODE"),
        (("drain", "cg-1", "--reason", "x"), "--reason: only with --node"),
        (("drain", "--node", "a b"), "--node:"),
        (("cordon", "a b"), "NODE:"),
        (("cordon", "a", "--reason", ""), "--reason:"),
        (("uncordon", "nowhere"), "node 'nowhere' is not in this cluster"),
    ],
)
def test_bad_node_commands_exit_2_with_one_line(tmp_path: Path, args: tuple[str, ...], flag: str) -> None:
    spec, state = tmp_path / "cluster.json", tmp_path / "s.db"
    spec.write_text(json.dumps(SPEC))
    out = _cli(spec, state, *args)
    assert out.returncode == 2 and out.stderr.startswith(f"computegroups: {flag}"), out.stderr
    assert len(out.stderr.splitlines()) == 1 and not out.stdout


async def test_the_metrics_show_cordoned_nodes(tmp_path: Path) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from computegroups.service.metrics import Metrics

    async with _manager(tmp_path / "s.db") as mgr:
        metrics = Metrics(mgr)
        await mgr.cordon_node("b", "bad DIMM")

        async def cordoned() -> dict[tuple[str, str], float]:
            text = (await metrics.render()).decode()
            family = next(f for f in text_string_to_metric_families(text) if f.name == "computegroups_node_cordoned")
            return {(s.labels["node"], s.labels["reason"]): s.value for s in family.samples}

        assert await cordoned() == {("b", "bad DIMM"): 1.0}
        await mgr.uncordon_node("b")
        assert await cordoned() == {}
