"""Each filter, pre-filter and score plugin called directly, as tables: no manager, no engine."""

from __future__ import annotations

from typing import Any

import pytest

from computegroups.model import AffinityRule, AllocationState, Constraints, GroupRecord, Requirements, Scope
from computegroups.placement.cluster import Cluster
from computegroups.placement.engine import DEFAULT_FILTERS, pick_devices, prefilter
from computegroups.placement.existing import admits, holds
from computegroups.placement.plugins import (
    EMPTY_CONTEXT,
    UNRESOLVABLE,
    UNSCHEDULABLE,
    AffinityFilter,
    BinPackScore,
    CapacityFilter,
    Context,
    CordonFilter,
    NodeSelectorFilter,
    Pick,
    PreferredAffinityScore,
    Reason,
    SpreadScore,
    TopologyScore,
)
from computegroups.providers.simulated import nodes_from_spec

SPEC = {
    "nodes": [
        {"id": "h100", "preset": "dgx-h100", "labels": {"rack": "r1"}},
        {"id": "pairs", "preset": "pcie-a6000-nvlink-pairs", "cpus": 16, "memory_mib": 65536},
        {"id": "mig", "preset": "hgx-a100", "mig": {0: ["1g.10gb", "1g.10gb"]}},
        {"id": "cpu", "preset": "cpu-only"},
    ]
}


def cluster_with(*held: tuple[str, tuple[int, ...]]) -> Cluster:
    """The four nodes above, with whole GPUs ``held`` on some of them."""
    cluster = Cluster(nodes_from_spec(SPEC))
    for n, (node_id, indices) in enumerate(held):
        node = cluster.by_id[node_id]
        cluster.apply(GroupRecord(f"g{n}", node_id, AllocationState.ALLOCATED, "c", node.whole_gpus(indices)))
    return cluster


def text(reason: Reason | None) -> str | None:
    return None if reason is None else reason.text()


def code(reason: Reason | None) -> int | None:
    return None if reason is None else reason.code


# -- filters ----------------------------------------------------------------------------
NEAR = Context(near=(frozenset({"h100"}),), away=(frozenset({"pairs"}),))


@pytest.mark.parametrize(
    ("plugin", "node", "req", "cons", "ctx", "expected", "expected_code"),
    [
        (NodeSelectorFilter(), "h100", {"gpus": 1}, {}, EMPTY_CONTEXT, None, None),
        (
            NodeSelectorFilter(),
            "h100",
            {"gpus": 1},
            {"node_id": "pairs"},
            EMPTY_CONTEXT,
            "not node pairs",
            UNRESOLVABLE,
        ),
        (
            NodeSelectorFilter(),
            "h100",
            {"gpus": 1},
            {"labels": {"rack": "r2"}},
            EMPTY_CONTEXT,
            "label rack=r2 does not match",
            UNRESOLVABLE,
        ),
        (
            NodeSelectorFilter(),
            "h100",
            {"gpus": 1},
            {"pool": "p"},
            Context(allowed=frozenset({"pairs"})),
            "not in pool p",
            UNRESOLVABLE,
        ),
        (
            NodeSelectorFilter(),
            "h100",
            {"gpus": 1},
            {},
            Context(excluded=frozenset({"h100"})),
            "holds another part of the gang",
            UNRESOLVABLE,
        ),
        (AffinityFilter(), "h100", {"gpus": 1}, {"affinity": ["decode"]}, NEAR, None, None),
        (
            AffinityFilter(),
            "pairs",
            {"gpus": 1},
            {"affinity": ["decode"]},
            NEAR,
            "not near decode (node)",
            UNRESOLVABLE,
        ),
        (
            AffinityFilter(),
            "pairs",
            {"gpus": 1},
            {"anti_affinity": ["decode"]},
            Context(away=(frozenset({"pairs"}),)),
            "shares a node with decode",
            UNRESOLVABLE,
        ),
        (
            AffinityFilter(),
            "pairs",
            {"gpus": 1},
            {"affinity": [{"component": "decode", "required": False}]},
            NEAR,
            None,
            None,
        ),
        (CapacityFilter(), "h100", {"gpus": 8}, {}, EMPTY_CONTEXT, "6 of 8 GPUs free, 8 requested", UNSCHEDULABLE),
        (CapacityFilter(), "h100", {"gpus": 9}, {}, EMPTY_CONTEXT, "6 of 8 GPUs free, 9 requested", UNRESOLVABLE),
        (CapacityFilter(), "pairs", {"cpus": 32}, {}, EMPTY_CONTEXT, "16 CPUs free, 32 requested", UNRESOLVABLE),
        (
            CapacityFilter(),
            "pairs",
            {"memory_mib": 65537},
            {},
            EMPTY_CONTEXT,
            "65536 MiB memory free, 65537 requested",
            UNRESOLVABLE,
        ),
        (CapacityFilter(), "cpu", {"gpus": 1}, {}, EMPTY_CONTEXT, "no GPUs", UNRESOLVABLE),
        (
            CapacityFilter(),
            "h100",
            {"gpus": 1, "gpu_model": "a6000"},
            {},
            EMPTY_CONTEXT,
            "GPU model NVIDIA H100 80GB HBM3 is not a6000",
            UNRESOLVABLE,
        ),
        (
            CapacityFilter(),
            "mig",
            {"mig_profile": "3g.40gb"},
            {},
            EMPTY_CONTEXT,
            "no MIG device of profile 3g.40gb",
            UNRESOLVABLE,
        ),
        (CapacityFilter(), "mig", {"mig_profile": "1g.10gb", "gpus": 2}, {}, EMPTY_CONTEXT, None, None),
        (
            CapacityFilter(),
            "h100",
            {"gpus": 1},
            {},
            Context(nominated={"h100": ((0b11111100, 5),)}, priority=1),
            "0 of 8 GPUs free, 1 requested",
            UNSCHEDULABLE,
        ),
        (
            CapacityFilter(),
            "h100",
            {"gpus": 1},
            {},
            Context(nominated={"h100": ((0b11111100, 5),)}, priority=9),
            None,
            None,
        ),
    ],
)
def test_filter_table(
    plugin: Any,
    node: str,
    req: dict[str, Any],
    cons: dict[str, Any],
    ctx: Context,
    expected: str | None,
    expected_code: int | None,
) -> None:
    cluster = cluster_with(("h100", (0, 1)))
    reason = plugin.filter(cluster.by_id[node], Requirements.parse(req), Constraints.parse(cons), ctx)
    assert (text(reason), code(reason)) == (expected, expected_code)


def test_cordon_filter_and_its_prefilter() -> None:
    cluster = cluster_with()
    f = CordonFilter()
    req, cons = Requirements(gpus=1), Constraints()
    assert f.prefilter(cluster, req, cons, EMPTY_CONTEXT).skip  # nothing cordoned: nothing to check
    cluster.set_cordoned("pairs", True)
    assert not f.prefilter(cluster, req, cons, EMPTY_CONTEXT).skip
    assert text(f.filter(cluster.by_id["pairs"], req, cons, EMPTY_CONTEXT)) == "node is cordoned"
    assert f.filter(cluster.by_id["h100"], req, cons, EMPTY_CONTEXT) is None


# -- pre-filters ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("cons", "ctx", "skip", "visit", "allowed", "barred"),
    [
        ({}, EMPTY_CONTEXT, {"node-selector", "affinity", "cordon"}, None, None, frozenset()),
        ({"nic": "any"}, EMPTY_CONTEXT, {"node-selector", "affinity", "cordon"}, None, None, frozenset()),
        ({"node_id": "pairs"}, EMPTY_CONTEXT, {"affinity", "cordon"}, frozenset({"pairs"}), None, frozenset()),
        (
            {"pool": "p"},
            Context(allowed=frozenset({"h100", "mig"})),
            {"affinity", "cordon"},
            None,
            frozenset({"h100", "mig"}),
            frozenset(),
        ),
        (
            {"affinity": ["d"]},
            Context(near=(frozenset({"mig"}),)),
            {"node-selector", "cordon"},
            frozenset({"mig"}),
            None,
            frozenset(),
        ),
        (
            {"anti_affinity": ["d"]},
            Context(away=(frozenset({"mig"}),)),
            {"node-selector", "cordon"},
            None,
            None,
            frozenset({"mig"}),
        ),
        (
            {"affinity": [{"component": "d", "required": False}]},
            Context(near=(frozenset({"mig"}),)),
            {"node-selector", "affinity", "cordon"},
            None,
            None,
            frozenset(),
        ),
        (
            {"node_id": "h100", "affinity": ["d"]},
            Context(near=(frozenset({"mig", "pairs"}),)),
            {"cordon"},
            frozenset({"h100"}),
            None,
            frozenset(),
        ),
    ],
)
def test_prefilter_table(
    cons: dict[str, Any],
    ctx: Context,
    skip: set[str],
    visit: frozenset[str] | None,
    allowed: frozenset[str] | None,
    barred: frozenset[str],
) -> None:
    cluster = cluster_with()
    screen = prefilter(DEFAULT_FILTERS, cluster, Requirements(gpus=1), Constraints.parse(cons), ctx)
    nic = set() if "nic" in cons else {"nic"}  # the NIC filter runs only for a request naming a NIC
    assert {f.name for f in DEFAULT_FILTERS} - {f.name for f in screen.filters} == skip | nic
    assert (screen.visit, screen.allowed, screen.barred) == (visit, allowed, barred)


def test_prefilter_names_why_nodes_outside_its_set_cannot_qualify() -> None:
    cluster = cluster_with()
    req = Requirements(gpus=1)
    missing = NodeSelectorFilter().prefilter(cluster, req, Constraints(node_id="nowhere"), EMPTY_CONTEXT)
    assert text(missing.outside) == "no node named nowhere"
    rule = Constraints(affinity=(AffinityRule("decode", Scope.NODE, True),))
    absent = AffinityFilter().prefilter(cluster, req, rule, Context(near=(frozenset(),)))
    assert absent.visit == frozenset() and text(absent.outside) == "not near decode (node)"


# -- device choice ----------------------------------------------------------------------------
def test_pick_devices_keeps_nvlink_pairs_whole_and_refuses_rather_than_relaxes() -> None:
    cluster = cluster_with(("pairs", (0,)))
    node = cluster.by_id["pairs"]
    one = pick_devices(node, Requirements(gpus=1), Constraints())
    assert isinstance(one, Pick) and [d.index for d in one.devices] == [1]  # the used GPU's partner
    cluster = cluster_with(("pairs", (0, 2, 4, 6)))
    refused = pick_devices(cluster.by_id["pairs"], Requirements(gpus=2), Constraints(nvlink=True))
    assert text(refused) == "no 2 free GPUs joined by NVLink" and code(refused) == UNSCHEDULABLE


# -- scores -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("plugin", "held", "req", "expected"),
    [
        (BinPackScore(), (), {"gpus": 2}, 25.0),
        (BinPackScore(), (0, 1, 2, 3), {"gpus": 2}, 75.0),
        (SpreadScore(), (), {"gpus": 2}, 75.0),
        (SpreadScore(), (0, 1, 2, 3), {"gpus": 2}, 25.0),
        (TopologyScore(), (), {"gpus": 2}, 100.0),  # an NVLink pair: the best this node offers
    ],
)
def test_score_table(plugin: Any, held: tuple[int, ...], req: dict[str, Any], expected: float) -> None:
    cluster = cluster_with(("pairs", held)) if held else cluster_with()
    node = cluster.by_id["pairs"]
    r = Requirements.parse(req)
    pick = pick_devices(node, r, Constraints())
    assert isinstance(pick, Pick)
    score = plugin.score(node, r, pick, EMPTY_CONTEXT)
    assert score == pytest.approx(expected)
    assert 0.0 <= score <= plugin.bound(node.free_count, node.gpu_count, r)


def test_topology_score_of_a_split_pair_is_below_100() -> None:
    cluster = cluster_with(("pairs", (1, 3, 5, 7)))  # every pair split: only PCIe/SYS links remain
    node = cluster.by_id["pairs"]
    pick = pick_devices(node, Requirements(gpus=2), Constraints())
    assert isinstance(pick, Pick)
    assert TopologyScore().score(node, Requirements(gpus=2), pick, EMPTY_CONTEXT) < 100.0


@pytest.mark.parametrize(
    ("ctx", "expected"),
    [
        (EMPTY_CONTEXT, 100.0),
        (Context(prefer_near=(frozenset({"pairs"}),)), 100.0),
        (Context(prefer_near=(frozenset({"h100"}),)), 0.0),
        (Context(prefer_near=(frozenset({"pairs"}),), prefer_away=(frozenset({"pairs"}),)), 50.0),
    ],
)
def test_preferred_affinity_score_table(ctx: Context, expected: float) -> None:
    node = cluster_with().by_id["pairs"]
    pick = Pick((), None, 0)
    assert PreferredAffinityScore().score(node, Requirements(gpus=1), pick, ctx) == expected


# -- existing groups ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("held", "req", "exact", "expected"),
    [
        ((0, 1), {"gpus": 2}, True, None),
        ((0, 1), {"gpus": 1}, True, "holds 2 GPU(s), not 1"),
        ((0, 1), {"gpus": 1}, False, None),
        ((0,), {"gpus": 2}, False, "holds 1 whole GPU(s), fewer than 2"),
        ((0, 1), {"gpus": 2, "cpus": 1}, False, "holds 0 CPUs, fewer than 1"),
    ],
)
def test_holds_table(held: tuple[int, ...], req: dict[str, Any], exact: bool, expected: str | None) -> None:
    node = cluster_with().by_id["pairs"]
    record = GroupRecord("g", "pairs", AllocationState.FREE, None, node.whole_gpus(held), carved=True)
    assert text(holds(record, Requirements.parse(req), exact=exact)) == expected


def test_admits_runs_the_filters_on_the_groups_own_devices() -> None:
    cluster = cluster_with()
    node = cluster.by_id["pairs"]
    split = GroupRecord("g", "pairs", AllocationState.FREE, None, node.whole_gpus((1, 2)), carved=True)
    cluster.apply(split)
    req = Requirements(gpus=2)
    assert admits(cluster, split, req, Constraints(), EMPTY_CONTEXT, exact=True) is None
    assert text(admits(cluster, split, req, Constraints(nvlink=True), EMPTY_CONTEXT, exact=True)) == (
        "no 2 free GPUs joined by NVLink"
    )
    assert text(admits(cluster, split, req, Constraints(labels={"rack": "r1"}), EMPTY_CONTEXT, exact=True)) == (
        "label rack=r1 does not match"
    )
    cluster.set_unhealthy("pairs", 2, True)
    assert (
        text(admits(cluster, split, req, Constraints(), EMPTY_CONTEXT, exact=True)) == "1 of 8 GPUs free, 2 requested"
    )
