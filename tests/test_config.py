"""Configuration files as pydantic models: one line per bad field, and the published JSON Schemas."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider
from computegroups.config import ClusterSpec, parse
from computegroups.errors import InvalidRequestError
from computegroups.integrations.dynamo import DEFAULT_DYNAMO_COMPONENTS, DiscoveryReadiness, HealthReadiness, WorkerSpec
from computegroups.integrations.dynamo.config import ActuatorConfig, parse_config
from computegroups.integrations.etcd import EtcdClient
from computegroups.pools import Quota, parse_pools
from computegroups.providers.simulated import DEFAULT_SPEC, nodes_from_spec

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("kind", ["spec", "pools", "actuator"])
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
    ({"nodes": [{"id": "a", "gpus": 2, "mig": {0: ["1g.0gb"]}}]}, "spec nodes[0].mig:", "mig"),
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


# -- dynamo-actuate's configuration ---------------------------------------------------------------
DECODE = {"command": ["python3", "-m", "dynamo.vllm"], "gpus": 2}


def _documented_actuator_config() -> Any:
    """The ``# actuator.yaml`` example of docs/dynamo.md."""
    text = (REPO / "docs" / "dynamo.md").read_text()
    block = text.split("```yaml\n# actuator.yaml\n", 1)[1].split("```", 1)[0]
    return yaml.safe_load(block)


def test_the_documented_actuator_config_validates_and_builds() -> None:
    config = parse_config(_documented_actuator_config())
    specs = config.specs()
    assert set(specs) == {"prefill", "decode"}
    decode = specs["decode"]
    assert decode == WorkerSpec(2, decode.command, {}, {"nvlink": True})
    assert decode.command[:3] == ("python3", "-m", "dynamo.vllm") and len(decode.command) == 9
    assert decode.command[-4:] == ("--disaggregation-mode", "decode", "--tensor-parallel-size", "2")
    assert config.etcd.endpoints == ["https://etcd.example:2379"] and config.metrics is not None
    assert config.metrics.port == 9464 and config.metrics.host == "127.0.0.1"
    # What is not given is what the flags default to.
    minimal = parse_config({"namespace": "ns", "decode": DECODE})
    assert minimal == ActuatorConfig.model_validate({"namespace": "ns", "decode": DECODE})
    assert (minimal.max_start_failures, minimal.poll_interval_s, minimal.readiness.timeout_s) == (3, 5.0, 900.0)
    assert minimal.etcd.endpoints == ["http://127.0.0.1:2379"] and minimal.metrics is None
    etcd = EtcdClient(minimal.etcd.endpoints[0])
    assert isinstance(minimal.readiness.build(etcd), DiscoveryReadiness)
    health = parse_config(
        {"namespace": "ns", "decode": DECODE, "readiness": {"mode": "health", "health_url": "http://h:{port}/health"}}
    )
    readiness = health.readiness.build(etcd)
    assert isinstance(readiness, HealthReadiness) and readiness.wants_port
    assert minimal.specs()["decode"].dynamo_component is None  # the actuator uses vLLM's name
    assert DEFAULT_DYNAMO_COMPONENTS["decode"] == "backend"


#: (configuration, the text the one-line error starts with, its key)
BAD_ACTUATOR: list[tuple[Any, str, str | None]] = [
    ({"decode": DECODE}, "namespace: Field required", "namespace"),
    ({"namespace": "a.b", "decode": DECODE}, "namespace: 'a.b': String should match pattern", "namespace"),
    ({"namespace": "ns"}, "decode: no role to scale: give prefill and/or decode", "decode"),
    ({"namespace": "ns", "decode": {**DECODE, "gpus": -1}}, "decode.gpus: -1: should be greater than", "gpus"),
    ({"namespace": "ns", "decode": {**DECODE, "gpus": True}}, "decode.gpus: True: should be a valid integer", "gpus"),
    ({"namespace": "ns", "decode": {"command": []}}, "decode.command: List should have at least 1 item", "command"),
    ({"namespace": "ns", "decode": {"command": "python3 x"}}, "decode.command: 'python3 x': should be a", "command"),
    ({"namespace": "ns", "prefill": {"gpus": 1}}, "prefill.command: Field required", "command"),
    ({"namespace": "ns", "decode": {**DECODE, "component": "x/y"}}, "decode.component: 'x/y'", "component"),
    ({"namespace": "ns", "decode": {**DECODE, "colour": 1}}, "decode.colour: unknown key", "colour"),
    ({"namespace": "ns", "decode": DECODE, "etcd": {"endpoints": []}}, "etcd.endpoints: List should have", "endpoints"),
    (
        {"namespace": "ns", "decode": DECODE, "readiness": {"mode": "health"}},
        "readiness.health_url: needed by mode health",
        "health_url",
    ),
    (
        {"namespace": "ns", "decode": DECODE, "readiness": {"health_url": "http://h:{port}/health"}},
        "readiness.health_url: 'http://h:{port}/health': used only by mode health",
        "health_url",
    ),
    (
        {"namespace": "ns", "decode": DECODE, "readiness": {"mode": "health", "health_url": "h:{port}"}},
        "readiness.health_url: 'h:{port}': not an http:// or https:// URL",
        "health_url",
    ),
    (
        {"namespace": "ns", "decode": DECODE, "readiness": {"mode": "health", "health_url": "http://h:{pot}"}},
        "readiness.health_url: 'http://h:{pot}': only {port} and {group_id} may be filled in",
        "health_url",
    ),
    ({"namespace": "ns", "decode": DECODE, "readiness": {"settle_s": "5"}}, "readiness.settle_s: '5'", "settle_s"),
    ({"namespace": "ns", "decode": DECODE, "max_start_failures": 0}, "max_start_failures: 0:", "max_start_failures"),
    ({"namespace": "ns", "decode": DECODE, "retry_backoff_s": -1.0}, "retry_backoff_s: -1.0:", "retry_backoff_s"),
    ({"namespace": "ns", "decode": DECODE, "poll_interval_s": 0}, "poll_interval_s: 0: should be", "poll_interval_s"),
    ({"namespace": "ns", "decode": DECODE, "lease_ttl_s": 1.5}, "lease_ttl_s: 1.5", "lease_ttl_s"),
    ({"namespace": "ns", "decode": DECODE, "metrics": {"host": "::1"}}, "metrics.port: Field required", "port"),
    ({"namespace": "ns", "decode": DECODE, "metrics": {"port": 70000}}, "metrics.port: 70000", "port"),
    ({"namespace": "ns", "decode": DECODE, "colour": 1}, "colour: unknown key", "colour"),
    # placement: the allocation API's own rules, naming the constraint or requirement
    ({"namespace": "ns", "decode": DECODE, "constraints": {"nvlink": 1}}, "constraints.nvlink:", "constraints.nvlink"),
    (
        {"namespace": "ns", "decode": DECODE, "constraints": {"nic_link": "FAR"}},
        "constraints.nic_link: 'FAR' has no NIC to be near",
        "constraints.nic_link",
    ),
    (
        {"namespace": "ns", "decode": DECODE, "requirements": {"gpu_model": 5}},
        "requirements.gpu_model: 5 is not",
        "requirements.gpu_model",
    ),
    (
        {"namespace": "ns", "decode": DECODE, "requirements": {"gpus": 4}},
        "requirements.gpus: set per role",
        "requirements.gpus",
    ),
    ([1], "should be a valid dictionary", None),
]


@pytest.mark.parametrize(("data", "start", "key"), BAD_ACTUATOR, ids=[s for _, s, _ in BAD_ACTUATOR])
def test_a_bad_actuator_config_is_one_line_naming_the_field(data: Any, start: str, key: str | None) -> None:
    with pytest.raises(InvalidRequestError) as info:
        parse_config(data)
    message = str(info.value)
    assert message.startswith(start) and "\n" not in message and len(message) < 300, message
    assert info.value.key == key
    with pytest.raises(InvalidRequestError) as named:  # a file's path starts the line
        parse_config(data, "actuator.yaml")
    assert str(named.value) == (f"actuator.yaml {message}" if key else f"actuator.yaml: {message}")


def _actuate(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    cli = [sys.executable, "-m", "computegroups", "--simulate", "--state", str(tmp_path / "s.db"), "dynamo-actuate"]
    return subprocess.run([*cli, *argv], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_actuate_names_the_flag_or_the_files_field(tmp_path: Path) -> None:
    """A bad value is one line and exit 2: the flag when a flag gave it, else the file and its field."""
    config = tmp_path / "actuator.yaml"
    config.write_text(yaml.safe_dump({"namespace": "ns", "decode": {**DECODE, "gpus": -2}}))
    cases = [
        (("--namespace", "ns"), "--prefill-cmd/--decode-cmd: no role to scale"),
        (("--decode-cmd", "true"), "--namespace: Field required"),
        (("--namespace", "ns", "--decode-cmd", "true", "--decode-gpus", "-1"), "--decode-gpus: -1: should be"),
        (("--namespace", "ns", "--decode-cmd", "true", "--ready", "health"), "--health-url: needed by mode health"),
        (("--namespace", "ns", "--decode-cmd", "true", "--nic-link", "FAR"), "--nic-link: 'FAR' has no NIC"),
        (("--namespace", "ns", "--decode-cmd", "x '"), '--decode-cmd: "x \'" cannot be split into arguments'),
        (("--namespace", "ns", "--decode-cmd", "true", "--etcd", ","), "--etcd: List should have at least 1 item"),
        (("--namespace", "ns", "--decode-cmd", "true", "--etcd", "ftp://h:1"), "--etcd: etcd: 'ftp://h:1' is not"),
        (("--config", str(config)), f"{config} decode.gpus: -2: should be greater than or equal to 0"),
        (("--config", str(config), "--decode-gpus", "-3"), "--decode-gpus: -3: should be"),
        (("--config", str(config), "--namespace", "a.b"), "--namespace: 'a.b'"),
        (("--config", str(tmp_path / "missing.yaml")), f"config {tmp_path / 'missing.yaml'}: No such file"),
    ]
    for argv, start in cases:
        out = _actuate(tmp_path, *argv)
        assert out.returncode == 2, (argv, out.stderr)
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"computegroups: dynamo-actuate: {start}"), (argv, lines)
    config.write_text("[1, 2]")
    out = _actuate(tmp_path, "--config", str(config))
    assert out.returncode == 2 and out.stderr.strip() == (
        f"computegroups: dynamo-actuate: {config}: should be a valid dictionary"
    ), out.stderr
