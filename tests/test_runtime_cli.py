"""``computegroups run / stop / ps`` through click, against a real circus daemon."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from computegroups.cli import Context
from computegroups.runtime import CircusDaemon
from computegroups.runtime.cli import register

pytestmark = pytest.mark.circus


@click.group()
@click.option("--state")
@click.option("--spec")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def cli(click_ctx: click.Context, state: str | None, spec: str | None, as_json: bool) -> None:
    click_ctx.obj = Context(state, spec, False, as_json)


register(cli)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    folder = Path(tempfile.mkdtemp(prefix="cgcli-", dir="/tmp"))
    spec = tmp_path / "spec.yaml"
    spec.write_text("nodes:\n  - id: box\n    preset: pcie-a6000-nvlink-pairs\n")
    yield {"COMPUTEGROUPS_RUNTIME_DIR": str(folder), "COMPUTEGROUPS_STATE": str(tmp_path / "s.db"), "SPEC": str(spec)}
    CircusDaemon(folder).quit(timeout_s=20)
    shutil.rmtree(folder, ignore_errors=True)


def invoke(env: dict[str, str], *args: str) -> click.testing.Result:
    base = ["--state", env["COMPUTEGROUPS_STATE"], "--spec", env["SPEC"]]
    return CliRunner().invoke(cli, [*base, *args], env={"COMPUTEGROUPS_RUNTIME_DIR": env["COMPUTEGROUPS_RUNTIME_DIR"]})


def test_run_ps_stop(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "env.txt"
    script = f"import os,time; open({str(out)!r},'w').write(os.environ['CUDA_VISIBLE_DEVICES']); time.sleep(600)"
    r = invoke(env, "run", "decode", "--gpus", "2", "--nvlink", "--", sys.executable, "-c", script)
    assert r.exit_code == 0, r.output
    gid = r.output.strip()
    assert gid.startswith("cg-")
    r = invoke(env, "--json", "ps")
    (row,) = json.loads(r.output)
    assert row["group_id"] == gid and row["state"] == "running" and row["pids"] and row["component"] == "decode"
    assert row["command"][1:3] == ["-c", script]
    deadline = time.monotonic() + 20
    while not out.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(out.read_text().split(",")) == 2
    r = invoke(env, "ps")
    assert "decode" in r.output and gid in r.output and "running" in r.output
    r = invoke(env, "stop", gid)
    assert r.exit_code == 0 and "stopped and released" in r.output
    assert json.loads(invoke(env, "--json", "ps").output) == []
    (ended,) = json.loads(invoke(env, "--json", "ps", "--all").output)
    assert ended["state"] == "stopped" and ended["group_state"] == "released"


def test_errors_are_one_line_with_exit_codes(env: dict[str, str]) -> None:
    r = invoke(env, "run", "big", "--gpus", "9", "--", "sleep", "1")
    assert r.exit_code == 3 and r.output.startswith("computegroups: ")
    r = invoke(env, "stop", "cg-nope")
    assert r.exit_code == 2
    r = invoke(env, "run", "x", "--gpus", "1", "--policy", "sometimes", "--", "sleep", "1")
    assert r.exit_code == 2
    r = invoke(env, "run", "x", "--gpus", "1", "--", "/nonexistent/binary")
    assert r.exit_code == 2 and "not an executable" in r.output
    assert json.loads(invoke(env, "--json", "ps").output) == []


def _processes_of(gid: str) -> list[int]:
    """Live processes (zombies aside) whose environment names group ``gid``."""
    import psutil

    out = []
    for p in psutil.process_iter():
        try:
            if p.status() != psutil.STATUS_ZOMBIE and p.environ().get("COMPUTEGROUPS_GROUP_ID") == gid:
                out.append(p.pid)
        except (psutil.Error, OSError):
            continue
    return out


def test_release_stops_the_worker_before_anyone_else_gets_its_gpus(env: dict[str, str]) -> None:
    from computegroups.cli import cli as main_cli

    r = invoke(env, "run", "w", "--gpus", "8", "--", sys.executable, "-c", "import time; time.sleep(600)")
    assert r.exit_code == 0, r.output
    gid = r.output.strip()
    deadline = time.monotonic() + 20
    while not _processes_of(gid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_of(gid), "the worker never started"
    r = invoke(env, "release", gid)
    assert r.exit_code == 0 and f"{gid}: released" in r.output, r.output
    assert _processes_of(gid) == []  # stopped before the release was committed, not after
    base = ["--state", env["COMPUTEGROUPS_STATE"], "--spec", env["SPEC"]]
    thief = CliRunner().invoke(main_cli, [*base, "--json", "allocate", "thief", "--gpus", "8"], env=env)
    assert thief.exit_code == 0, thief.output
    (ended,) = json.loads(invoke(env, "--json", "ps", "--all").output)
    assert ended["state"] == "stopped" and ended["note"] == "stopped: its group was released"
