"""The durable event log: every change (in its own commit) and every refusal, read by any process."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from computegroups import (
    ComputeGroupManager,
    InsufficientResourcesError,
    MemoryStateStore,
    SimulatedComputeResourceProvider,
)
from computegroups.events import Event
from computegroups.state.base import EVENT_LIMIT, EventLog
from computegroups.state.sqlite import FORMAT, SCHEMA, SqliteStateStore

REPO = Path(__file__).resolve().parents[1]
SPEC = {"nodes": [{"id": "box", "gpus": 4, "gpu": {"model": "GPU", "memory_mib": 16384}, "cpus": 16}]}


def cg(state: Path, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "computegroups", "--simulate", "--state", str(state), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120, **kw)  # type: ignore[call-overload]


@pytest.mark.parametrize("kind", ["sqlite", "memory"])
async def test_changes_and_refusals_are_in_the_log(kind: str, tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db") if kind == "sqlite" else MemoryStateStore()
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), store) as mgr:
        before = time.time()
        g = await mgr.allocate_compute_group("decode", {"gpus": 2})
        with pytest.raises(InsufficientResourcesError):
            await mgr.allocate_compute_group("big", {"gpus": 4})
        await mgr.drain_compute_group(g.id)
        await mgr.deallocate_compute_group(g.id)
        await mgr._events.drain()
        assert isinstance(store, EventLog)
        log = await store.events_since(0)
        later = await store.events_since(2)
    assert [e.kind for e in log] == ["allocated", "refused", "drained", "released"]
    assert [e.seq for e in log] == [1, 2, 3, 4]
    assert all(before <= e.at <= time.time() for e in log)
    assert log[0].group_id == g.id and log[0].component == "decode" and log[0].node_id == "box"
    assert log[1].component == "big" and "InsufficientResourcesError" in log[1].detail
    assert [e.kind for e in later] == ["drained", "released"]


async def test_a_change_and_its_event_are_one_commit(tmp_path: Path) -> None:
    """The event of a change is written in the transaction that writes the change: never one without the other."""
    path = tmp_path / "s.db"
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), path) as mgr:
        for n in range(5):
            await mgr.allocate_compute_group(f"c{n % 2}", {"gpus": 0.5})
        revision = mgr.revision
    conn = sqlite3.connect(path)
    try:
        kinds = [json.loads(b)["kind"] for (b,) in conn.execute("SELECT body FROM events ORDER BY seq")]
        groups = conn.execute("SELECT COUNT(*) FROM groups").fetchone()[0]
    finally:
        conn.close()
    assert kinds == ["allocated"] * 5 == ["allocated"] * groups and revision == 5


async def test_the_log_is_bounded(tmp_path: Path) -> None:
    store = SqliteStateStore(tmp_path / "s.db")
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), store):
        for n in range(EVENT_LIMIT // 100 + 5):
            await store.record([Event("note", None, None, None, f"{n}.{i}") for i in range(100)])
        kept = await store.events_since(0, limit=2 * EVENT_LIMIT)
    assert EVENT_LIMIT <= len(kept) <= EVENT_LIMIT + 356
    assert kept[-1].detail == f"{EVENT_LIMIT // 100 + 4}.99" and kept[-1].seq == (EVENT_LIMIT // 100 + 5) * 100


def test_events_are_read_by_another_process_with_watch(tmp_path: Path) -> None:
    """``computegroups events --watch`` in one process sees what a second one allocates, with times."""
    state = tmp_path / "s.db"
    assert cg(state, "summary").returncode == 0  # the state file exists
    cmd = [
        sys.executable,
        "-m",
        "computegroups",
        "--simulate",
        "--state",
        str(state),
        "events",
        "--watch",
        "-o",
        "json",
    ]
    watch = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        made = cg(state, "--json", "allocate", "decode", "--gpus", "2")
        assert made.returncode == 0, made.stderr
        group = json.loads(made.stdout)
        assert cg(state, "allocate", "huge", "--gpus", "999").returncode == 3
        assert watch.stdout is not None
        first, second = json.loads(watch.stdout.readline()), json.loads(watch.stdout.readline())
        assert (first["kind"], first["group_id"], first["component"]) == ("allocated", group["id"], "decode")
        assert second["kind"] == "refused" and second["component"] == "huge" and second["at"] >= first["at"]
    finally:
        watch.kill()
        watch.wait()
    table = cg(state, "events", "--since", "10m").stdout.splitlines()
    assert len(table) == 2 and table[0].split()[2] == "allocated" and table[0][:2] == "20"
    assert cg(state, "events", "--since", "1", "-o", "json").stdout.count("\n") == 1
    assert cg(state, "events", "--component", "decode").stdout.count("\n") == 1
    bad = cg(state, "events", "--since", "yesterday")
    assert bad.returncode == 2 and "--since" in bad.stderr and len(bad.stderr.splitlines()) == 1
    missing = cg(tmp_path / "none.db", "events")
    assert missing.returncode == 2 and "--state" in missing.stderr and not (tmp_path / "none.db").exists()


@pytest.mark.parametrize(("version", "dropped"), [(2, ("events", "cordons")), (3, ("cordons",))])
async def test_an_older_file_is_adopted_with_the_tables_it_lacks(
    tmp_path: Path, version: int, dropped: tuple[str, ...]
) -> None:
    path = tmp_path / "s.db"
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), path) as mgr:
        g = await mgr.allocate_compute_group("keep", {"gpus": 1})
    conn = sqlite3.connect(path)  # as an earlier version wrote it: format 2 (no event log), 3 (no node marks)
    for table in dropped:
        conn.execute(f"DROP TABLE {table}")
    conn.execute(f"UPDATE computegroups_meta SET value='computegroups/{version}' WHERE key='schema'")
    conn.execute(f"PRAGMA user_version={version}")
    conn.commit()
    conn.close()
    async with ComputeGroupManager(SimulatedComputeResourceProvider.from_spec(SPEC), path) as mgr:
        assert (await mgr.get_compute_group(g.id)).component == "keep"
        await mgr.deallocate_compute_group(g.id)
        assert await mgr.cordon_node("box", "maintenance")
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT == 4
        assert dict(conn.execute("SELECT key, value FROM computegroups_meta"))["schema"] == SCHEMA
        kinds = [json.loads(b)["kind"] for (b,) in conn.execute("SELECT body FROM events")]
        assert kinds[-2:] == ["released", "cordoned"] and (version == 3 or len(kinds) == 2)
        assert conn.execute("SELECT node_id, reason FROM cordons").fetchall() == [("box", "maintenance")]
    finally:
        conn.close()


async def test_health_and_worker_events_reach_the_log(tmp_path: Path) -> None:
    provider = SimulatedComputeResourceProvider.from_spec(SPEC)
    store = SqliteStateStore(tmp_path / "s.db")
    async with ComputeGroupManager(provider, store) as mgr:
        provider.set_health("box", 1, False, "Xid 79")
        await mgr.refresh_health()
        mgr.emit(Event("worker-exited", "cg-x", "box", "decode", "exit 1"))
        await asyncio.sleep(0)
        await mgr._events.drain()
        kinds = [(e.kind, e.detail) for e in await store.events_since(0)]
    assert ("device-unhealthy", "GPU 1: Xid 79") in kinds and ("worker-exited", "exit 1") in kinds
