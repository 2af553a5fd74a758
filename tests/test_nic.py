"""NIC-aware placement on the real 8x A6000 output that lists two NICs.

Its matrix (tests/fixtures/nvidia-smi-topo/rtx_a6000_x8_nv4_pairs.txt): NIC0 (mlx5_0) and NIC1
(mlx5_1) are PIX to each other, PHB to GPU6, NODE to GPU4, GPU5 and GPU7 (NUMA node 1) and SYS to
GPU0-3 (NUMA node 0); the GPUs are NVLink-bridged in pairs 0-1, 2-3, 4-5, 6-7.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from computegroups import ComputeGroupManager, InsufficientResourcesError, SimulatedComputeResourceProvider
from computegroups.errors import InvalidRequestError
from computegroups.model import AllocationState, Constraints, GroupRecord, Requirements
from computegroups.placement import Cluster, place
from computegroups.placement.engine import pick_devices
from computegroups.placement.plugins import (
    EMPTY_CONTEXT,
    UNRESOLVABLE,
    UNSCHEDULABLE,
    NicFilter,
    Pick,
    Reason,
    nic_subset,
)
from computegroups.providers.simulated import nodes_from_spec
from computegroups.topology import NIC_LINKS, Nic, Topology, link_rank, parse_nvidia_smi_topo
from tests.conftest import TOPO_FIXTURES, a6000_spec, topo_fixture

FIXTURE = "rtx_a6000_x8_nv4_pairs.txt"
TO_NIC = ("SYS", "SYS", "SYS", "SYS", "NODE", "NODE", "PHB", "NODE")  # the NIC0 / NIC1 rows of the fixture


def test_the_parser_keeps_the_nics_with_their_links_legend_and_numa_node() -> None:
    topo = parse_nvidia_smi_topo(topo_fixture(FIXTURE))
    assert topo.nics == (Nic("NIC0", TO_NIC, "mlx5_0", 1), Nic("NIC1", TO_NIC, "mlx5_1", 1))
    assert topo.gpu_count == 8 and len(topo.matrix()) == 8  # the GPU matrix is still 8x8
    assert topo.nic_indices("mlx5_1") == (1,) and topo.nic_indices("NIC0") == (0,)
    assert topo.nic_indices("any") == (0, 1) and topo.nic_indices("mlx5_9") == ()
    assert topo.near_nic(0, 3) == 1 << 6  # PHB or nearer: GPU6 alone
    assert topo.near_nic(0, 2) == 0b1111_0000  # NODE or nearer: the NUMA node 1 GPUs
    for other in ("a100_p4d.24xlarge.txt", "hgx_h100_p5.48xlarge.txt", "single_gpu.txt", "rtx5090_x2_phb_rawtabs.txt"):
        assert parse_nvidia_smi_topo(topo_fixture(other)).nics == ()


def test_nics_are_part_of_the_topologys_value() -> None:
    text = topo_fixture(FIXTURE)
    a, b = parse_nvidia_smi_topo(text), parse_nvidia_smi_topo(text)
    assert a == b and hash(a) == hash(b)
    bare = a.without_nics()
    assert bare != a and bare.nics == () and bare.matrix() == a.matrix()
    assert bare == bare.without_nics()
    # A NIC row that contradicts the GPU rows is refused, not half-believed.
    bad = text.replace(
        "NIC0    SYS     SYS     SYS     SYS     NODE    NODE    PHB",
        "NIC0    SYS     SYS     SYS     SYS     NODE    NODE    SYS",
    )
    with pytest.raises(InvalidRequestError, match="GPU6-NIC0 is 'PHB' but NIC0-GPU6 is 'SYS'"):
        parse_nvidia_smi_topo(bad)
    with pytest.raises(InvalidRequestError, match="one link per GPU"):
        Topology([["X", "PIX"], ["PIX", "X"]], nics=[Nic("NIC0", ("PIX",))])
    with pytest.raises(InvalidRequestError, match="not unique"):
        Topology([["X"]], nics=[Nic("NIC0", ("PIX",)), Nic("NIC0", ("SYS",))])


def test_devices_carved_from_gpus_inherit_their_gpus_links_to_the_nics() -> None:
    topo = parse_nvidia_smi_topo(topo_fixture(FIXTURE))
    carved = topo.project([6, 6, 7])
    assert [n.links for n in carved.nics] == [("PHB", "PHB", "NODE")] * 2
    assert [n.device for n in carved.nics] == ["mlx5_0", "mlx5_1"]


@pytest.mark.parametrize("nvlink", [False, True])
@pytest.mark.parametrize("link", NIC_LINKS)
def test_every_occupancy_gets_the_best_set_then_the_nearest_to_the_nic(link: str, nvlink: bool) -> None:
    """Against an exhaustive search of its own: for every free mask and size, the set chosen is the best
    of all sets within ``link`` of one NIC by (bottleneck, total, NUMA nodes), then by nearness to it."""
    topo = parse_nvidia_smi_topo(topo_fixture(FIXTURE))
    cons = Constraints.parse({"nic": "any", "nic_link": link, "nvlink": nvlink})
    worst = link_rank(link)

    def key(indices: tuple[int, ...], nic: int) -> tuple[int, ...]:
        c = topo.evaluate(indices)
        to_nic = [topo.nic_rank(nic, i) for i in indices]
        return (c.bottleneck, c.total, -c.numa_nodes, min(to_nic), sum(to_nic))

    for mask in range(1 << topo.gpu_count):
        for k in range(1, topo.gpu_count + 1):
            best = max(
                (
                    key(combo, nic)
                    for nic in range(len(topo.nics))
                    for combo in itertools.combinations(
                        [i for i in range(8) if mask >> i & 1 and topo.nic_rank(nic, i) >= worst], k
                    )
                    if not nvlink or k == 1 or all(topo.is_nvlink(a, b) for a, b in itertools.combinations(combo, 2))
                ),
                default=None,
            )
            got = nic_subset(topo, mask, k, cons)
            if got is None:
                assert best is None, (bin(mask), k)
                continue
            near = [n for n in range(len(topo.nics)) if all(topo.nic_rank(n, i) >= worst for i in got.indices)]
            assert near and max(key(got.indices, n) for n in near) == best, (bin(mask), k, got.indices)


def _cluster(spec: dict[str, Any] | None = None) -> Cluster:
    return Cluster(nodes_from_spec(spec or a6000_spec()))


def _place(cluster: Cluster, req: dict[str, Any], cons: dict[str, Any]) -> list[int]:
    d = place(cluster, Requirements.parse(req), Constraints.parse(cons))
    cluster.apply(
        GroupRecord(f"g{len(cluster.by_id)}-{d.devices}", d.node_id, AllocationState.ALLOCATED, "c", d.devices)
    )
    return [dev.index for dev in d.devices]


def test_a_pair_near_a_nic_takes_the_gpu_behind_its_host_bridge_and_that_gpus_nvlink_partner() -> None:
    assert _place(_cluster(), {"gpus": 2}, {}) == [0, 1]  # without the constraint: the first bridged pair
    for cons in (
        {"nic": "any"},
        {"nic": "NIC0"},
        {"nic": "mlx5_1"},
        {"nic": "any", "nic_link": "node"},
        {"nic": "any", "nic_link": "SYS"},  # every GPU allowed: still the pair nearest the NIC
        {"nic": "any", "nvlink": True, "same_numa": True},
    ):
        assert _place(_cluster(), {"gpus": 2}, cons) == [6, 7], cons


def test_nic_placement_fills_the_nics_numa_node_then_refuses() -> None:
    c = _cluster()
    assert _place(c, {"gpus": 2}, {"nic": "mlx5_0"}) == [6, 7]
    assert _place(c, {"gpus": 2}, {"nic": "mlx5_0"}) == [4, 5]
    with pytest.raises(InsufficientResourcesError) as info:
        _place(c, {"gpus": 1}, {"nic": "mlx5_0"})
    assert info.value.reasons == {"0 of 4 GPU(s) within NODE of mlx5_0 free, 1 requested": 1}
    assert "within NODE of mlx5_0" in str(info.value)
    assert _place(c, {"gpus": 2}, {}) == [0, 1]  # the rest of the node is still there for others


def test_four_gpus_near_a_nic_are_its_numa_nodes_four() -> None:
    assert _place(_cluster(), {"gpus": 4}, {"nic": "any"}) == [4, 5, 6, 7]


def test_one_gpu_and_a_share_within_the_host_bridge_go_to_gpu6() -> None:
    assert _place(_cluster(), {"gpus": 1}, {"nic": "any", "nic_link": "PHB"}) == [6]
    c = _cluster()
    assert _place(c, {"gpus": 0.5}, {"nic": "NIC1", "nic_link": "PHB"}) == [6]
    assert _place(c, {"gpus": 0.5}, {"nic": "NIC1", "nic_link": "PHB"}) == [6]  # shares fill the shared GPU
    with pytest.raises(InsufficientResourcesError) as info:
        _place(c, {"gpus": 0.5}, {"nic": "NIC1", "nic_link": "PHB"})
    assert info.value.reasons == {"no GPU within PHB of NIC1 with 0.5 of a GPU free": 1}


def test_an_impossible_nic_constraint_is_refused_with_a_typed_reason() -> None:
    node = _cluster().nodes[0]
    nic = NicFilter()
    cases: list[tuple[dict[str, Any], dict[str, Any], Reason]] = [
        ({"gpus": 2}, {"nic": "any", "nic_link": "PHB"}, Reason(UNRESOLVABLE, "{} GPU(s) {}, {} requested")),
        ({"gpus": 1}, {"nic": "any", "nic_link": "PIX"}, Reason(UNRESOLVABLE, "{} GPU(s) {}, {} requested")),
        ({"gpus": 5}, {"nic": "any"}, Reason(UNRESOLVABLE, "{} GPU(s) {}, {} requested")),
        ({"gpus": 1}, {"nic": "mlx5_7"}, Reason(UNRESOLVABLE, "no NIC {} (has {})")),
    ]
    texts = [
        "1 GPU(s) within PHB of a NIC, 2 requested",
        "0 GPU(s) within PIX of a NIC, 1 requested",
        "4 GPU(s) within NODE of a NIC, 5 requested",
        "no NIC mlx5_7 (has NIC0, NIC1)",
    ]
    for (req, cons, expected), text in zip(cases, texts, strict=True):
        got = nic.filter(node, Requirements.parse(req), Constraints.parse(cons), EMPTY_CONTEXT)
        assert got is not None and (got.code, got.template) == (expected.code, expected.template)
        assert got.text() == text
        with pytest.raises(InsufficientResourcesError) as info:
            place(_cluster(), Requirements.parse(req), Constraints.parse(cons))
        assert info.value.reasons == {text: 1}
    # A request without GPUs only needs the NIC to be there.
    assert nic.filter(node, Requirements.parse({"cpus": 1}), Constraints.parse({"nic": "any"}), EMPTY_CONTEXT) is None
    # Free GPUs too far from the NIC do not count: once NUMA node 1 is taken, it is a capacity matter.
    c = _cluster()
    _place(c, {"gpus": 4}, {"nic": "any"})
    got = nic.filter(c.nodes[0], Requirements.parse({"gpus": 1}), Constraints.parse({"nic": "any"}), EMPTY_CONTEXT)
    assert (
        got is not None
        and got.code == UNSCHEDULABLE
        and got.text() == "0 of 4 GPU(s) within NODE of a NIC free, 1 requested"
    )


def _hold(cluster: Cluster, *indices: int) -> None:
    node = cluster.nodes[0]
    cluster.apply(
        GroupRecord(f"held-{indices}", node.spec.id, AllocationState.ALLOCATED, "c", node.whole_gpus(indices))
    )


def test_the_device_choice_honours_nvlink_and_the_nic_together() -> None:
    c = _cluster()
    _hold(c, 6)
    nvlink_near = Constraints.parse({"nic": "any", "nvlink": True})
    picked = pick_devices(c.nodes[0], Requirements.parse({"gpus": 2}), nvlink_near)
    assert isinstance(picked, Pick) and [d.index for d in picked.devices] == [4, 5]
    _hold(c, 5)  # GPUs 4 and 7 are near the NIC and free, but not bridged
    assert NicFilter().filter(c.nodes[0], Requirements.parse({"gpus": 2}), nvlink_near, EMPTY_CONTEXT) is None
    refused = pick_devices(c.nodes[0], Requirements.parse({"gpus": 2}), nvlink_near)
    assert isinstance(refused, Reason) and refused.code == UNSCHEDULABLE
    assert refused.text() == "no 2 free GPUs joined by NVLink, within NODE of a NIC"
    picked = pick_devices(c.nodes[0], Requirements.parse({"gpus": 2}), Constraints.parse({"nic": "any"}))
    assert isinstance(picked, Pick) and [d.index for d in picked.devices] == [4, 7]


def test_a_node_whose_topology_lists_no_nics_is_refused_not_taken_as_near() -> None:
    spec = {"nodes": [{"id": "dgx", "preset": "dgx-h100"}]}
    with pytest.raises(InsufficientResourcesError) as info:
        place(_cluster(spec), Requirements.parse({"gpus": 2}), Constraints.parse({"nic": "any"}))
    assert info.value.reasons == {"topology lists no NICs": 1}
    # In a mixed fleet the request goes to the node that lists the NIC.
    mixed = {"nodes": [*spec["nodes"], *a6000_spec()["nodes"]]}
    d = place(_cluster(mixed), Requirements.parse({"gpus": 2}), Constraints.parse({"nic": "any"}))
    assert (d.node_id, [x.index for x in d.devices]) == ("a6000", [6, 7])


def test_nic_constraint_values() -> None:
    c = Constraints.parse({"nic": "any"})
    assert (c.nic, c.nic_link) == ("any", "NODE")  # the NIC's NUMA node by default
    c = Constraints.parse({"nic": "mlx5_0", "nic_link": "phb"})
    assert (c.nic, c.nic_link) == ("mlx5_0", "PHB")
    assert c.to_dict()["nic"] == "mlx5_0" and c.to_dict()["nic_link"] == "PHB"
    assert Constraints.parse(c.to_dict()) == c
    assert "nic" not in Constraints.parse({}).to_dict()
    for bad, key in (
        ({"nic": "NIC 0"}, "constraints.nic"),
        ({"nic": ""}, "constraints.nic"),
        ({"nic": 0}, "constraints.nic"),
        ({"nic": "any", "nic_link": "NV4"}, "constraints.nic_link"),
        ({"nic": "any", "nic_link": None, "nvlink": 1}, "constraints.nvlink"),
        ({"nic_link": "PHB"}, "constraints.nic_link"),
    ):
        with pytest.raises(InvalidRequestError) as info:
            Constraints.parse(bad)
        assert info.value.key == key and str(info.value).startswith(key), bad


async def test_the_manager_groups_show_each_nics_link_to_their_gpus() -> None:
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(a6000_spec()), ":memory:") as mgr:
        g = await mgr.allocate_compute_group("prefill", {"gpus": 2}, {"nic": "mlx5_0", "nic_link": "NODE"})
        assert g.resources["gpu_indices"] == [6, 7]
        assert g.topology["nics"] == {"NIC0": ["PHB", "NODE"], "NIC1": ["PHB", "NODE"]}
        (node,) = await mgr.list_compute_nodes()
        assert node.to_dict()["nics"][0] == {"name": "NIC0", "device": "mlx5_0", "numa_node": 1, "links": list(TO_NIC)}
        with pytest.raises(InsufficientResourcesError, match="within PHB of a NIC"):
            await mgr.allocate_compute_group("decode", {"gpus": 2}, {"nic": "any", "nic_link": "PHB"})
        assert len(await mgr.list_compute_groups()) == 1  # the refusal changed nothing


def test_cli_with_a_spec_file_places_near_the_nic(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.json"
    spec.write_text(json.dumps(a6000_spec()))
    cli = [sys.executable, "-m", "computegroups.cli", "--spec", str(spec), "--state", str(tmp_path / "s.db")]
    out = subprocess.run(
        [*cli, "--json", "allocate", "kv", "--gpus", "2", "--nic", "mlx5_1"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    group = json.loads(out.stdout)
    assert group["resources"]["gpu_indices"] == [6, 7] and group["topology"]["nics"]["NIC1"] == ["PHB", "NODE"]
    out = subprocess.run(
        [*cli, "allocate", "kv", "--gpus", "2", "--nic", "any", "--nic-link", "PHB"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode == 3 and len(out.stderr.strip().splitlines()) == 1
    assert "1 GPU(s) within PHB of a NIC, 2 requested" in out.stderr
    out = subprocess.run([*cli, "discover"], capture_output=True, text=True, check=False, timeout=60)
    assert out.returncode == 0 and any(
        line.split()[:3] == ["NIC0", "(mlx5_0)", "SYS"] for line in out.stdout.splitlines()
    )
    assert (TOPO_FIXTURES / FIXTURE).exists()
