"""SIGKILL a manager process at random points of allocate, launch and release; the next one repairs everything.

A "zygote" process imports everything once, then forks one child per trial.
Each child opens a manager on a shared SQLite file with a LocalRuntime on a
shared circus daemon (opening reconciles), checks the invariants, appends the
verdict to a results file, then loops run/stop until the zygote SIGKILLs it
after a random delay. A last child reconciles and checks without being killed.

Invariants after reconciliation: no GPU with two owners (committed shares never
exceed a GPU), no leaked allocation (every runtime group has a live worker), no
orphaned worker (every watcher has a held group; every process circus runs
belongs to a watcher).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from computegroups import ComputeGroupManager, InsufficientResourcesError, SimulatedComputeResourceProvider
from computegroups.model import MILLI, AllocationState
from computegroups.runtime import REQUEST_PREFIX, CircusDaemon, LocalRuntime

REPO = Path(__file__).resolve().parents[1]
SPEC = {"nodes": [{"id": "box", "gpus": 4, "gpu": {"model": "GPU", "memory_mib": 16384}, "cpus": 16}]}
TRIALS = 120


async def check(mgr: ComputeGroupManager, rt: LocalRuntime) -> list[str]:
    """Invariant violations, as sentences (empty: all hold)."""
    problems: list[str] = []
    groups = await mgr.list_compute_groups()
    held = [g for g in groups if g.record.state is not AllocationState.RELEASED]
    used: dict[tuple[str, int], int] = {}
    for g in held:
        for d in g.record.devices:
            used[(g.node_id, d.index)] = used.get((g.node_id, d.index), 0) + d.share_milli
    problems += [f"GPU {k} holds {v}/1000" for k, v in used.items() if v > MILLI]
    d = rt.daemon
    watchers = {n for n in await asyncio.to_thread(d.watchers) if n.startswith("w-")}
    watcher_pids: set[int] = set()
    for n in watchers:
        watcher_pids |= set(await asyncio.to_thread(d.pids, n))
    ours = {g.id for g in held if (g.request_id or "").startswith(REQUEST_PREFIX)}
    for gid in ours:
        name = "w-" + gid
        if name not in watchers:
            problems.append(f"leaked allocation {gid}: no worker")
        elif not await asyncio.to_thread(d.pids, name):
            problems.append(f"leaked allocation {gid}: worker has no process")
    problems += [f"orphaned worker {n}: group not held" for n in watchers if n.removeprefix("w-") not in ours]
    import psutil

    pid = d.pid()
    if pid is not None:
        children: set[int] = set()
        for proc in psutil.Process(pid).children():
            try:  # a child may exit (and be reaped) while we look at it
                if proc.status() == psutil.STATUS_ZOMBIE or "circusd-stats" in " ".join(proc.cmdline()):
                    continue
            except psutil.Error:
                continue
            children.add(proc.pid)
        problems += [f"orphaned process {p}: no watcher" for p in sorted(children - watcher_pids)]
    return problems


async def child(state: str, rtdir: str, results: str, seed: int, loop: bool) -> None:
    rng = random.Random(seed)
    mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), state)
    rt = LocalRuntime(mgr, CircusDaemon(rtdir, check_delay=0.1), graceful_timeout_s=2)
    async with mgr:  # reconciles (the runtime's hook included)
        problems = await check(mgr, rt)
        line = json.dumps({"seed": seed, "problems": problems, "revision": mgr.revision}) + "\n"
        fd = os.open(results, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, line.encode())
        os.close(fd)
        while loop:
            held = [g.id for g in await mgr.get_component_allocations("crash")]
            if held and (rng.random() < 0.45 or len(held) >= 3):
                await rt.stop(rng.choice(held))
            else:
                with contextlib.suppress(InsufficientResourcesError):
                    await rt.run("crash", {"gpus": rng.choice([1, 2])}, ["sleep", "600"])


def _lines(path: str) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def zygote(state: str, rtdir: str, results: str, trials: int, seed: int) -> None:
    rng = random.Random(seed)
    killed_after: list[float] = []
    for t in range(trials + 1):
        last = t == trials
        checked = _lines(results)
        pid = os.fork()
        if pid == 0:  # the child: never returns into the zygote's loop
            code = 0
            try:
                asyncio.run(child(state, rtdir, results, seed * 1000 + t, loop=not last))
            except BaseException as exc:  # pragma: no cover - reported through the exit code
                print(f"child {t}: {exc!r}", file=sys.stderr, flush=True)
                code = 1
            os._exit(code)
        if last:
            _, status = os.waitpid(pid, 0)
            if os.waitstatus_to_exitcode(status) != 0:
                print(f"final check exited {status}", flush=True)
                sys.exit(1)
            break
        if rng.random() < 0.5:  # anywhere in its start-up (opening, reconciling, checking)
            delay = rng.uniform(0.0, 0.08)
        else:  # in the middle of its work: once it has checked, however slow the machine is
            delay = rng.uniform(0.0, 0.4)
            deadline = time.monotonic() + 60
            while _lines(results) == checked and time.monotonic() < deadline:
                if os.waitpid(pid, os.WNOHANG)[0]:  # it ended by itself: that is a failure
                    print(f"child {t} exited before it was killed", flush=True)
                    sys.exit(1)
                time.sleep(0.01)
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        killed_after.append(delay)
    print(json.dumps({"trials": len(killed_after), "max_delay_s": max(killed_after, default=0)}), flush=True)


@pytest.mark.circus
@pytest.mark.slow
def test_sigkill_at_random_points_leaves_nothing_inconsistent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rtdir = Path(tempfile.mkdtemp(prefix="cgrec-", dir="/tmp"))
    daemon = CircusDaemon(rtdir, check_delay=0.1)
    daemon.ensure_started()
    results = tmp_path / "results.jsonl"
    started = time.monotonic()
    try:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "tests.test_recovery",
                str(tmp_path / "state.db"),
                str(rtdir),
                str(results),
                str(TRIALS),
                "7",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        checks = [json.loads(line) for line in results.read_text().splitlines()]
        bad = [c for c in checks if c["problems"]]
        with capsys.disabled():
            print(
                f"\nSIGKILL recovery: {summary['trials']} trials killed during allocate/launch/release, "
                f"{len(checks)} post-restart invariant checks, {len(bad)} violations, "
                f"final revision {checks[-1]['revision']}, {time.monotonic() - started:.1f}s"
            )
        assert summary["trials"] >= 100
        assert not bad, bad[:5]
        assert len(checks) >= summary["trials"] // 4  # many children got as far as checking (others died sooner)
        assert checks[-1]["revision"] >= 20  # the children did real work between kills
    finally:
        daemon.quit(timeout_s=20)
        shutil.rmtree(rtdir, ignore_errors=True)


@pytest.mark.circus
async def test_the_invariant_check_sees_leaks_and_orphans(tmp_path: Path) -> None:
    rtdir = Path(tempfile.mkdtemp(prefix="cgchk-", dir="/tmp"))
    daemon = CircusDaemon(rtdir, check_delay=0.1)
    daemon.ensure_started()
    try:
        mgr = ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), tmp_path / "s.db")
        rt = LocalRuntime(mgr, daemon, graceful_timeout_s=2)
        async with mgr:
            assert await check(mgr, rt) == []
            leaked = await mgr.allocate_compute_group("crash", {"gpus": 1}, {"request_id": REQUEST_PREFIX + "l"})
            orphan, _ = await rt.run("crash", {"gpus": 1}, ["sleep", "600"])
            hooks, mgr.release_hooks[:] = list(mgr.release_hooks), []  # a process without this runtime
            await mgr.deallocate_compute_group(orphan.id)
            mgr.release_hooks[:] = hooks
            problems = await check(mgr, rt)
            assert any(leaked.id in p and "leaked" in p for p in problems)
            assert any(orphan.id in p and "orphaned worker" in p for p in problems)
            await mgr.reconcile()
            assert await check(mgr, rt) == []
    finally:
        daemon.quit(timeout_s=20)
        shutil.rmtree(rtdir, ignore_errors=True)


def _main(argv: list[str]) -> None:
    state, rtdir, results, trials, seed = argv
    zygote(state, rtdir, results, int(trials), int(seed))


if __name__ == "__main__":
    _main(sys.argv[1:])
