"""Another process sees exactly what each commit changed, read incrementally, also once the deletion log is pruned."""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

from computegroups.model import AllocationState, DeviceShare, GroupRecord
from computegroups.state.base import Changes
from computegroups.state.sqlite import SqliteStateStore

REPO = Path(__file__).resolve().parents[1]


class Reader:
    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests._changes_reader", str(path)],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.revision = self._answer()["revision"]

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the reader died"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=60) == 0


def _record(n: int, rng: random.Random, at: float) -> GroupRecord:
    return GroupRecord(
        f"g{n}",
        rng.choice(["a", "h"]),
        AllocationState.ALLOCATED,
        f"c{n % 3}",
        (DeviceShare(rng.randrange(8), f"GPU-{n}", 1000, 1),),
        created_at=at,
        updated_at=at,
    )


def _log_start(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("SELECT value FROM computegroups_meta WHERE key='log_start'").fetchone()[0])
    finally:
        conn.close()


async def test_a_reader_in_another_process_sees_exactly_each_commit(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    rng = random.Random(5)
    writer = SqliteStateStore(path, log_limit=8)  # a short deletion log, pruned many times below
    await writer.open()
    state: dict[str, GroupRecord] = {}
    revision = 0
    made = 0

    async def change() -> tuple[dict[str, Any], list[str]]:
        """One commit of a random change set: new records, changed ones, deleted ones."""
        nonlocal revision, made
        ups: list[GroupRecord] = []
        for _ in range(rng.randrange(0, 3)):
            ups.append(_record(made, rng, float(revision)))
            made += 1
        others = sorted(set(state) - {r.id for r in ups})
        changed = rng.sample(others, min(len(others), rng.randrange(0, 2)))
        ups += [state[g].replace(state=AllocationState.RELEASED, updated_at=float(revision)) for g in changed]
        left = sorted(set(others) - set(changed))
        deletes = rng.sample(left, min(len(left), rng.randrange(0, 3))) if len(left) > 4 else []
        if not ups and not deletes:
            ups.append(_record(made, rng, float(revision)))
            made += 1
        revision = await writer.commit(revision, ups, deletes)
        for r in ups:
            state[r.id] = r
        for g in deletes:
            del state[g]
        return {r.id: r.to_json() for r in ups}, sorted(deletes)

    reader = Reader(path)
    try:
        rows = 0
        pruned_while_following = 0
        for _ in range(300):
            ups, dels = await change()
            got = reader.ask("read")
            assert (got["from"], got["revision"], got["full"]) == (revision - 1, revision, False)
            assert got["upserts"] == ups and got["deletes"] == dels
            rows += len(ups) + len(dels)
            # no full reload, and not one row read that this commit did not change
            assert got["stats"]["full_reads"] == 0 and got["stats"]["rows_read"] == rows
            pruned_while_following = max(pruned_while_following, _log_start(path))
        assert pruned_while_following > 100  # the log was pruned under the reader many times
        assert got["stats"]["reads"] == 300
        expected = {g: r.to_json() for g, r in state.items()}
        assert reader.ask("state")["records"] == expected

        # A reader that fell behind the pruned horizon gets everything, once, and is right again.
        behind = revision
        for _ in range(40):
            await change()
        assert _log_start(path) > behind
        got = reader.ask("read")
        assert got["full"] and got["revision"] == revision
        assert got["stats"]["full_reads"] == 1
        assert got["upserts"] == {g: r.to_json() for g, r in state.items()}
        assert reader.ask("state")["records"] == {g: r.to_json() for g, r in state.items()}

        # and follows incrementally again from there
        ups, dels = await change()
        got = reader.ask("read")
        assert not got["full"] and got["upserts"] == ups and got["deletes"] == dels
        assert got["stats"]["full_reads"] == 1
    finally:
        reader.close()
        await writer.close()


async def test_waiting_for_another_writer_leaves_the_event_loop_free(tmp_path: Path) -> None:
    """While another connection holds the write lock, a commit waits without stalling other coroutines."""
    import asyncio

    path = tmp_path / "state.db"
    store = SqliteStateStore(path, busy_timeout_s=20)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        record = _record(0, random.Random(1), 0.0)
        commit = asyncio.ensure_future(store.commit(0, [record]))
        ticks = 0
        while ticks < 20:  # this coroutine runs while the commit waits; a blocked loop would never get here
            await asyncio.sleep(0.001)
            ticks += 1
        assert not commit.done()
        other.execute("COMMIT")  # released by a coroutine on the same loop
        assert await commit == 1
        assert store.stats["busy_waits"] > 0
        assert [r.id for r in (await store.changes_since(0)).upserts] == [record.id]
    finally:
        other.close()
        await store.close()


_OTHER_WRITER = """
import asyncio, sys
from computegroups.model import AllocationState, DeviceShare, GroupRecord
from computegroups.state.sqlite import SqliteStateStore

async def main(path, gid):
    store = SqliteStateStore(path)
    await store.open()
    try:
        rev = (await store.changes_since(-1)).revision
        record = GroupRecord(gid, "h", AllocationState.ALLOCATED, "other", (DeviceShare(7, "GPU-o", 1000, 1),))
        print(await store.commit(rev, [record]))
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


async def test_a_writer_sees_another_processs_commit_right_after_its_own(tmp_path: Path) -> None:
    """A writer does not read its own commits back, yet the next catch-up after one still returns
    exactly what another process committed in between (and nothing when nobody did)."""
    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    await store.open()
    rng = random.Random(3)
    try:
        revision = (await store.changes_since(-1)).revision
        for n in range(5):
            revision = await store.commit(revision, [_record(n, rng, float(n))])
            assert await store.changes_since(revision) == Changes(revision)  # its own: nothing new
            out = subprocess.run(
                [sys.executable, "-c", _OTHER_WRITER, str(path), f"o{n}"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert int(out.stdout) == revision + 1
            changes = await store.changes_since(revision)
            assert (changes.revision, [r.id for r in changes.upserts], changes.full) == (revision + 1, [f"o{n}"], False)
            revision = changes.revision
            assert await store.changes_since(revision) == Changes(revision)
    finally:
        await store.close()


async def test_the_wal_is_checkpointed_off_the_commit_path_and_stays_short(tmp_path: Path) -> None:
    """Commits never checkpoint (the store's own thread does); a long burst of commits leaves a WAL of
    bounded length, rewound from its start, and every commit is in the file once the store is closed."""
    import asyncio

    from computegroups.state import sqlite as module

    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    await store.open()
    rng = random.Random(4)
    page = 4096
    try:
        assert store.conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        revision = 0
        longest = 0
        for n in range(30 * module._CHECKPOINT_EVERY):
            revision = await store.commit(revision, [_record(n % 500, rng, float(n))])
            if n % 50 == 0:
                await asyncio.sleep(0)
                longest = max(longest, (path.with_name(path.name + "-wal").stat().st_size - 32) // (page + 24))
        checkpointer = store._checkpointer
        assert checkpointer is not None and checkpointer.rounds > 0
        # Unchecked, 6,000 commits of about 4 pages each would make a WAL of over 20,000 pages.
        assert longest < 2 * module._RESTART_PAGES
    finally:
        await store.close()
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("SELECT value FROM computegroups_meta WHERE key='revision'").fetchone()[0] == str(revision)
        assert conn.execute("SELECT COUNT(*) FROM groups").fetchone()[0] == 500
    finally:
        conn.close()
