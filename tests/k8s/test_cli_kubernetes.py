"""The command line with ``--provider kubernetes``, as the shipped ServiceAccount, on the real control plane."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import ControlPlane
from .test_provider_kubernetes import REPO, live_groups, make_nodes, sa  # noqa: F401  (sa is a fixture)

pytestmark = pytest.mark.k8s


def test_get_map_allocate_and_release_on_kubernetes(k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path) -> None:  # noqa: F811
    names, _ = make_nodes(k8s_cluster, 1)
    base = [sys.executable, "-m", "computegroups", "--provider", "kubernetes", "--kubeconfig", str(sa)]
    base += ["--namespace", k8s_namespace]

    def cg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, cwd=REPO, timeout=180)

    made = cg("--json", "allocate", "decode", "--gpus", "2", "--node", names[0])
    assert made.returncode == 0, made.stderr
    group = json.loads(made.stdout)
    assert group["node_id"] == names[0] and len(group["resources"]["gpu_uuids"]) == 2
    assert [g["metadata"]["name"] for g in live_groups(k8s_cluster, k8s_namespace)]  # state is in the cluster
    listed = cg("get", "groups", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    assert [g["id"] for g in json.loads(listed.stdout)] == [group["id"]]
    grid = {row["node"]: row["gpus"] for row in json.loads(cg("--json", "map").stdout)}
    assert [c["components"] for c in grid[names[0]] if c["components"]] == [["decode"], ["decode"]]
    assert cg("release", group["id"]).returncode == 0
    assert json.loads(cg("get", "groups", "-o", "json").stdout) == []
    bad = cg("--simulate", "get", "nodes")
    assert bad.returncode == 2 and "--provider" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
