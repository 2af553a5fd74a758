"""The nvidia-smi topo -m parser on every real recorded output, and GPU-set choice."""

from __future__ import annotations

import itertools
import random

import pytest

from computegroups.errors import InvalidRequestError
from computegroups.providers.simulated import nodes_from_spec
from computegroups.topology import Topology, _SubsetSearch, link_rank, parse_nvidia_smi_topo, search_budget
from tests.conftest import TOPO_FIXTURES, topo_fixture


def test_every_fixture_is_covered() -> None:
    names = sorted(p.name for p in TOPO_FIXTURES.glob("*.txt"))
    assert names == sorted(EXPECTED)


def _range(a: int, b: int) -> set[int]:
    return set(range(a, b + 1))


# name -> (gpu count, {(i, j): link}, numa per GPU, affinity per GPU)
EXPECTED = {
    "hgx_h100_p5.48xlarge.txt": (
        8,
        {(i, j): "NV18" for i in range(8) for j in range(8) if i != j},
        [0, 0, 0, 0, 1, 1, 1, 1],
        [_range(0, 47) | _range(96, 143)] * 4 + [_range(48, 95) | _range(144, 191)] * 4,
    ),
    "a100_p4d.24xlarge.txt": (
        8,
        {(i, j): "NV12" for i in range(8) for j in range(8) if i != j},
        [0, 0, 0, 0, 1, 1, 1, 1],
        [_range(0, 23) | _range(48, 71)] * 4 + [_range(24, 47) | _range(72, 95)] * 4,
    ),
    "rtx_a6000_x8_nv4_pairs.txt": (
        8,
        {
            (0, 1): "NV4",
            (2, 3): "NV4",
            (4, 5): "NV4",
            (6, 7): "NV4",
            (0, 2): "NODE",
            (0, 3): "NODE",
            (1, 2): "NODE",
            (1, 3): "NODE",
            (4, 6): "NODE",
            (4, 7): "NODE",
            (5, 6): "NODE",
            (5, 7): "NODE",
            **{(a, b): "SYS" for a in range(4) for b in range(4, 8)},
        },
        [0, 0, 0, 0, 1, 1, 1, 1],
        [_range(0, 63)] * 4 + [_range(64, 127)] * 4,
    ),
    "rtx5090_x2_phb_rawtabs.txt": (2, {(0, 1): "PHB"}, [0, 0], [_range(0, 63)] * 2),
    "single_gpu.txt": (1, {}, [0], [_range(0, 31) | _range(64, 95)]),
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_parser_on_real_outputs(name: str) -> None:
    count, links, numa, affinity = EXPECTED[name]
    t = parse_nvidia_smi_topo(topo_fixture(name))
    assert t.gpu_count == count
    for i in range(count):
        assert t.link(i, i) == "X"
        assert t.numa_node(i) == numa[i]
        assert t.cpu_affinity(i) == affinity[i]
        for j in range(count):
            if i != j:
                expected = links.get((i, j)) or links.get((j, i))
                assert t.link(i, j) == expected, (name, i, j)


def test_old_driver_without_numa_column_and_mlx_nics() -> None:
    text = (
        "\tGPU0\tGPU1\tmlx5_0\tCPU Affinity\n"
        "GPU0\t X \tNV2\tPIX\t0-11\n"
        "GPU1\tNV2\t X \tPIX\t0-11\n"
        "mlx5_0\tPIX\tPIX\t X \t\n"
        "\nLegend:\n\n  X    = Self\n"
    )
    t = parse_nvidia_smi_topo(text)
    assert t.gpu_count == 2
    assert t.link(0, 1) == "NV2"
    assert t.numa_node(0) is None
    assert t.cpu_affinity(1) == _range(0, 11)


def test_na_affinity_is_empty() -> None:
    t = parse_nvidia_smi_topo("        GPU0    CPU Affinity    NUMA Affinity\nGPU0     X      N/A     N/A\n")
    assert t.cpu_affinity(0) == frozenset()
    assert t.numa_node(0) is None


@pytest.mark.parametrize("text", ["", "no matrix here", "        GPU0    GPU1\nGPU0     X      NV1\n"])
def test_garbage_is_a_typed_error(text: str) -> None:
    with pytest.raises(InvalidRequestError):
        parse_nvidia_smi_topo(text)


def test_link_ranking() -> None:
    order = ["NV18", "NV12", "NV4", "NV1", "PIX", "PXB", "PHB", "NODE", "SYS"]
    ranks = [link_rank(x) for x in order]
    assert ranks == sorted(ranks, reverse=True)
    assert len(set(ranks)) == len(ranks)


def _brute_best_bottleneck(t: Topology, free: list[int], k: int) -> int:
    best = 0
    for combo in itertools.combinations(free, k):
        best = max(best, min((t.rank(a, b) for a, b in itertools.combinations(combo, 2)), default=10**6))
    return best


@pytest.mark.parametrize("name", ["rtx_a6000_x8_nv4_pairs.txt", "hgx_h100_p5.48xlarge.txt"])
def test_best_subset_matches_exhaustive_bottleneck(name: str) -> None:
    t = parse_nvidia_smi_topo(topo_fixture(name))
    for mask in range(1, 256):
        free = [i for i in range(8) if mask >> i & 1]
        for k in range(2, len(free) + 1):
            choice = t.best_subset(mask, k)
            assert choice is not None
            assert set(choice.indices) <= set(free)
            assert choice.bottleneck == _brute_best_bottleneck(t, free, k)


def test_same_numa_preferred_on_nvswitch() -> None:
    t = parse_nvidia_smi_topo(topo_fixture("hgx_h100_p5.48xlarge.txt"))
    choice = t.best_subset(0b11111111, 4)
    assert choice is not None and choice.numa_nodes == 1
    # With only GPUs 3,4,5,6,7 free a 4-GPU group stays on NUMA node 1.
    choice = t.best_subset(0b11111000, 4)
    assert choice is not None and choice.indices == (4, 5, 6, 7)


def test_asymmetric_matrix_rejected() -> None:
    with pytest.raises(InvalidRequestError):
        Topology([["X", "NV1"], ["SYS", "X"]])


# -- the bounded search beyond small nodes ------------------------------------------------

_LINKS = ["SYS", "NODE", "PHB", "PXB", "PIX", "NV1", "NV2", "NV4", "NV12", "NV18"]


def _random_topology(rng: random.Random, n: int) -> Topology:
    links = [["X"] * n for _ in range(n)]
    for a in range(n):
        for b in range(a + 1, n):
            links[a][b] = links[b][a] = rng.choice(_LINKS[: rng.randint(1, len(_LINKS))])
    numa: list[int | None] = [rng.choice([0, 1, None]) if rng.random() < 0.2 else 2 * a // n for a in range(n)]
    return Topology(links, numa)


def test_branch_and_bound_equals_the_exhaustive_search() -> None:
    """The search used beyond the enumeration limit gives exactly what evaluating every subset gives."""
    rng = random.Random(11)
    cases = 0
    for _ in range(120):
        n = rng.randint(3, 11)
        t = _random_topology(rng, n)
        free = [i for i in range(n) if rng.random() < 0.8] or [0]
        for k in range(2, len(free) + 1):
            for nvlink, same_numa in itertools.product((False, True), repeat=2):
                found = _SubsetSearch(t._ranks, t._numa, free, k, nvlink, same_numa, 0).run()
                expected = t._enumerate(free, k, nvlink, same_numa)
                assert (None if found is None else t.evaluate(found)) == expected, (free, k, nvlink, same_numa)
                cases += 1
    assert cases > 1000


def test_sixteen_devices_are_searched_exactly() -> None:
    rng = random.Random(3)
    t = _random_topology(rng, 16)
    full = (1 << 16) - 1
    for k in (5, 8, 11):
        assert t.best_subset(full, k) == t._enumerate(list(range(16)), k, False, False)


def _nvswitch(n: int) -> Topology:
    return Topology([["NV18"] * n for _ in range(n)], [2 * i // n for i in range(n)])


def test_large_nodes_are_decided_with_the_best_bottleneck() -> None:
    """A 32-GPU and a 64-GPU node asked for half their GPUs, and an A100 node cut into 56 MIG slices."""
    for n in (32, 64):
        choice = _nvswitch(n).best_subset((1 << n) - 1, n // 2)
        assert choice is not None and choice.numa_nodes == 1 and choice.indices == tuple(range(n // 2))
    mig = nodes_from_spec({"nodes": [{"id": "m", "preset": "hgx-a100", "mig": {i: ["1g.5gb"] * 7 for i in range(8)}}]})
    topo = mig[0].topology
    assert topo is not None and topo.gpu_count == 56
    six = topo.best_subset((1 << 56) - 1, 6)
    assert six is not None and six.bottleneck == link_rank("NV12")  # six slices on six different GPUs
    assert len({mig[0].gpus[i].parent_index for i in six.indices}) == 6 and six.numa_nodes == 2
    assert topo.best_subset((1 << 56) - 1, 6, nvlink=True) == six
    # 12 slices cannot all be on different GPUs; the answer still spans all 8 (more NVLink pairs).
    twelve = topo.best_subset((1 << 56) - 1, 12)
    assert twelve is not None and len({mig[0].gpus[i].parent_index for i in twelve.indices}) == 8


def test_a_bounded_search_counts_its_nodes() -> None:
    """Beyond 16 devices the search stops at its budget (and still answers with the proven bottleneck)."""
    rng = random.Random(8)
    links = [["NV18" if a // 20 == b // 20 else rng.choice(_LINKS[:5]) for b in range(40)] for a in range(40)]
    for a in range(40):
        for b in range(a):
            links[a][b] = links[b][a]
    t = Topology(links, [a // 10 for a in range(40)])
    budget = search_budget(40)
    assert 0 < budget < search_budget(17) and search_budget(16) == 0
    search = _SubsetSearch(t._ranks, t._numa, list(range(40)), 20, False, False, budget)
    found = search.run()
    assert found is not None and len(found) == 20
    assert search.nodes <= budget + 1
    assert t.evaluate(found).bottleneck == link_rank("NV18")  # one of the two NVSwitch halves
    assert t.evaluate(found).numa_nodes == 2


def test_cpu_lists_are_bounded_before_they_are_expanded() -> None:
    header = "        GPU0    CPU Affinity    NUMA Affinity\n"
    for bad in ("x-y", "0-2000000000", "5-3", "1,,x", "-1"):
        with pytest.raises(InvalidRequestError, match="CPU affinity"):
            parse_nvidia_smi_topo(f"{header}GPU0     X      {bad}     0\n")
    assert parse_nvidia_smi_topo(f"{header}GPU0     X      0-3,8     0\n").cpu_affinity(0) == frozenset({0, 1, 2, 3, 8})
