"""A state file knows what it is: damaged, foreign or unusable files are refused, byte for byte unchanged.

Every case is a real SQLite file (or a real path) damaged the way a person, a disk or another program
would; opening it through a manager must raise StateError naming the file, and leave it as it was.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider, StateError
from computegroups.model import AllocationState, DeviceShare, GroupRecord
from computegroups.state.sqlite import APPLICATION_ID, FORMAT, SCHEMA, SqliteStateStore
from tests._sqlite_worker import SPEC

OTHER_SPEC = {"nodes": [{"id": "elsewhere", "preset": "dgx-h100"}]}


def _provider(spec: dict[str, object] = SPEC) -> SimulatedComputeResourceProvider:
    return SimulatedComputeResourceProvider.from_spec(spec)


async def _make(path: Path, groups: int = 3) -> list[str]:
    """A valid state file with a few held and released groups; the ids of the held ones."""
    async with ComputeGroupManager(_provider(), path) as mgr:
        held = [(await mgr.allocate_compute_group(f"c{n}", {"gpus": 1})).id for n in range(groups)]
        await mgr.deallocate_compute_group(held.pop())
    return held


def _sql(*statements: str) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        conn = sqlite3.connect(path)
        try:
            for s in statements:
                conn.execute(s)
            conn.commit()
        finally:
            conn.close()

    return damage


def _replace(data: bytes) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        path.write_bytes(data)

    return damage


def _truncate(size: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with open(path, "r+b") as f:
            f.truncate(size)

    return damage


def _scribble(path: Path) -> None:
    """Overwrite the second page (the meta table's) with garbage, as a bad disk would."""
    with open(path, "r+b") as f:
        f.seek(4096 + 8)
        f.write(os.urandom(512))


def _foreign(path: Path) -> None:
    path.unlink()
    _sql("CREATE TABLE invoices (id INTEGER, total REAL)", "INSERT INTO invoices VALUES (1, 9.5)")(path)


def _tables_dropped(path: Path) -> None:
    path.unlink()
    _sql("CREATE TABLE scratch (x)", "DROP TABLE scratch")(path)  # a SQLite file with pages but no tables


def _other_cluster(path: Path) -> None:
    path.unlink()

    async def make() -> None:
        async with ComputeGroupManager(_provider(OTHER_SPEC), path) as mgr:
            await mgr.allocate_compute_group("x", {"gpus": 8})

    thread = threading.Thread(target=asyncio.run, args=(make(),))  # the test's own loop is running
    thread.start()
    thread.join()


# (what, damage); every one must give StateError and leave the file's bytes as they were.
DAMAGE: list[tuple[str, Callable[[Path], None]]] = [
    ("revision row deleted", _sql("DELETE FROM computegroups_meta WHERE key='revision'")),
    ("schema row deleted", _sql("DELETE FROM computegroups_meta WHERE key='schema'")),
    ("log_start row deleted", _sql("DELETE FROM computegroups_meta WHERE key='log_start'")),
    ("cluster row deleted", _sql("DELETE FROM computegroups_meta WHERE key='cluster'")),
    ("every meta row deleted", _sql("DELETE FROM computegroups_meta")),
    ("an unknown meta row", _sql("INSERT INTO computegroups_meta VALUES ('owner', 'me')")),
    ("revision not a number", _sql("UPDATE computegroups_meta SET value='seven' WHERE key='revision'")),
    ("revision negative", _sql("UPDATE computegroups_meta SET value='-1' WHERE key='revision'")),
    ("revision stored as a blob", _sql("UPDATE computegroups_meta SET value=x'34' WHERE key='revision'")),
    ("revision behind its records", _sql("UPDATE computegroups_meta SET value='1' WHERE key='revision'")),
    ("log_start beyond revision", _sql("UPDATE computegroups_meta SET value='999' WHERE key='log_start'")),
    ("schema from the future", _sql("UPDATE computegroups_meta SET value='computegroups/99' WHERE key='schema'")),
    ("groups table dropped", _sql("DROP TABLE groups")),
    ("deletions table dropped", _sql("DROP TABLE deletions")),
    ("meta table dropped", _sql("DROP TABLE computegroups_meta")),
    ("an index dropped", _sql("DROP INDEX groups_rev")),
    ("an extra table", _sql("CREATE TABLE notes (x TEXT)")),
    ("a trigger added", _sql("CREATE TRIGGER t AFTER INSERT ON groups BEGIN DELETE FROM groups; END")),
    ("groups redefined", _sql("DROP TABLE groups", "CREATE TABLE groups (id TEXT, rev, body)")),
    ("future user_version", _sql(f"PRAGMA user_version={FORMAT + 1}")),
    ("no user_version", _sql("PRAGMA user_version=0")),
    ("another program's application_id", _sql("PRAGMA application_id=1234")),
    ("numeric record id", _sql("UPDATE groups SET body=json_set(body, '$.id', 1)")),
    ("record id not its row's", _sql("UPDATE groups SET body=json_set(body, '$.id', 'cg-other')")),
    ("bad JSON in a record", _sql("UPDATE groups SET body='{\"id\": 1'")),
    ("a record that is a JSON list", _sql("UPDATE groups SET body='[1, 2]'")),
    ("a record with an unknown state", _sql("UPDATE groups SET body=json_set(body, '$.state', 'stolen')")),
    ("a record with malformed devices", _sql("UPDATE groups SET body=json_set(body, '$.devices', json('[[1]]'))")),
    ("a record whose node is a number", _sql("UPDATE groups SET body=json_set(body, '$.node_id', 5)")),
    ("a record revision that is text", _sql("UPDATE groups SET rev='x'")),
    ("a record body that is a blob", _sql("UPDATE groups SET body=CAST(body AS BLOB)")),
    ("a deletion log row with a text revision", _sql("INSERT INTO deletions VALUES ('cg-x', 'soon')")),
    ("a node mark whose node is a blob", _sql("INSERT INTO cordons VALUES (x'35', 1, 'x')")),
    ("a node mark beyond the revision", _sql("INSERT INTO cordons VALUES ('a', 999, 'x')")),
    ("a node mark whose reason is a blob", _sql("INSERT INTO cordons VALUES ('a', 1, x'00')")),
    ("node marks table dropped", _sql("DROP TABLE cordons")),
    ("another program's SQLite database", _foreign),
    ("a SQLite database without tables", _tables_dropped),
    ("a file that is not SQLite", _replace(b"these are someone's notes, not a database\n" * 200)),
    ("binary garbage", _replace(os.urandom(8192))),
    ("truncated to half", lambda p: _truncate(p.stat().st_size // 2)(p)),
    ("truncated inside the header", _truncate(60)),
    ("an empty file", _truncate(0)),
    ("a page overwritten with garbage", _scribble),
    ("made for another cluster", _other_cluster),
]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_table_is_big_enough() -> None:
    assert len(DAMAGE) >= 15


@pytest.mark.parametrize(("what", "damage"), DAMAGE, ids=[d[0] for d in DAMAGE])
async def test_damage_is_refused_and_the_file_is_unchanged(
    tmp_path: Path, what: str, damage: Callable[[Path], None]
) -> None:
    path = tmp_path / "state.db"
    await _make(path)
    damage(path)
    assert not Path(f"{path}-wal").exists()
    before = _sha(path)
    with pytest.raises(StateError) as info:
        async with ComputeGroupManager(_provider(), path):
            pass
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    assert _sha(path) == before, f"{what}: the file was changed"
    wal = Path(f"{path}-wal")  # a read-only look at a WAL database leaves SQLite's empty -wal beside it
    assert not wal.exists() or wal.stat().st_size == 0, "something was written"


@pytest.mark.parametrize(
    ("what", "make"),
    [
        ("a directory", lambda p: p.mkdir()),
        ("a path below a regular file", None),
        ("a named pipe", lambda p: os.mkfifo(p)),
        ("a dangling symbolic link", lambda p: p.symlink_to(p.parent / "nowhere" / "x.db")),
    ],
)
async def test_unusable_paths_are_refused(tmp_path: Path, what: str, make: Callable[[Path], None] | None) -> None:
    path = tmp_path / "state.db"
    if make is None:
        (tmp_path / "afile").write_text("x")
        path = tmp_path / "afile" / "state.db"
    else:
        make(path)
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(StateError) as info:
        async with ComputeGroupManager(_provider(), path):
            pass
    assert str(path) in str(info.value)
    assert sorted(os.listdir(tmp_path)) == listing


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
async def test_an_unreadable_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await _make(path)
    before = _sha(path)
    path.chmod(0)
    try:
        with pytest.raises(StateError, match="cannot"):
            async with ComputeGroupManager(_provider(), path):
                pass
    finally:
        path.chmod(0o600)
    assert _sha(path) == before


async def test_a_damaged_revision_stops_both_managers(tmp_path: Path) -> None:
    """With the revision row gone, no manager may hand out a GPU: not on open, not while running."""
    path = tmp_path / "state.db"
    await _make(path, groups=1)
    async with (
        ComputeGroupManager(_provider(), path) as a,
        ComputeGroupManager(_provider(), path) as b,
    ):
        await a.allocate_compute_group("a", {"gpus": 8})
        _sql("DELETE FROM computegroups_meta WHERE key='revision'")(path)
        for mgr in (a, b):
            with pytest.raises(StateError, match="revision"):
                await mgr.allocate_compute_group("thief", {"gpus": 8})
    for _ in range(2):
        with pytest.raises(StateError, match="revision"):
            async with ComputeGroupManager(_provider(), path):
                pass
    conn = sqlite3.connect(path)
    owners = [r for (r,) in conn.execute("SELECT body FROM groups WHERE body LIKE '%thief%'")]
    conn.close()
    assert owners == []


async def test_a_file_is_bound_to_the_cluster_that_made_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    await _make(path)
    with pytest.raises(StateError) as info:
        async with ComputeGroupManager(_provider(OTHER_SPEC), path):
            pass
    mine = _provider().cluster_identity(await _provider().discover_resources())
    other = _provider(OTHER_SPEC).cluster_identity(await _provider(OTHER_SPEC).discover_resources())
    assert mine != other and mine in str(info.value) and other in str(info.value)
    async with ComputeGroupManager(_provider(), path) as mgr:  # its own cluster still opens it
        assert (await mgr.get_allocation_summary())["allocated_gpus"] == 2


async def test_a_file_made_without_a_binding_is_bound_by_the_first_manager(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    await store.open()
    await store.close()
    async with ComputeGroupManager(_provider(), path):
        pass
    with pytest.raises(StateError, match="belongs to cluster"):
        async with ComputeGroupManager(_provider(OTHER_SPEC), path):
            pass


def _modes(path: Path) -> dict[str, str]:
    return {p.name: oct(p.stat().st_mode & 0o777) for p in path.parent.iterdir()}


async def test_the_file_and_its_wal_are_private_from_the_first_byte(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    old = os.umask(0)  # a permissive umask must not matter
    try:
        async with ComputeGroupManager(_provider(), path) as mgr:
            await mgr.allocate_compute_group("c", {"gpus": 1})
            modes = _modes(path)
    finally:
        os.umask(old)
    assert modes == {"state.db": "0o600", "state.db-wal": "0o600", "state.db-shm": "0o600"}
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("PRAGMA user_version").fetchone()[0] == FORMAT
    assert dict(conn.execute("SELECT key, value FROM computegroups_meta"))["schema"] == SCHEMA
    conn.close()


def test_processes_creating_one_file_at_once_share_it(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    errors: list[BaseException] = []
    revisions: list[int] = []
    start = threading.Barrier(8)

    def open_and_commit(n: int) -> None:
        async def go() -> None:
            store = SqliteStateStore(path)
            store.bind("test:cluster")
            start.wait()
            await store.open()
            try:
                while True:
                    rev = (await store.changes_since(-1)).revision
                    record = GroupRecord(f"g{n}", "a", AllocationState.ALLOCATED, "c", (DeviceShare(n, "u", 1000, 1),))
                    try:
                        revisions.append(await store.commit(rev, [record]))
                        return
                    except StateError:
                        raise
                    except Exception:  # lost the race: try again
                        continue
            finally:
                await store.close()

        try:
            asyncio.run(go())
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_and_commit, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(revisions) == list(range(1, 9))
    assert sorted(os.listdir(tmp_path)) == ["state.db"]  # no temporary file left behind


def _legacy(path: Path) -> None:
    """A state file as computegroups 0.1.0 wrote it."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE IF NOT EXISTS computegroups_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    conn.execute("CREATE TABLE IF NOT EXISTS groups (id TEXT PRIMARY KEY, rev INTEGER NOT NULL, body TEXT NOT NULL)")
    conn.execute("CREATE INDEX IF NOT EXISTS groups_rev ON groups(rev)")
    conn.execute("CREATE TABLE IF NOT EXISTS deletions (id TEXT NOT NULL, rev INTEGER NOT NULL)")
    conn.execute("CREATE INDEX IF NOT EXISTS deletions_rev ON deletions(rev)")
    conn.executemany(
        "INSERT INTO computegroups_meta VALUES (?, ?)",
        [("schema", "computegroups/1"), ("revision", "1"), ("log_start", "0")],
    )
    body = (
        '{"id":"cg-old","node_id":"a","state":"allocated","component":"old","devices":[[0,"u",1000,49140]],'
        '"cpus_milli":0,"memory_mib":0,"request_id":null,"carved":false,"requirements":{"gpus":1},'
        '"constraints":{"strategy":"binpack"},"created_at":1.0,"updated_at":1.0}'
    )
    conn.execute("INSERT INTO groups VALUES ('cg-old', 1, ?)", (body,))
    conn.close()


async def test_a_file_from_0_1_0_is_adopted_in_place(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _legacy(path)
    async with ComputeGroupManager(_provider(), path) as mgr:
        assert (await mgr.get_compute_group("cg-old")).component == "old"
        await mgr.allocate_compute_group("new", {"gpus": 1})
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    meta = dict(conn.execute("SELECT key, value FROM computegroups_meta"))
    conn.close()
    assert meta["schema"] == SCHEMA and meta["cluster"].startswith("simulated:")
    with pytest.raises(StateError, match="belongs to cluster"):
        async with ComputeGroupManager(_provider(OTHER_SPEC), path):
            pass


async def test_a_0_1_0_file_with_damage_is_refused_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    _legacy(path)
    _sql("DELETE FROM computegroups_meta WHERE key='revision'")(path)
    before = _sha(path)
    with pytest.raises(StateError, match="revision"):
        async with ComputeGroupManager(_provider(), path):
            pass
    assert _sha(path) == before


async def test_an_open_store_can_be_bound_and_still_refuses_another_cluster(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = SqliteStateStore(path)
    await store.open()  # opened first, as a benchmark that fills the store before the manager does
    async with ComputeGroupManager(_provider(), store) as mgr:
        await mgr.allocate_compute_group("c", {"gpus": 1})
    other = SqliteStateStore(path)
    await other.open()
    try:
        with pytest.raises(StateError, match="belongs to cluster"):
            other.bind("simulated:another")
    finally:
        await other.close()
