"""Configuration files as pydantic models: one line per bad field, and the published JSON Schemas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider
from computegroups.config import ClusterSpec, parse
from computegroups.errors import InvalidRequestError
from computegroups.pools import Quota, parse_pools
from computegroups.providers.simulated import DEFAULT_SPEC, nodes_from_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["spec", "pools"])
def test_the_published_schemas_are_what_the_models_say(kind: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "computegroups", "schema", kind], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    committed = json.loads((REPO / "docs" / "schema" / f"{kind}.schema.json").read_text())
    assert json.loads(out.stdout) == committed  # regenerate: computegroups schema KIND > docs/schema/KIND.schema.json


def test_the_default_and_documented_specs_validate() -> None:
    assert len(nodes_from_spec(DEFAULT_SPEC)) == 5
    parse(ClusterSpec, {"nodes": [{"id": "a", "gpus": 2, "labels": {"zone": "a", "rack": 3, "spot": True}}]}, "spec")
    node = nodes_from_spec({"nodes": [{"id": "a", "gpus": 1, "labels": {"rack": 3, "spot": True}}]})[0]
    assert dict(node.labels) == {"rack": "3", "spot": "true"}


#: (spec, the text the one-line error starts with, its key)
BAD_SPECS: list[tuple[Any, str, str]] = [
    ({}, "spec nodes: Field required", "nodes"),
    ({"nodes": 3}, "spec nodes: 3: should be a valid list", "nodes"),
    ({"nodes": [{"id": "a", "colour": "red"}]}, "spec nodes[0].colour: unknown key", "colour"),
    ({"nodes": [{"id": "a", "cpus": float("inf")}]}, "spec nodes[0].cpus: inf: not a finite number", "cpus"),
    ({"nodes": [{"id": "a", "cpus": True}]}, "spec nodes[0].cpus: True: not a finite number", "cpus"),
    ({"nodes": [{"id": "a", "gpus": 2.5}]}, "spec nodes[0].gpus: 2.5", "gpus"),
    ({"nodes": [{"id": "a", "gpus": 10**400}]}, "spec nodes[0].gpus:", "gpus"),
    ({"nodes": [{"id": "a", "count": 10**6}]}, "spec nodes[0].count: 1000000", "count"),
    ({"nodes": [{"id": "a", "memory_mib": -1}]}, "spec nodes[0].memory_mib: -1", "memory_mib"),
    ({"nodes": [{"id": "a\n"}]}, "spec nodes[0].id: 'a\\n'", "id"),
    ({"nodes": [{"id": "a", "preset": "dgx"}]}, "spec nodes[0].preset: 'dgx'", "preset"),
    ({"nodes": [{"id": "a", "gpu": {"model": "x\u0007"}}]}, "spec nodes[0].gpu.model:", "model"),
    ({"nodes": [{"id": "a", "labels": {"x": [1]}}]}, "spec nodes[0].labels.x:", "x"),
    ({"nodes": [{"id": "a", "gpus": 2, "mig": {0: ["9g.1gb"]}}]}, "spec nodes[0].mig:", "mig"),
    ({"nodes": [{"id": "a", "gpus": 2, "mig": {0: ["4g.40gb", "4g.40gb"]}}]}, "spec nodes[0].mig:", "mig"),
    ({"nodes": [{"id": "a", "gpus": 2, "mig": {5: ["1g.10gb"]}}]}, "spec nodes[0].mig: GPU 5 does not exist", "mig"),
    ({"nodes": [{"id": "a"}, {"id": "a"}]}, "spec nodes[1].id: duplicate node id 'a'", "id"),
    ({"nodes": [{"id": "a", "count": 60_000}, {"id": "b", "count": 60_000}]}, "spec: more than 100000 nodes", "spec"),
]


@pytest.mark.parametrize(("spec", "start", "key"), BAD_SPECS, ids=[s for _, s, _ in BAD_SPECS])
def test_a_bad_spec_is_one_line_naming_the_field(spec: Any, start: str, key: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        nodes_from_spec(spec)
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message and len(message) < 300, message
    assert info.value.key == key


BAD_POOLS: list[tuple[Any, str]] = [
    ([{"name": "p"}], "pools[0]: give a selector or nodes"),
    ([{"name": "p", "nodes": ["a"], "colour": 1}], "pools[0].colour: unknown key"),
    ([{"name": "p", "nodes": ["a"], "priority": 1.5}], "pools[0].priority: 1.5"),
    (
        [{"name": "p", "nodes": ["a"], "quotas": {"tenants": {"t": {"max_share": 2}}}}],
        "pools[0].quotas.tenants.t.max_share: 2",
    ),
    (
        [{"name": "p", "nodes": ["a"], "quotas": {"components": {"c": {"max_gpus": -1}}}}],
        "pools[0].quotas.components.c.max_gpus",
    ),
    ([{"name": "p", "nodes": ["a"]}, {"name": "p", "nodes": ["b"]}], "pools[1].name: duplicate pool 'p'"),
    ([5], "pools[0]: 5: should be a valid dictionary"),
]


@pytest.mark.parametrize(("pools", "start"), BAD_POOLS, ids=[s for _, s in BAD_POOLS])
def test_bad_pools_are_one_line_with_key_pools(pools: Any, start: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_pools(pools)
    assert str(info.value).startswith(start) and info.value.key == "pools", str(info.value)
    with pytest.raises(InvalidRequestError):  # the manager refuses them the same way, before anything is read
        ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(None), ":memory:", pools=pools)


def test_quota_objects_made_in_code_follow_the_file_rule() -> None:
    assert Quota(max_gpus=4).limit_milli(8) == 4000
    for bad in ({"max_share": 1.5}, {"max_gpus": float("nan")}, {"max_gpus": -1}):
        with pytest.raises(InvalidRequestError, match="quota"):
            Quota(**bad)
