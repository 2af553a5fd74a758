"""``get``, ``describe``, ``map`` and ``--provider`` as a user runs them: real processes, one SQLite file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.test_cli import REPO


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    """Two H100 nodes (one labelled), and an A100 node with MIG slices on two of its GPUs."""
    path = tmp_path / "cluster.yaml"
    path.write_text(
        "nodes:\n"
        "  - {id: h0, preset: dgx-h100, labels: {zone: a}}\n"
        "  - {id: h1, preset: dgx-h100, labels: {zone: b}}\n"
        "  - {id: mig, preset: hgx-a100, mig: {0: [1g.10gb, 1g.10gb, 1g.10gb, 1g.10gb, 1g.10gb, 1g.10gb, 1g.10gb],"
        " 1: [3g.40gb, 3g.40gb]}}\n"
    )
    return path


def run(spec: Path, state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "computegroups", "--spec", str(spec), "--state", str(state), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def ok(spec: Path, state: Path, *args: str) -> str:
    out = run(spec, state, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_get_groups_in_kubectl_columns(tmp_path: Path, spec: Path) -> None:
    state = tmp_path / "s.db"
    gang = json.loads(
        ok(spec, state, "--json", "allocate", "engine", "--gpus", "8", "--nodes", "2", "--gpu-model", "H100")
    )
    ok(spec, state, "release", gang["id"])
    gang = json.loads(
        ok(spec, state, "--json", "allocate", "engine", "--gpus", "4", "--nodes", "2", "--gpu-model", "H100")
    )
    pair = json.loads(ok(spec, state, "--json", "allocate", "decode", "--gpus", "2", "--node", "h0"))
    ok(spec, state, "reserve", "prefill", "--gpus", "1", "--ttl", "600", "--node", "h0")
    table = ok(spec, state, "get", "groups").splitlines()
    head = table[0].split()
    assert head[:7] == ["NAME", "NODE", "COMPONENT", "STATE", "GPUS", "INDICES", "LINK"]
    assert {"PRIORITY", "POOL", "AGE", "EXPIRES", "REASON"} <= set(head)
    rows = {line.split()[0]: line for line in table[1:]}
    assert set(rows) >= {pair["id"], gang["id"]}
    assert "h0,h1" in rows[gang["id"]] or "h1,h0" in rows[gang["id"]]  # a gang shows every node
    assert "h0:0,1,2,3 h1:0,1,2,3" in rows[gang["id"]] or "h1:0,1,2,3 h0:0,1,2,3" in rows[gang["id"]]
    reserved = next(line for line in table[1:] if " reserved " in line)
    assert " 9m5" in reserved or " 9m" in reserved  # EXPIRES in human units
    wide = ok(spec, state, "get", "groups", "-o", "wide").splitlines()[0].split()
    assert {"CPU", "MEMORY", "TENANT", "REQUEST-ID", "UUIDS"} <= set(wide)
    by_gpus = [line.split()[0] for line in ok(spec, state, "get", "groups", "--sort-by", "gpus").splitlines()[1:]]
    assert by_gpus[-1] == gang["id"]
    as_json = json.loads(ok(spec, state, "get", "groups", "-o", "json"))
    as_yaml = yaml.safe_load(ok(spec, state, "get", "groups", "-o", "yaml"))
    assert sorted(g["id"] for g in as_json) == sorted(g["id"] for g in as_yaml) and len(as_json) == 3
    names = ok(spec, state, "get", "groups", "-o", "name").split()
    assert f"group/{pair['id']}" in names
    zone_a = ok(spec, state, "get", "groups", "-l", "zone=a", "-o", "name").split()
    assert f"group/{pair['id']}" in zone_a and f"group/{gang['id']}" not in zone_a  # the gang spans zone b too
    one = json.loads(ok(spec, state, "get", "group", pair["id"], "-o", "json"))
    assert [g["id"] for g in one] == [pair["id"]]


def test_get_and_describe_nodes_keep_physical_gpu_numbers(tmp_path: Path, spec: Path) -> None:
    state = tmp_path / "s.db"
    ok(spec, state, "allocate", "small", "--mig-profile", "1g.10gb")
    nodes = {line.split()[0]: line.split() for line in ok(spec, state, "get", "nodes").splitlines()[1:]}
    assert nodes["mig"][1:3] == ["Ready", "8"]  # 8 GPUs, not 6 whole GPUs + 9 MIG devices
    assert ok(spec, state, "get", "nodes", "-l", "zone=b", "-o", "name").split() == ["node/h1"]
    described = ok(spec, state, "describe", "node", "mig")
    topo = described[described.index("Topology:") :].splitlines()
    assert topo[1].split() == [f"GPU{i}" for i in range(8)]  # the matrix is of physical GPUs
    assert "GPU0 MIG 1g.10gb" in described and "GPU1 MIG 3g.40gb" in described
    discovered = ok(spec, state, "discover")
    mig_matrix = discovered[discovered.index("mig topology") :].splitlines()
    assert mig_matrix[1].split() == [*(f"GPU{i}" for i in range(8)), "NUMA"]


def test_describe_group(tmp_path: Path, spec: Path) -> None:
    state = tmp_path / "s.db"
    g = json.loads(
        ok(
            spec,
            state,
            "--json",
            "allocate",
            "decode",
            "--gpus",
            "2",
            "--nvlink",
            "--cpus",
            "8",
            "--memory-mib",
            "65536",
        )
    )
    text = ok(spec, state, "describe", "group", g["id"])
    for expected in ("Name:", "decode", "allocated", "Bottleneck: NV18", "Memory:  64Gi", "CUDA_VISIBLE_DEVICES"):
        assert expected in text, expected
    data = json.loads(ok(spec, state, "--json", "describe", "group", g["id"]))
    assert data["Nodes"][g["node_id"]]["UUIDs"] == g["resources"]["gpu_uuids"]


def test_map_shows_owners_shares_and_mig_slices(tmp_path: Path, spec: Path) -> None:
    state = tmp_path / "s.db"
    pair = json.loads(ok(spec, state, "--json", "allocate", "decode", "--gpus", "2", "--node", "h0"))
    share = json.loads(ok(spec, state, "--json", "allocate", "embed", "--gpus", "0.5", "--node", "h1"))
    ok(spec, state, "allocate", "small", "--mig-profile", "1g.10gb")
    grid = {row["node"]: row["gpus"] for row in json.loads(ok(spec, state, "--json", "map"))}
    for i in pair["resources"]["gpu_indices"]:
        assert grid["h0"][i]["components"] == ["decode"]
    cell = grid["h1"][share["resources"]["gpu_indices"][0]]
    assert cell["components"] == ["embed"] and "0.5" in cell["text"]
    assert len(grid["mig"]) == 8 and grid["mig"][0]["mig_devices"] == 7 and grid["mig"][0]["text"].endswith("1/7")
    text = ok(spec, state, "map").splitlines()
    assert text[0].split()[:3] == ["NODE", "GPU0", "GPU1"]
    assert text[1].split()[1:3] == ["decode", "decode"]


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["get", "groups", "--sort-by", "colour"], "--sort-by"),
        (["get", "nodes", "-l", "zone"], "--selector"),
        (["map", "-l", "=a"], "--selector"),
        (["--provider", "local", "get", "nodes"], "--provider"),
        (["describe", "node", "nowhere"], "nowhere"),
        (["get", "group", "cg-nope"], "cg-nope"),
    ],
)
def test_bad_view_arguments_are_one_line_and_exit_2(tmp_path: Path, spec: Path, args: list[str], flag: str) -> None:
    out = run(spec, tmp_path / "s.db", *args)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and flag in out.stderr and "Traceback" not in out.stderr


def test_get_watch_prints_changes_made_by_another_process(tmp_path: Path, spec: Path) -> None:
    state = tmp_path / "s.db"
    cmd = [sys.executable, "-m", "computegroups", "--spec", str(spec), "--state", str(state)]
    watch = subprocess.Popen(
        [*cmd, "get", "groups", "--watch", "-o", "json"], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert watch.stdout is not None
        assert watch.stdout.readline().strip() == "[]"  # the (empty) list first
        g = json.loads(ok(spec, state, "--json", "allocate", "decode", "--gpus", "1"))
        seen = json.loads(watch.stdout.readline())
        assert seen["id"] == g["id"] and seen["allocation_state"] == "allocated"
        ok(spec, state, "release", g["id"])
        gone = json.loads(watch.stdout.readline())
        assert gone["id"] == g["id"] and gone["allocation_state"] == "released"
    finally:
        watch.kill()
        watch.wait()


def test_shell_completion_offers_live_group_ids(tmp_path: Path, spec: Path) -> None:
    state = tmp_path / "s.db"
    live = json.loads(ok(spec, state, "--json", "allocate", "decode", "--gpus", "1"))
    gone = json.loads(ok(spec, state, "--json", "allocate", "old", "--gpus", "1"))
    ok(spec, state, "release", gone["id"])

    def complete(words: str, missing_file: bool = False) -> list[str]:
        env = {
            "_COMPUTEGROUPS_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1)),
        }
        code = "import sys; sys.argv[0] = 'computegroups'; from computegroups.cli import main; main()"
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=REPO,
            env={**os.environ, **env},
            timeout=60,
        )
        assert out.returncode == 0 and not out.stderr, out.stderr
        return [line.split(",", 1)[1] for line in out.stdout.splitlines() if line]

    assert complete(f"computegroups --state {state} release ") == [live["id"]]
    assert complete(f"computegroups --state {state} describe group {live['id'][:6]}") == [live["id"]]
    assert complete(f"computegroups --state {state} release cg-zzz") == []
    missing = tmp_path / "none.db"
    assert complete(f"computegroups --state {missing} release ") == [] and not missing.exists()


def test_top_once_prints_the_map_and_totals(tmp_path: Path, spec: Path) -> None:
    state = tmp_path / "s.db"
    ok(spec, state, "allocate", "decode", "--gpus", "2", "--node", "h0")
    text = ok(spec, state, "top", "--once")
    assert "allocated 2" in text and "allocation map" in text
    h0 = next(line for line in text.splitlines() if " h0 " in line)
    assert h0.count("decode") == 2 and "25% alloc" in h0


@pytest.mark.skipif(shutil.which("tmux") is None, reason="no tmux")
def test_top_follows_changes_live_in_a_terminal(tmp_path: Path, spec: Path) -> None:
    """In a real terminal (tmux), ``top`` redraws full-screen as another process allocates and releases."""
    state = tmp_path / "s.db"
    session = f"cgtop{os.getpid()}"
    cmd = " ".join(
        [sys.executable, "-m", "computegroups", "--spec", str(spec), "--state", str(state), "top", "--interval", "0.2"]
    )
    tmux = ["tmux", "-L", session]
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "160", "-y", "40", cmd], check=True, cwd=REPO)

    def screen_until(text: str) -> str:
        deadline = time.monotonic() + 60
        while True:
            shown = subprocess.run([*tmux, "capture-pane", "-p", "-t", session], capture_output=True, text=True).stdout
            if text in shown or time.monotonic() > deadline:
                return shown
            time.sleep(0.2)

    try:
        assert "allocation map" in screen_until("allocation map")
        g = json.loads(ok(spec, state, "--json", "allocate", "trainer", "--gpus", "4", "--node", "h1"))
        shown = screen_until(f"allocated {g['id']}")
        assert f"allocated {g['id']} trainer on h1" in shown
        assert next(line for line in shown.splitlines() if " h1 " in line).count("trainer") == 4
        ok(spec, state, "release", g["id"])
        assert f"released  {g['id']}" in screen_until(f"released  {g['id']}")
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
