"""One rule set: existing groups (pre-carved, reserved, waiting) are judged like fresh placements.

A regression test for each way the rules used to disagree, then a property: an existing group is
handed out exactly when the placement pipeline, limited to its devices, accepts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from computegroups import (
    ComputeGroupManager,
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    SimulatedComputeResourceProvider,
)
from computegroups.decide import context, resolve_pool
from computegroups.errors import PreemptionPendingError
from computegroups.model import MILLI, Constraints, Requirements
from computegroups.placement.cluster import Cluster
from computegroups.placement.engine import place

MIG_NODE = {"id": "mig", "preset": "hgx-a100", "mig": {0: ["1g.10gb", "1g.10gb", "3g.40gb"]}}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def manager(*nodes: dict[str, Any], state: str | Path = ":memory:", **kw: Any) -> ComputeGroupManager:
    return ComputeGroupManager(SimulatedComputeResourceProvider.from_spec({"nodes": list(nodes)}), state, **kw)


# -- MIG devices go only to requests naming their profile, pre-carved or not ---------------
async def test_a_plain_request_is_never_handed_a_carved_mig_device() -> None:
    async with manager(MIG_NODE) as mgr:
        carved = await mgr.create_compute_group({"mig_profile": "1g.10gb"}, "mig")
        plain = await mgr.allocate_compute_group("plain", {"gpus": 1})
        assert plain.id != carved.id
        assert not plain.env["CUDA_VISIBLE_DEVICES"].startswith("MIG-")
        assert (await mgr.get_compute_group(carved.id)).allocation_state == "free"


async def test_a_mig_request_is_never_handed_a_carved_whole_gpu() -> None:
    async with manager(MIG_NODE) as mgr:
        whole = await mgr.create_compute_group({"gpus": 1}, "mig")
        with pytest.raises(InsufficientResourcesError, match=r"1g\.5gb"):
            await mgr.allocate_compute_group("embed", {"mig_profile": "1g.5gb"})
        assert (await mgr.get_compute_group(whole.id)).allocation_state == "free"
        slice_ = await mgr.allocate_compute_group("embed", {"mig_profile": "1g.10gb"})
        assert slice_.env["CUDA_VISIBLE_DEVICES"].startswith("MIG-")


# -- affinity rules hold for pre-carved groups ------------------------------------------
async def test_required_anti_affinity_is_not_broken_by_a_carved_group() -> None:
    async with manager({"id": "a", "preset": "dgx-h100"}, {"id": "b", "preset": "dgx-h100"}) as mgr:
        await mgr.allocate_compute_group("decode", {"gpus": 1}, {"node_id": "a"})
        carved = await mgr.create_compute_group({"gpus": 1}, "a")
        g = await mgr.allocate_compute_group("x", {"gpus": 1}, {"anti_affinity": ["decode"]})
        assert g.id != carved.id and g.node_id == "b"


async def test_required_affinity_is_not_broken_by_a_carved_group() -> None:
    async with manager({"id": "a", "preset": "dgx-h100"}, {"id": "b", "preset": "dgx-h100"}) as mgr:
        await mgr.allocate_compute_group("decode", {"gpus": 1}, {"node_id": "a"})
        carved = await mgr.create_compute_group({"gpus": 1}, "b")
        g = await mgr.allocate_compute_group("prefill", {"gpus": 1}, {"affinity": ["decode"]})
        assert g.id != carved.id and g.node_id == "a"
        # ...and a carved group that meets the rule is handed out first.
        near = await mgr.create_compute_group({"gpus": 1}, "a")
        assert (await mgr.allocate_compute_group("prefill", {"gpus": 1}, {"affinity": ["decode"]})).id == near.id


# -- a reservation is one node; a gang request is not served by it -------------------------
async def test_a_gang_request_is_not_served_by_a_one_node_reservation() -> None:
    async with manager({"id": "dgx", "count": 3, "preset": "dgx-h100"}) as mgr:
        r = await mgr.reserve_compute_group("x", {"gpus": 2}, ttl_seconds=60)
        gang = await mgr.allocate_compute_group("x", {"gpus": 2, "nodes": 2})
        assert gang.id != r.id and len(set(gang.resources["node_ids"])) == 2
        with pytest.raises(ConflictError, match="one node"):
            await mgr.allocate_compute_group("x", {"gpus": 2, "nodes": 2}, {"reservation_id": r.id})
        assert (await mgr.get_compute_group(r.id)).allocation_state == "reserved"


# -- reads tell the truth about reservations past their deadline ---------------------------
async def test_an_expired_reservation_is_not_reported_as_held_by_any_reader(tmp_path: Path) -> None:
    clock = Clock()
    db = tmp_path / "state.db"
    spec = {"id": "dgx", "preset": "dgx-h100"}
    async with manager(spec, state=db, clock=clock) as mgr, manager(spec, state=db, clock=clock) as other:
        r = await mgr.reserve_compute_group("decode", {"gpus": 4}, ttl_seconds=10)
        assert (await other.get_allocation_summary())["reserved_gpus"] == 4
        clock.now += 11
        assert mgr.held_by("decode") == []  # synchronous, no I/O: the deadline alone says so
        s = await other.get_allocation_summary()  # another manager, as another process would be
        assert (s["reserved_gpus"], s["free_gpus"]) == (0, 8)
        assert [g.id for g in await other.list_compute_groups()] == []
        assert (await other.get_compute_group(r.id)).allocation_state == "released"
        assert await mgr.get_component_allocations("decode") == []
        assert [g.id for g in await mgr.list_compute_groups({"state": "reserved"})] == []


# -- a request id names one allocation ------------------------------------------------------
async def test_a_request_id_of_a_released_group_is_refused_not_answered_with_it() -> None:
    async with manager({"id": "dgx", "preset": "dgx-h100"}) as mgr:
        g = await mgr.allocate_compute_group("decode", {"gpus": 2}, {"request_id": "r1"})
        assert (await mgr.allocate_compute_group("decode", {"gpus": 2}, {"request_id": "r1"})).id == g.id
        await mgr.deallocate_compute_group(g.id)
        with pytest.raises(ConflictError, match=f"{g.id}.*released"):
            await mgr.allocate_compute_group("decode", {"gpus": 2}, {"request_id": "r1"})
        assert (await mgr.get_allocation_summary())["allocated_gpus"] == 0


# -- a refusal names the rule that refused --------------------------------------------------
async def test_required_affinity_to_an_absent_component_names_the_rule() -> None:
    async with manager({"id": "dgx", "count": 2, "preset": "dgx-h100"}) as mgr:
        with pytest.raises(InsufficientResourcesError, match=r"2 node\(s\): not near decode \(node\)") as err:
            await mgr.allocate_compute_group("prefill", {"gpus": 1}, {"affinity": ["decode"]})
        assert "wholly free" not in str(err.value)


# -- pre-carving validates like allocating ---------------------------------------------------
async def test_create_refuses_a_gang_and_an_unknown_pool() -> None:
    async with manager({"id": "dgx", "count": 2, "preset": "dgx-h100"}) as mgr:
        with pytest.raises(InvalidRequestError, match=r"requirements\.nodes"):
            await mgr.create_compute_group({"gpus": 1, "nodes": 2})
        with pytest.raises(InvalidRequestError, match=r"constraints\.pool: 'nowhere' is not a pool"):
            await mgr.create_compute_group({"gpus": 1, "pool": "nowhere"})
        assert await mgr.list_compute_groups() == []


async def test_create_places_in_the_pool_it_names() -> None:
    pools = [{"name": "serving", "nodes": ["dgx-1"]}]
    async with manager({"id": "dgx", "count": 2, "preset": "dgx-h100"}, pools=pools) as mgr:
        g = await mgr.create_compute_group({"gpus": 8, "pool": "serving"})
        assert g.node_id == "dgx-1"
        with pytest.raises(InsufficientResourcesError):
            await mgr.create_compute_group({"gpus": 1, "pool": "serving"})


# -- the property: existing groups are judged by the pipeline ---------------------------------
SHAPES = st.sampled_from([{"gpus": 1}, {"gpus": 2}, {"gpus": 0.5}, {"gpus": 2, "cpus": 4}])
RULES = st.sampled_from(
    [
        {},
        {"nvlink": True},
        {"node_id": "pairs-0"},
        {"labels": {"rack": "r1"}},
        {"affinity": ["decode"]},
        {"anti_affinity": ["decode"]},
        {"pool": "left"},
    ]
)
NODES = [
    {"id": "pairs", "count": 2, "preset": "pcie-a6000-nvlink-pairs", "labels": {"rack": "r1"}},
    {"id": "cpu", "preset": "cpu-only"},
    {"id": "dgx", "preset": "dgx-h100", "labels": {"rack": "r2"}},
]
POOLS = [{"name": "left", "nodes": ["pairs-0", "dgx"]}]


def pipeline_accepts(
    mgr: ComputeGroupManager,
    gid: str,
    req: Requirements,
    cons: Constraints,
    *,
    priority: int = 0,
    nominee: str | None = None,
) -> bool:
    """The oracle: ``place()`` on a copy of the cluster where the group is gone and, on its node, only
    its devices are usable; accepted when it then picks exactly the group's devices."""
    ledger = mgr.ledger
    record = ledger.records[gid]
    cluster = Cluster(mgr.inventory.nodes)
    for r in ledger.records.values():
        if r.id != gid:
            cluster.apply(r)
    mine = {d.index for d in record.devices}
    for i in range(len(ledger.specs[record.node_id].gpus)):
        if i not in mine:
            cluster.set_unhealthy(record.node_id, i, True)
    for node_id, index in ledger.unhealthy:
        cluster.set_unhealthy(node_id, index, True)
    pinned = Constraints.parse({**cons.to_dict(), "node_id": record.node_id})
    if cons.node_id is not None and cons.node_id != record.node_id:
        return False
    try:
        d = place(cluster, req, pinned, ctx=context(ledger, pinned, priority, nominee=nominee))
    except InsufficientResourcesError:
        return False
    held = record.devices
    if req.share_milli:
        return len(held) == 1 and held[0].share_milli == req.share_milli and d.devices[0].index == held[0].index
    same_size = len(held) == req.whole_gpus and all(x.share_milli == MILLI for x in held)
    return same_size and record.cpus_milli >= req.cpus_milli and record.memory_mib >= req.memory_mib


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    how=st.sampled_from(["carve", "reserve"]),
    existing=st.lists(st.tuples(SHAPES, st.sampled_from(["pairs-0", "pairs-1", "dgx", "cpu"])), min_size=1, max_size=4),
    decode_on=st.sampled_from(["pairs-0", "pairs-1", "dgx"]),
    shape=SHAPES,
    rules=RULES,
)
def test_an_existing_group_is_handed_out_exactly_when_the_pipeline_accepts_it(
    how: str, existing: list[tuple[dict[str, Any], str]], decode_on: str, shape: dict[str, Any], rules: dict[str, Any]
) -> None:
    """Pre-carved groups (matched for anyone) and reservations (claimed by their component)."""

    async def scenario() -> None:
        async with manager(*NODES, pools=POOLS) as mgr:
            await mgr.allocate_compute_group("decode", {"gpus": 1}, {"node_id": decode_on})
            made: list[str] = []
            for resources, node in existing:
                with contextlib.suppress(InsufficientResourcesError):
                    if how == "carve":
                        made.append((await mgr.create_compute_group(resources, node)).id)
                    else:
                        made.append((await mgr.reserve_compute_group("x", resources, {"node_id": node}, 600)).id)
            req = Requirements.parse(shape)
            cons = resolve_pool(mgr.pools, req, Constraints.parse(rules))
            accepted = [gid for gid in made if pipeline_accepts(mgr, gid, req, cons)]
            try:
                g = await mgr.allocate_compute_group("x", shape, rules)
            except InsufficientResourcesError:
                assert not accepted
                return
            if accepted:
                assert g.id == accepted[0]  # the first acceptable one, in the order they were made
            else:
                assert g.id not in made

    asyncio.run(scenario())


PROMOTION_RULES = st.sampled_from([{}, {"nvlink": True}, {"anti_affinity": ["decode"]}, {"labels": {"rack": "r1"}}])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    shape=st.sampled_from([{"gpus": 2}, {"gpus": 4}, {"gpus": 8}]),
    rules=PROMOTION_RULES,
    disturb=st.sampled_from(["none", "decode-beside", "gpu-fails"]),
)
def test_a_waiting_preemptor_is_promoted_exactly_when_the_pipeline_accepts_its_devices(
    shape: dict[str, Any], rules: dict[str, Any], disturb: str
) -> None:
    """Preemption picks the devices; when the last victim goes, the same rules judge them again."""

    async def scenario() -> None:
        provider = SimulatedComputeResourceProvider.from_spec(
            {"nodes": [{"id": "dgx", "count": 2, "preset": "dgx-h100", "labels": {"rack": "r1"}}]}
        )
        async with ComputeGroupManager(provider, ":memory:") as mgr:
            victims = [
                (await mgr.allocate_compute_group("batch", {"gpus": 2}, {"priority": 1, "preemptible": True})).id
                for _ in range(8)
            ]
            try:
                await mgr.allocate_compute_group("x", shape, {**rules, "priority": 10, "request_id": "p"})
            except PreemptionPendingError as exc:
                waiter, drained = exc.group_id, exc.victims
            else:  # pragma: no cover - the fleet is full
                raise AssertionError("the preemptor was placed without preempting")
            node = mgr.ledger.records[waiter].node_id
            if disturb == "decode-beside":
                await mgr.allocate_compute_group("decode", {"cpus": 1}, {"node_id": node})
            elif disturb == "gpu-fails":
                provider.set_health(node, mgr.ledger.records[waiter].devices[0].index, False, "Xid 79")
                await mgr.refresh_health()
            for vid in drained:
                await mgr.deallocate_compute_group(vid)
            record = mgr.ledger.records[waiter]
            req = Requirements.parse(dict(record.requirements))
            cons = Constraints.parse(dict(record.constraints))
            accepted = pipeline_accepts(mgr, waiter, req, cons, priority=record.priority, nominee=waiter)
            assert (record.state.value == "allocated") == accepted, (disturb, rules, record.state)
            assert accepted == (disturb == "none" or (disturb == "decode-beside" and "anti_affinity" not in rules))
            assert set(drained) <= set(victims)

    asyncio.run(scenario())
