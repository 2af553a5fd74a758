"""The SQLite store with real files and real processes: exclusivity, crash atomicity, refusal of foreign files."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider, StateError
from computegroups.model import MILLI, AllocationState, GroupRecord
from computegroups.state.sqlite import SqliteStateStore
from tests._sqlite_worker import SPEC

REPO = Path(__file__).resolve().parents[1]


def _records(path: Path) -> list[dict[str, object]]:
    conn = sqlite3.connect(path)
    try:
        return [json.loads(b) for (b,) in conn.execute("SELECT body FROM groups")]
    finally:
        conn.close()


def _check_capacity(records: list[dict[str, object]]) -> dict[tuple[str, int], int]:
    """No device holds more than one whole GPU across groups that hold capacity."""
    used: dict[tuple[str, int], int] = defaultdict(int)
    owners: dict[tuple[str, int], set[str]] = defaultdict(set)
    for r in records:
        if r["state"] == AllocationState.RELEASED.value:
            continue
        for index, _uuid, share, _mem in r["devices"]:  # type: ignore[attr-defined]
            key = (str(r["node_id"]), int(index))
            used[key] += int(share)
            if int(share) == MILLI:
                owners[key].add(str(r["id"]))
    for key, total in used.items():
        assert total <= MILLI, f"{key} is {total / MILLI:g} allocated"
        assert len(owners[key]) <= 1, f"{key} has owners {owners[key]}"
    return used


@pytest.mark.slow
def test_four_processes_never_share_a_gpu(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    procs = []
    for seed in range(4):
        log = tmp_path / f"log{seed}.jsonl"
        procs.append(
            (
                subprocess.Popen(
                    [sys.executable, "-m", "tests._sqlite_worker", str(state), str(seed), "150", str(log)], cwd=REPO
                ),
                log,
            )
        )
    for p, _ in procs:
        assert p.wait(timeout=240) == 0
    holds = [json.loads(line) for _, log in procs for line in log.read_text().splitlines()]
    assert len(holds) > 300  # the processes really contended
    by_device: dict[tuple[str, int], list[tuple[float, float, float]]] = defaultdict(list)
    for h in holds:
        for gpu in h["gpus"]:
            by_device[(h["node"], gpu)].append((h["start"], h["end"], h["share"]))
    for device, spans in by_device.items():
        events = sorted(
            [(s, share) for s, _, share in spans] + [(e, -share) for _, e, share in spans], key=lambda x: (x[0], x[1])
        )
        level = 0.0
        for _, delta in events:
            level += delta
            assert level <= 1.0 + 1e-9, f"{device} was held beyond its capacity"
    # Nothing leaked: every group is released.
    assert all(r["state"] == "released" for r in _records(state))


@pytest.mark.slow
def test_sigkill_mid_change_leaves_a_consistent_state(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    rng = random.Random(7)
    trials = 25
    for trial in range(trials):
        p = subprocess.Popen(
            [sys.executable, "-m", "tests._crash_worker", str(state), str(trial)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        p.stdout.close()
        records = _records(state)
        _check_capacity(records)
        ids = [r.get("request_id") for r in records if r.get("request_id") and r["state"] != "released"]
        assert len(ids) == len(set(ids))
    print(f"sigkill trials: {trials}, records at end: {len(_records(state))}")


async def test_state_survives_a_restart(tmp_path: Path) -> None:
    state = tmp_path / "s.db"
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), state) as mgr:
        g = await mgr.allocate_compute_group("keep", {"gpus": 2}, {"request_id": "k"})
    assert oct(state.stat().st_mode & 0o777) == "0o600"
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), state) as mgr:
        again = await mgr.get_compute_group(g.id)
        assert again.resources == g.resources and again.component == "keep"
        assert (await mgr.allocate_compute_group("keep", {"gpus": 2}, {"request_id": "k"})).id == g.id
        assert (await mgr.get_allocation_summary())["allocated_gpus"] == 2


async def test_records_orjson_refuses_still_round_trip_exactly(tmp_path: Path) -> None:
    """Records are written and read with orjson; what it refuses (an integer beyond 64 bits; ``NaN``
    and non-ASCII text in a body another writer made) goes through the standard library unchanged."""
    state = tmp_path / "s.db"
    store = SqliteStateStore(state)
    await store.open()
    big = GroupRecord("big", "n0", AllocationState.ALLOCATED, "c", (), requirements={"tag": 2**70, "name": "ünï"})
    plain = GroupRecord("plain", "n0", AllocationState.ALLOCATED, "c", (), constraints={"labels": {"zone": "é"}})
    await store.commit(0, [big, plain])
    await store.close()
    conn = sqlite3.connect(state)
    body = json.dumps({"id": "nan", "node_id": "n0", "state": "allocated", "devices": [], "requirements": {"x": 1.5}})
    conn.execute("INSERT INTO groups(id, rev, body) VALUES ('nan', 1, ?)", (body.replace("1.5", "NaN"),))
    conn.commit()
    conn.close()
    again = SqliteStateStore(state)
    await again.open()
    try:
        read = {r.id: r for r in (await again.changes_since(0)).upserts}
    finally:
        await again.close()
    assert read["big"] == big and read["plain"] == plain
    assert math.isnan(read["nan"].requirements["x"])


async def test_a_file_that_is_not_sqlite_is_refused_and_kept(tmp_path: Path) -> None:
    state = tmp_path / "s.db"
    state.write_bytes(b"this is not a database, it is someone's notes\n" * 100)
    before = state.read_bytes()
    with pytest.raises(StateError):
        async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), state):
            pass
    assert state.read_bytes() == before


async def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s.db"
    conn = sqlite3.connect(state)
    conn.execute("CREATE TABLE invoices (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="not a computegroups state file"):
        async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), state):
            pass
    conn = sqlite3.connect(state)
    assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")] == ["invoices"]
    conn.close()


async def test_a_future_schema_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "s.db"
    store = SqliteStateStore(state)
    await store.open()
    await store.close()
    conn = sqlite3.connect(state)
    conn.execute("UPDATE computegroups_meta SET value='computegroups/99' WHERE key='schema'")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="schema"):
        await SqliteStateStore(state).open()


async def test_a_corrupt_record_is_a_state_error(tmp_path: Path) -> None:
    state = tmp_path / "s.db"
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), state) as mgr:
        await mgr.allocate_compute_group("c", {"gpus": 1})
    conn = sqlite3.connect(state)
    conn.execute("UPDATE groups SET body='{\"id\": 1'")
    conn.commit()
    conn.close()
    with pytest.raises(StateError, match="unreadable"):
        async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), state):
            pass


async def test_default_path_honours_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from computegroups.state.sqlite import default_state_path

    monkeypatch.delenv("COMPUTEGROUPS_STATE", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_state_path() == tmp_path / "xdg" / "computegroups" / "state.db"
    monkeypatch.setenv("COMPUTEGROUPS_STATE", str(tmp_path / "explicit.db"))
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC)) as mgr:
        await mgr.allocate_compute_group("c", {"gpus": 1})
    assert (tmp_path / "explicit.db").exists()


_OPEN_AT = """
import asyncio, sys, time
from computegroups.state.sqlite import SqliteStateStore
while time.time() < float(sys.argv[2]):
    pass
async def main() -> None:
    store = SqliteStateStore(sys.argv[1])
    await store.open()
    await store.close()
asyncio.run(main())
"""


def test_processes_opening_a_new_file_together_all_succeed(tmp_path: Path) -> None:
    # Switching a new file to WAL needs an exclusive lock that SQLite refuses at once, not after its
    # busy timeout, when several processes open the file together; the store waits its turn instead.
    for trial in range(10):
        state = tmp_path / f"state{trial}.db"
        at = str(time.time() + 0.5)
        procs = [
            subprocess.Popen([sys.executable, "-c", _OPEN_AT, str(state), at], cwd=REPO, stderr=subprocess.PIPE)
            for _ in range(8)
        ]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 0, err.decode()[-500:]
