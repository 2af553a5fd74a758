"""The command line as a user runs it: real processes, exit codes, one-line errors, --json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TOPO_FIXTURES

REPO = Path(__file__).resolve().parents[1]


def cg(*args: str, state: Path | None = None) -> subprocess.CompletedProcess[str]:
    base = [sys.executable, "-m", "computegroups.cli"]
    if state is not None:
        base += ["--state", str(state)]
    return subprocess.run([*base, *args], capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "nodes:\n"
        "  - id: box\n"
        f"    topology: {TOPO_FIXTURES / 'rtx_a6000_x8_nv4_pairs.txt'}\n"
        "    gpu: {model: NVIDIA RTX A6000, memory_mib: 49140}\n"
        "    cpus: 64\n"
        "    memory_mib: 262144\n"
    )
    return path


def test_allocate_release_drain_summary_round_trip(tmp_path: Path, spec: Path) -> None:
    state = tmp_path / "s.db"
    out = cg("--spec", str(spec), "--json", "allocate", "decode", "--gpus", "2", "--nvlink", state=state)
    assert out.returncode == 0, out.stderr
    group = json.loads(out.stdout)
    assert group["topology"]["bottleneck"] == "NV4"
    assert group["env"]["CUDA_VISIBLE_DEVICES"].split(",") == group["resources"]["gpu_uuids"]
    listed = json.loads(cg("--spec", str(spec), "--json", "groups", state=state).stdout)
    assert [g["id"] for g in listed] == [group["id"]]
    summary = json.loads(cg("--spec", str(spec), "summary", "--json", state=state).stdout)  # --json after works too
    assert summary["components"] == {"decode": 2} and summary["free_gpus"] == 6
    assert cg("--spec", str(spec), "drain", group["id"], state=state).returncode == 0
    rel = cg("--spec", str(spec), "release", group["id"], state=state)
    assert rel.returncode == 0 and "released" in rel.stdout
    again = cg("--spec", str(spec), "release", group["id"], state=state)
    assert again.returncode == 0 and "nothing changed" in again.stdout


def test_human_tables(tmp_path: Path, spec: Path) -> None:
    out = cg("--spec", str(spec), "discover", state=tmp_path / "s.db")
    assert out.returncode == 0
    assert "NV4" in out.stdout and "NVIDIA RTX A6000" in out.stdout


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["allocate", "c", "--gpus", "-1"], 2, "--gpus: -1.0 is negative"),
        (["allocate", "c", "--gpus", "1.5"], 2, "--gpus"),
        (["allocate", "c", "--gpus", "9"], 3, "no node can take"),
        (["allocate", "c", "--gpus", "2", "--strategy", "pak"], 2, "pak"),
        (["allocate", "c", "--gpus", "1", "--label", "novalue"], 2, "KEY=VALUE"),
        (["release", "cg-nope"], 2, "no compute group"),
        (["drain", "cg-nope"], 2, "no compute group"),
        (["frobnicate"], 2, "No such command"),
    ],
)
def test_errors_are_one_line_with_exit_codes(
    tmp_path: Path, spec: Path, args: list[str], code: int, needle: str
) -> None:
    out = cg("--spec", str(spec), *args, state=tmp_path / "s.db")
    assert out.returncode == code, out.stderr
    assert needle in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    assert "Traceback" not in out.stderr


def test_corrupt_state_is_exit_1_with_one_line(tmp_path: Path, spec: Path) -> None:
    state = tmp_path / "s.db"
    state.write_text("garbage" * 1000)
    out = cg("--spec", str(spec), "summary", state=state)
    assert out.returncode == 1
    assert out.stderr.startswith("computegroups: state") and len(out.stderr.strip().splitlines()) == 1


def test_bad_spec_is_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes:\n  - id: x\n    preset: nonesuch\n")
    out = cg("--spec", str(bad), "discover", state=tmp_path / "s.db")
    assert out.returncode == 2 and "preset" in out.stderr


def test_local_discovery_on_this_machine(tmp_path: Path) -> None:
    out = cg("--json", "discover", state=tmp_path / "s.db")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert len(data["nodes"]) == 1
    if data["nodes"][0]["resources"]["gpus"] == 0:
        assert any("no NVIDIA GPU" in n for n in data["notes"])


def test_demo_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "computegroups.cli", "demo"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "NV4" in out.stdout and "refused" in out.stdout and "0 allocated" in out.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "computegroups.cli", "demo", "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    lines = [json.loads(line)["message"] for line in as_json.stdout.splitlines()]
    assert as_json.returncode == 0 and any("refused" in m for m in lines) and len(lines) > 10


def test_reserve_pools_priority_affinity_gang_and_mig(tmp_path: Path) -> None:
    spec = tmp_path / "cluster.yaml"
    spec.write_text(
        "nodes:\n"
        "  - {id: dgx, count: 2, preset: dgx-h100, labels: {tier: serving}}\n"
        "  - {id: mig, preset: hgx-a100, mig: {0: [3g.40gb, 3g.40gb]}}\n"
        "pools:\n"
        "  - name: serving\n"
        "    selector: {tier: serving}\n"
        "    quotas: {components: {decode: {max_gpus: 4}}}\n"
    )
    state = tmp_path / "s.db"

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return cg("--spec", str(spec), "--json", *args, state=state)

    r = run("reserve", "decode", "--gpus", "4", "--pool", "serving", "--ttl", "60")
    assert r.returncode == 0, r.stderr
    rid = json.loads(r.stdout)["id"]
    assert json.loads(r.stdout)["allocation_state"] == "reserved"
    claimed = run("allocate", "decode-1", "--gpus", "4", "--reservation", rid)
    assert claimed.returncode == 0 and json.loads(claimed.stdout)["id"] == rid
    over = run("allocate", "decode", "--gpus", "1", "--pool", "serving")
    assert over.returncode == 0  # decode-1 claimed it, so decode holds nothing yet
    quota = run("allocate", "decode", "--gpus", "4", "--pool", "serving")
    assert quota.returncode == 3 and "quota" in quota.stderr
    near = run("allocate", "router", "--cpus", "2", "--affinity", "decode-1")
    assert json.loads(near.stdout)["node_id"] == json.loads(claimed.stdout)["node_id"]
    bad = run("allocate", "router", "--cpus", "2", "--affinity", "decode-1:far")
    assert bad.returncode == 2 and "far" in bad.stderr
    mig = run("allocate", "embed", "--mig-profile", "3g.40gb")
    assert json.loads(mig.stdout)["env"]["CUDA_VISIBLE_DEVICES"].startswith("MIG-")
    low = run("allocate", "batch", "--gpus", "8", "--node", "dgx-1", "--priority", "1", "--preemptible")
    assert low.returncode == 0, low.stderr
    gang = run("allocate", "engine", "--gpus", "8", "--nodes", "2", "--priority", "5")
    assert gang.returncode == 3  # gangs do not preempt
    urgent = run("allocate", "urgent", "--gpus", "8", "--node", "dgx-1", "--priority", "5", "--request-id", "u")
    assert urgent.returncode == 3 and "preempting 1 group" in urgent.stderr
    summary = json.loads(run("summary").stdout)
    assert summary["pools"]["serving"]["components"]["decode"] == 1
