"""The conformance suite (tests/conformance.py) on the Kubernetes provider and custom-resource store.

Each check gets two fresh 8-GPU KWOK nodes and a fresh namespace with the shipped RBAC; the
managers run as that ServiceAccount. The decision transcript must equal the simulated
provider's on nodes of the same shape (same names, same GPU count and topology).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from computegroups import ComputeGroupManager, KubernetesComputeResourceProvider, SimulatedComputeResourceProvider
from tests import conformance

from .harness import ControlPlane
from .test_provider_kubernetes import deploy, make_nodes

pytestmark = pytest.mark.k8s


@pytest.fixture
def sa(k8s_cluster: ControlPlane, k8s_namespace: str) -> Path:
    """deploy/ applied to ``k8s_namespace``; a kubeconfig of its ServiceAccount."""
    return deploy(k8s_cluster, k8s_namespace)


def k8s_opener(kubeconfig: Path, namespace: str, selector: str) -> conformance.OpenManager:
    @contextlib.asynccontextmanager
    async def open_manager() -> AsyncIterator[ComputeGroupManager]:
        p = KubernetesComputeResourceProvider(kubeconfig, namespace=namespace, node_selector=selector)
        async with ComputeGroupManager(p, p.state_store()) as mgr:
            yield mgr

    return open_manager


@pytest.mark.parametrize("check", conformance.MANAGER_CHECKS, ids=lambda c: c.__name__)
async def test_manager_conformance(check: Any, k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:
    names, selector = make_nodes(k8s_cluster, 2, dra=False)
    await check(k8s_opener(sa, k8s_namespace, selector), names)


@pytest.mark.parametrize("shape", ["uniform", "pcie-pairs"])
async def test_same_decisions_as_simulated(
    shape: str, k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path, tmp_path: Path
) -> None:
    names, selector = make_nodes(k8s_cluster, 2, dra=shape == "pcie-pairs")
    opener = k8s_opener(sa, k8s_namespace, selector)
    async with opener() as mgr:
        expected = conformance.node_specs(names, shape)
        for got, want in zip(mgr.node_specs(), expected, strict=True):
            assert got.id == want.id and len(got.gpus) == len(want.gpus)
            assert got.effective_topology.matrix() == want.effective_topology.matrix()
    on_k8s = await conformance.decision_transcript(opener, names)

    @contextlib.asynccontextmanager
    async def simulated() -> AsyncIterator[ComputeGroupManager]:
        async with ComputeGroupManager(
            SimulatedComputeResourceProvider(conformance.node_specs(names, shape)), tmp_path / "s.db"
        ) as mgr:
            yield mgr

    assert on_k8s == await conformance.decision_transcript(simulated, names)
    from tests.test_conformance_simulated import EXPECTED

    assert on_k8s == EXPECTED[shape]
