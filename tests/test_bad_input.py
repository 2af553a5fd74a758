"""Hostile values everywhere: the constructor refuses them typed, the command line in one line with exit 2.

The command-line cases run the real ``computegroups`` process against a real state file holding one
group; each must exit with its code, print exactly one line on stderr naming the flag the user typed,
never a traceback, and leave the state as it was.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from computegroups import ComputeGroupManager, InvalidRequestError, SimulatedComputeResourceProvider
from tests.conftest import TOPO_FIXTURES

REPO = Path(__file__).resolve().parents[1]
SPEC = {"nodes": [{"id": "a", "preset": "pcie-a6000-nvlink-pairs"}]}

CONSTRUCTOR: list[tuple[str, dict[str, Any], str]] = [
    ("monitor interval negative", {"monitor_interval": -1}, "monitor_interval"),
    ("monitor interval NaN", {"monitor_interval": float("nan")}, "monitor_interval"),
    ("monitor interval infinite", {"monitor_interval": float("inf")}, "monitor_interval"),
    ("monitor interval zero", {"monitor_interval": 0}, "monitor_interval"),
    ("monitor interval a string", {"monitor_interval": "5"}, "monitor_interval"),
    ("monitor interval a bool", {"monitor_interval": True}, "monitor_interval"),
    ("max attempts zero", {"max_attempts": 0}, "max_attempts"),
    ("max attempts negative", {"max_attempts": -3}, "max_attempts"),
    ("max attempts a fraction", {"max_attempts": 1.5}, "max_attempts"),
    ("max attempts a 401-digit integer", {"max_attempts": 10**400}, "max_attempts"),
    ("tombstone limit negative", {"tombstone_limit": -1}, "tombstone_limit"),
    ("tombstone limit a string", {"tombstone_limit": "many"}, "tombstone_limit"),
    ("tombstone limit None", {"tombstone_limit": None}, "tombstone_limit"),
    ("tombstone limit an integer past str()'s limit", {"tombstone_limit": 10**5000}, "tombstone_limit"),
    ("id factory not callable", {"id_factory": "cg-1"}, "id_factory"),
    ("clock not callable", {"clock": 12.0}, "clock"),
    ("reconcile_on_start a string", {"reconcile_on_start": "yes"}, "reconcile_on_start"),
    ("pools not a list of pools", {"pools": [5]}, "pools"),
    ("state a number", {"state": 5}, "state"),
]


@pytest.mark.parametrize(("what", "kwargs", "key"), CONSTRUCTOR, ids=[c[0] for c in CONSTRUCTOR])
def test_constructor_arguments_are_checked(what: str, kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), **{"state": ":memory:", **kwargs})
    assert info.value.key == key and str(info.value).startswith(key)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300


def test_a_provider_that_is_not_one_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="provider"):
        ComputeGroupManager("simulated", ":memory:")  # type: ignore[arg-type]


async def test_setting_a_bad_monitor_interval_later_is_refused_too() -> None:
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), ":memory:")
    with pytest.raises(InvalidRequestError, match="monitor_interval"):
        mgr.monitor_interval = -1.0
    mgr.monitor_interval = None  # still allowed: no monitor


# -- the command line ------------------------------------------------------------------


def _write(path: Path, text: str | bytes) -> Path:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a spec, hostile spec and topology files, and a state file holding one group."""
    d = tmp_path_factory.mktemp("hostile")
    topo = (TOPO_FIXTURES / "rtx_a6000_x8_nv4_pairs.txt").read_text()
    _write(d / "cluster.yaml", "nodes:\n  - {id: a, preset: pcie-a6000-nvlink-pairs}\n")
    _write(d / "malformed.yaml", "nodes:\n  - id: a\n    preset: [unclosed\n  - id: b\n")
    _write(d / "infinite-cpus.yaml", "nodes:\n  - {id: a, preset: cpu-only, cpus: .inf}\n")
    _write(d / "huge-count.yaml", "nodes:\n  - {id: a, preset: cpu-only, count: 1e12}\n")
    _write(d / "huge-gpus.yaml", "nodes:\n  - {id: a, gpus: 100000000}\n")
    _write(d / "memory-digits.yaml", f"nodes:\n  - {{id: a, preset: cpu-only, memory_mib: {10**400}}}\n")
    _write(d / "binary.topo", os.urandom(4096) + b"\xff\xfe")
    _write(d / "latin1.topo", topo.replace("Legend", "L\xe9gende").encode("latin-1"))
    cpu_field = topo.splitlines()[1].split()[-3]  # GPU0's CPU affinity, e.g. 0-31,64-95
    _write(d / "cpus-xy.topo", topo.replace(cpu_field, "x-y", 1))
    _write(d / "cpus-huge.topo", topo.replace(cpu_field, "0-2000000000", 1))
    for name in ("binary", "latin1", "cpus-xy", "cpus-huge"):
        _write(d / f"{name}.yaml", f"nodes:\n  - {{id: a, topology: {name}.topo, gpu: {{model: A6000}}}}\n")
    _write(d / "pools.yaml", "pools: {not: a list}\n")
    _write(d / "foreign.db", b"")
    conn = sqlite3.connect(d / "foreign.db")
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    made = _cg(d, "allocate", "keep", "--gpus", "2")
    assert made.returncode == 0, made.stderr
    return d


def _cg(d: Path, *args: str, spec: str = "cluster.yaml", state: str = "state.db") -> subprocess.CompletedProcess[str]:
    base = [sys.executable, "-m", "computegroups.cli", "--state", str(d / state)]
    if spec:
        base += ["--spec", str(d / spec)]
    return subprocess.run([*base, *args], capture_output=True, text=True, cwd=d, timeout=60)


def _dump(path: Path) -> list[object]:
    conn = sqlite3.connect(path)
    try:
        return [
            *conn.execute("SELECT key, value FROM computegroups_meta ORDER BY key"),
            *conn.execute("SELECT id, rev, body FROM groups ORDER BY id"),
        ]
    finally:
        conn.close()


A = ["allocate", "x"]
DYNAMO = ["--namespace", "x", "--etcd", "http://127.0.0.1:9", "--prefill-gpus", "1", "--decode-gpus", "1"]
# (args, exit code, what stderr must contain, keyword arguments of _cg)
CLI: list[tuple[list[str], int, str, dict[str, str]]] = [
    ([*A, "--gpus", "inf"], 2, "--gpus: inf is not a finite number", {}),
    ([*A, "--gpus", "1e309"], 2, "--gpus: inf", {}),
    ([*A, "--gpus", "nan"], 2, "--gpus", {}),
    ([*A, "--gpus", "1e-10"], 2, "--gpus: 1e-10 is finer than the 0.001 resolution", {}),
    ([*A, "--gpus", "5000"], 2, "--gpus: 5000 is above the maximum of 1024", {}),
    ([*A, "--gpus", "abc"], 2, "'--gpus'", {}),
    ([*A, "--cpus", "1e308"], 2, "--cpus: 1e+308 is above the maximum of 1048576", {}),
    ([*A, "--cpus", "inf"], 2, "--cpus", {}),
    ([*A, "--cpus", "-1"], 2, "--cpus", {}),
    ([*A, "--memory-mib", "9" * 30], 2, "--memory-mib: an integer of 30 digits is above the maximum", {}),
    ([*A, "--gpus", "1", "--gpu-memory-mib", "-5"], 2, "--gpu-memory-mib", {}),
    ([*A, "--gpus", "1", "--nodes", "0"], 2, "--nodes", {}),
    ([*A, "--gpus", "1", "--nodes", "1" + "0" * 30], 2, "--nodes", {}),
    ([*A, "--mig-profile", "1g.10gb\n"], 2, "--mig-profile", {}),
    ([*A, "--gpus", "1", "--gpu-model", "a6000\n"], 2, "--gpu-model", {}),
    ([*A, "--gpus", "1", "--label", "pool\n=dev"], 2, "--label", {}),
    ([*A, "--gpus", "1", "--label", "pool=d\x07ev"], 2, "--label", {}),
    ([*A, "--gpus", "1", "--pool", "my pool"], 2, "--pool", {}),
    ([*A, "--gpus", "1", "--tenant", "team\n"], 2, "--tenant", {}),
    ([*A, "--gpus", "1", "--priority", "99999999999"], 2, "--priority", {}),
    ([*A, "--gpus", "1", "--request-id", ""], 2, "--request-id", {}),
    ([*A, "--gpus", "1", "--node", "a\n"], 2, "--node", {}),
    ([*A, "--gpus", "1", "--affinity", "decode\n"], 2, "--affinity", {}),
    ([*A, "--gpus", "1", "--affinity", "decode:rack"], 2, "--affinity", {}),
    ([*A, "--gpus", "1", "--reservation", "cg-\x1b[2J"], 2, "--reservation", {}),
    ([*A, "--gpus", "1", "--nic", "NIC 0"], 2, "--nic: 'NIC 0' is not a NIC name", {}),
    ([*A, "--gpus", "1", "--nic", "any", "--nic-link", "NEAR"], 2, "--nic-link: 'NEAR' is not one of PIX", {}),
    ([*A, "--gpus", "1", "--nic-link", "PHB"], 2, "--nic-link", {}),
    (A, 2, "request: nothing requested", {}),
    (["allocate", "decode\n", "--gpus", "1"], 2, "COMPONENT: 'decode\\n' is not a name", {}),
    (["reserve", "x", "--gpus", "1", "--ttl", "inf"], 2, "--ttl", {}),
    (["reserve", "x", "--gpus", "1", "--ttl", "-5"], 2, "--ttl", {}),
    (["reserve", "x", "--gpus", "1", "--ttl", "1e309"], 2, "--ttl", {}),
    (["release", "cg-1\n"], 2, "GROUP_ID", {}),
    (["drain", ""], 2, "GROUP_ID", {}),
    (["groups", "--state", "busy"], 2, "busy", {}),
    (["groups", "--component", "c\n"], 2, "filters.component", {}),
    (["run", "x", "--gpus", "inf", "--", "true"], 2, "--gpus", {}),
    (["supervise", "--interval", "-1"], 2, "--interval", {}),
    (["supervise", "--interval", "nan"], 2, "--interval", {}),
    (["discover"], 2, "not valid YAML", {"spec": "malformed.yaml"}),
    (["discover"], 2, "cpus: inf: not a finite number", {"spec": "infinite-cpus.yaml"}),
    (["discover"], 2, "count", {"spec": "huge-count.yaml"}),
    (["discover"], 2, "gpus", {"spec": "huge-gpus.yaml"}),
    (["discover"], 2, "memory_mib", {"spec": "memory-digits.yaml"}),
    (["discover"], 2, "not UTF-8", {"spec": "binary.yaml"}),
    (["discover"], 2, "not UTF-8", {"spec": "latin1.yaml"}),
    (["discover"], 2, "CPU affinity 'x-y'", {"spec": "cpus-xy.yaml"}),
    (["discover"], 2, "CPU affinity", {"spec": "cpus-huge.yaml"}),
    (["discover"], 2, "No such file", {"spec": "nonesuch.yaml"}),
    (["discover"], 2, "spec", {"spec": "."}),
    (["--pools", "pools.yaml", "summary"], 2, "'pools' is not a list", {}),
    (["summary"], 1, "is a directory", {"state": "."}),
    (["summary"], 1, "not a computegroups state file", {"state": "foreign.db"}),
    (["summary"], 1, "belongs to cluster", {"spec": ""}),  # the state of a simulated cluster, read locally
    (["dynamo-actuate", *DYNAMO, "--prefill-cmd", "python 'x"], 2, "--prefill-cmd", {}),
    (["dynamo-actuate", *DYNAMO, "--decode-cmd", "sleep \\"], 2, "--decode-cmd", {}),
    (["dynamo-actuate", *DYNAMO, "--prefill-cmd", "sleep 9", "--nic", "mlx5_0\n"], 2, "--nic", {}),
    (["dynamo-actuate", *DYNAMO, "--prefill-cmd", "sleep 9", "--nic", "any", "--nic-link", "X"], 2, "--nic-link", {}),
    (["dynamo-actuate", *DYNAMO[:2], "--etcd", "ftp://127.0.0.1:2379", "--prefill-cmd", "sleep 9"], 2, "--etcd", {}),
    (["dynamo-actuate", *DYNAMO[:2], "--etcd-ca", "/nonexistent", "--prefill-cmd", "sleep 9"], 2, "--etcd-ca", {}),
    (["dynamo-actuate", *DYNAMO[:2], "--etcd-user", "root", "--prefill-cmd", "sleep 9"], 2, "--etcd-password", {}),
]


def test_the_cli_table_is_big_enough() -> None:
    assert len(CLI) >= 30


@pytest.mark.parametrize(("args", "code", "needle", "kwargs"), CLI, ids=[" ".join(c[0])[:60] for c in CLI])
def test_hostile_cli_values_exit_with_one_line(
    place: Path, args: list[str], code: int, needle: str, kwargs: dict[str, str]
) -> None:
    before = _dump(place / "state.db")
    out = _cg(place, *args, **kwargs)
    assert out.returncode == code, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert "requirements." not in lines[0] and "constraints." not in lines[0]  # the flag, not the API key
    assert _dump(place / "state.db") == before
