"""The nvidia-smi topo -m parser on every real recorded output, and GPU-set choice."""

from __future__ import annotations

import itertools

import pytest

from computegroups.errors import InvalidRequestError
from computegroups.topology import Topology, link_rank, parse_nvidia_smi_topo
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
