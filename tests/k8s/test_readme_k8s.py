"""The README's Kubernetes block runs as written against the real control plane."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.test_readme import NEEDS_CLUSTER, readme_blocks, run_block

from .harness import ControlPlane
from .test_provider_kubernetes import deploy, live_groups, make_nodes

pytestmark = pytest.mark.k8s


def test_readme_kubernetes_block_runs(k8s_cluster: ControlPlane, tmp_path: Path) -> None:
    (block,) = [b for b in readme_blocks() if any(m in b for m in NEEDS_CLUSTER)]
    namespace = "computegroups"  # the namespace the block and deploy/ name
    k8s_cluster.ensure_namespace(namespace)
    k8s_cluster.ensure_gpu_device_class()
    kubeconfig = deploy(k8s_cluster, namespace)  # the shipped ServiceAccount, as a user would run it
    make_nodes(k8s_cluster, 1)
    before = {g["metadata"]["name"] for g in live_groups(k8s_cluster, namespace)}
    out = run_block(block, tmp_path, env={**os.environ, "KUBECONFIG": str(kubeconfig)})
    assert out.returncode == 0, out.stderr
    (made,) = [g for g in live_groups(k8s_cluster, namespace) if g["metadata"]["name"] not in before]
    assert made["spec"]["record"]["component"] == "decode"
    pod = made["status"]["pod"]
    assert k8s_cluster.client().get(f"/api/v1/namespaces/{namespace}/pods/{pod}")["spec"]["nodeName"]
