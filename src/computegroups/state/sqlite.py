"""The embedded default state store: one SQLite file, safe across processes.

WAL journal, one short ``BEGIN IMMEDIATE`` transaction per commit (so the
revision check and the write happen under SQLite's write lock) that moves the
revision on by compare-and-swap and writes only the changed rows, with cached
(prepared) statements; ``synchronous=NORMAL`` by default: a committed change
survives a crash of any process; ``durable=True`` selects ``synchronous=FULL`` to
survive power loss as well, at an fsync per commit.

Reading what others changed (:meth:`SqliteStateStore.changes_since`) reads only
the rows written after the caller's revision (through the ``groups_rev`` index,
the change log revision -> ids) and the deletion log after it. The deletion log
is pruned to its newest half once it outgrows ``log_limit``; ``log_start`` in
the meta rows records the cut, and a reader whose revision is older gets every
record (``full``), which is correct however far behind it fell. A connection
does not read its own commits back: while ``revision`` is the one it last
committed or read, and ``PRAGMA data_version`` (which moves only when another
connection commits) reads as it did then, nothing changed and nothing is read;
otherwise the revision and the changes are read in one read transaction.

Nothing waits by blocking the event loop: after opening, the connection's busy
timeout is 0, and a lock another process holds is waited for by pausing
asynchronously (0.5 ms, doubling to 2 ms, jittered) until ``busy_timeout_s``,
then :class:`StateError`. :meth:`SqliteStateStore.lock` takes the write lock
before a catch-up, so the decision that follows cannot lose the race (the
manager uses it for a retry).

No commit checkpoints the WAL (``wal_autocheckpoint=0``): a thread of the store's
own, with a connection of its own, runs a ``PASSIVE`` checkpoint every
:data:`_CHECKPOINT_EVERY` commits, so a checkpoint's copying and its fsyncs (which
keep a ``synchronous=NORMAL`` file consistent across power loss) are in no
commit's time. Writers keep appending while it copies, so once the WAL is
:data:`_RESTART_PAGES` long the thread follows with a ``RESTART`` checkpoint of the
short tail, taking the write lock for it (a commit waits for that as for another
process, never for a reader: the checkpoint does not wait while holding the lock),
and the next commit writes the WAL from its start again.

A record is stored as a JSON object of its fields, those at their default
values left out; :meth:`GroupRecord.from_json` fills them in. Format 3 adds the
event log (``events``: every change's events, written in the commit that makes
the change, and refusals and health on their own; the newest
:data:`~computegroups.state.base.EVENT_LIMIT` kept). Format 4 adds the node marks
(``cordons``: a node an operator cordoned, with the reason and the revision of
the change; an uncordoned node keeps its row, reason NULL, so a reader sees the
change). Older files are adopted in place by adding the missing tables, under
the write lock.

A state file knows what it is. Its header carries :data:`APPLICATION_ID` and the
format version :data:`FORMAT` (``user_version``); its meta table the schema, the
revision, the start of the deletion log and the identity of the cluster it was
made for. Opening a file first inspects it through a read-only connection: the
header, ``PRAGMA quick_check``, the exact tables and indexes, every meta row and
its type, and every record. Anything else raises :class:`StateError` naming the
file and what is wrong, and the file is left byte for byte as it was (no WAL
switch, no table created). The store never resets, repairs or initialises a file
it did not create:

* a missing file is created whole: the database is built in a private temporary
  file (mode 0600 from its first byte, so its WAL and shared-memory files, which
  SQLite creates with the database's mode, are 0600 too) and hard-linked into
  place, so no process ever sees a half-made state file, and two processes
  creating one at once end up sharing the one that was linked first;
* an existing empty (0-byte) file, or a SQLite database without tables, is
  refused, never initialised: computegroups never leaves one behind, so it is
  someone else's;
* a file written by computegroups 0.1.0 (no application id, format 0, schema
  ``computegroups/1``, the same tables) passes the same checks and is then
  stamped with the application id and format in place.

:meth:`SqliteStateStore.bind` names the cluster the caller manages (the manager
binds its provider's :meth:`~computegroups.providers.base.ComputeResourceProvider.cluster_identity`).
A file records the identity of the first cluster bound to it and refuses any
other, so a state file made on a simulated cluster cannot count allocations on a
real machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import quote

import orjson

from computegroups.errors import StateError
from computegroups.events import Event
from computegroups.model import AllocationState, GroupRecord
from computegroups.state.base import EVENT_LIMIT, NO_CORDONS, Changes, Cordons, RevisionConflict

__all__ = ["APPLICATION_ID", "FORMAT", "SCHEMA", "SqliteStateStore", "default_state_path"]

log = logging.getLogger("computegroups.state")

#: ``PRAGMA application_id`` of a computegroups state file ("CGst").
APPLICATION_ID = 0x43477374
#: ``PRAGMA user_version``: the file format this version reads and writes.
FORMAT = 4
SCHEMA = "computegroups/4"
_OLDER_SCHEMAS = {2: "computegroups/2", 3: "computegroups/3"}  # adopted in place (missing tables added)
_LEGACY_SCHEMA = "computegroups/1"  # computegroups 0.1.0: no application id, user_version 0
_DELETION_LOG_LIMIT = 100_000
_BACKOFF_S = (0.0005, 0.002)  # first and longest pause, jittered, while another process holds the write lock
_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED (primary codes)
_CHECKPOINT_EVERY = 200  # own commits (about 1,000 WAL pages) between background checkpoints
_RESTART_PAGES = 4096  # a WAL this long is checkpointed whole (writers paused) so the next commit rewinds it
_RESTART_TRIES = 20  # attempts (1 ms apart) at that whole checkpoint in one round
_json_fallback = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode
_SQLITE_MAGIC = b"SQLite format 3\x00"
_REVISION = re.compile(r"0|[1-9][0-9]{0,17}")
_META_KEYS = ("schema", "revision", "log_start", "cluster")

_DDL = (
    "CREATE TABLE computegroups_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    "CREATE TABLE groups (id TEXT PRIMARY KEY, rev INTEGER NOT NULL, body TEXT NOT NULL)",
    "CREATE INDEX groups_rev ON groups(rev)",
    "CREATE TABLE deletions (id TEXT NOT NULL, rev INTEGER NOT NULL)",
    "CREATE INDEX deletions_rev ON deletions(rev)",
    "CREATE TABLE events (seq INTEGER PRIMARY KEY, at REAL NOT NULL, body TEXT NOT NULL)",
    "CREATE TABLE cordons (node_id TEXT PRIMARY KEY, rev INTEGER NOT NULL, reason TEXT)",
)
_ADDED_IN = {2: _DDL[-2:], 3: _DDL[-1:]}  # what a file of an older format lacks
_MARK = (
    "INSERT INTO cordons(node_id, rev, reason) VALUES (?, ?, ?) "
    "ON CONFLICT(node_id) DO UPDATE SET rev=excluded.rev, reason=excluded.reason"
)
_ADD_EVENT = "INSERT INTO events(at, body) VALUES (?, ?)"
_UPSERT = (  # an existing row is updated in place: its id index entry stays as it is
    "INSERT INTO groups(id, rev, body) VALUES (?, ?, ?) "
    "ON CONFLICT(id) DO UPDATE SET rev=excluded.rev, body=excluded.body"
)
_SWAP = "UPDATE computegroups_meta SET value=? WHERE key='revision' AND value=?"
_SET_REVISION = "UPDATE computegroups_meta SET value=? WHERE key='revision'"
_READ_META = "SELECT value FROM computegroups_meta WHERE key=?"
_READ_REVISION = "SELECT value FROM computegroups_meta WHERE key='revision'"
_SCHEMA_SQL = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"


def _expected_objects(ddl: Sequence[str]) -> list[tuple[str, str, str, str | None]]:
    """sqlite_master as this SQLite stores ``ddl`` (its normalisation of the text included)."""
    conn = sqlite3.connect(":memory:")
    try:
        for statement in ddl:
            conn.execute(statement)
        return [tuple(row) for row in conn.execute(_SCHEMA_SQL)]
    finally:
        conn.close()


_OBJECTS = _expected_objects(_DDL)
_OBJECTS_2 = _expected_objects(_DDL[:-2])  # format 2 and 0.1.0 files: no event log, no node marks
_OBJECTS_OF = {2: _OBJECTS_2, 3: _expected_objects(_DDL[:-1])}


def default_state_path() -> Path:
    """``$COMPUTEGROUPS_STATE``, else ``$XDG_STATE_HOME/computegroups/state.db`` (``~/.local/state`` by default)."""
    explicit = os.environ.get("COMPUTEGROUPS_STATE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "computegroups" / "state.db"


class _Found(NamedTuple):
    """What inspecting a file found: its format, meta rows, and (read-only pass) its records."""

    legacy: bool
    revision: int
    older: int  # an older format (2 or 3) to adopt by adding tables; 0: none
    cluster: str
    records: list[GroupRecord]
    cordons: dict[str, str]


class _Checkpointer:
    """Copies the WAL back into the database off the commit path: a thread with a connection of its own.

    :meth:`wake` asks for a ``PASSIVE`` checkpoint, which copies what is committed without waiting for
    anyone (its two fsyncs happen here, not in a commit). Writers that keep writing append to the WAL
    while it runs, so it never ends empty and the next commit would never rewind it: once the WAL
    reaches :data:`_RESTART_PAGES`, a ``RESTART`` checkpoint follows, which takes the write lock for
    the short tail the passive one left (writers wait for it as for another process), so the next
    commit writes the WAL from its start again.
    """

    def __init__(self, uri: str) -> None:
        # No busy timeout: a RESTART checkpoint that would have to wait (holding the write lock, for a
        # reader) gives up at once, and is tried again a moment later.
        self._conn = sqlite3.connect(
            f"{uri}?mode=rw", uri=True, timeout=0, isolation_level=None, check_same_thread=False
        )
        self._wanted = threading.Event()
        self._stopping = False
        self.rounds = 0  # checkpoints run (for tests and benchmarks)
        self._runner = threading.Thread(target=self._run, name="computegroups-checkpoint", daemon=True)
        try:
            self._runner.start()
        except BaseException:
            self._conn.close()
            raise

    def wake(self) -> None:
        self._wanted.set()

    def stop(self) -> None:
        """Finish the checkpoint under way, if any, and close the connection."""
        self._stopping = True
        self._wanted.set()
        self._runner.join()

    def _run(self) -> None:
        conn = self._conn
        try:
            while True:
                self._wanted.wait()
                self._wanted.clear()
                if self._stopping:
                    return
                try:
                    _, pages, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    for _ in range(_RESTART_TRIES if pages >= _RESTART_PAGES else 0):
                        if conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()[0] == 0 or self._stopping:
                            break
                        time.sleep(0.001)  # a writer or a reader was inside: try again shortly
                except sqlite3.Error as exc:  # the next round tries again; the WAL is only longer meanwhile
                    log.debug("checkpoint failed: %s", exc)
                self.rounds += 1
        finally:
            conn.close()


class SqliteStateStore:
    """Group records in a SQLite file; see the module docstring for guarantees."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        durable: bool = False,
        busy_timeout_s: float = 30.0,
        log_limit: int = _DELETION_LOG_LIMIT,
    ) -> None:
        if isinstance(log_limit, bool) or not isinstance(log_limit, int) or log_limit < 2:
            raise StateError(f"log_limit: {log_limit!r} is not a whole number of at least 2")
        self.path = Path(path)
        self._durable = durable
        self._timeout = busy_timeout_s
        self._log_limit = log_limit
        self._conn: sqlite3.Connection | None = None
        self._identity: str | None = None
        self._opened: _Found | None = None  # what open() read, served once
        self._held: int | None = None  # holding the write lock: the revision read under it (-1: not yet read)
        self._deleted = 0  # deletion log rows this store wrote since it last looked at the log's size
        self._checkpointer: _Checkpointer | None = None
        self._commits = 0  # own commits since the checkpointer was last woken
        # The revision this connection last knew the file to be at, and ``PRAGMA data_version`` read
        # no later than that: while it reads the same, no other connection has committed since.
        self._known: int | None = None
        self._version: int | None = None
        #: What this store read and waited for (for tests and benchmarks): incremental reads of
        #: others' changes, the rows they read, full reloads, pauses for another process's lock,
        #: and commits refused for a lost race.
        self.stats = dict.fromkeys(("reads", "rows_read", "full_reads", "busy_waits", "conflicts"), 0)

    def bind(self, identity: str) -> None:
        """Name the cluster this store serves (before :meth:`open`, or on an open store).

        A new file records it; a file made for another cluster is refused (StateError naming both);
        a file not yet bound to any cluster is bound to this one.
        """
        if not isinstance(identity, str) or not identity or len(identity) > 1024:
            raise StateError(f"state {self.path}: {identity!r} is not a cluster identity")
        before, self._identity = self._identity, identity
        if self._conn is not None:
            try:
                self._conn.execute(f"PRAGMA busy_timeout={int(self._timeout * 1000)}")
                try:
                    self._bind(self._conn)
                finally:
                    self._conn.execute("PRAGMA busy_timeout=0")
            except sqlite3.DatabaseError as exc:
                self._identity = before
                raise self._error(f"not a usable SQLite database: {exc}") from exc
            except BaseException:
                self._identity = before
                raise

    def _error(self, what: str) -> StateError:
        return StateError(f"state {self.path}: {what}")

    # -- lifecycle --------------------------------------------------------------
    async def open(self) -> None:
        if self._conn is not None:
            return
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error(f"cannot create its folder: {exc.strerror or exc}") from exc
        if not os.path.lexists(path):
            self._create()
        self._check_file()
        uri = f"file:{quote(os.path.abspath(path))}"
        found = self._inspect(uri)
        self._check_identity(found.cluster)
        try:
            conn = sqlite3.connect(
                f"{uri}?mode=rw", uri=True, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error(f"cannot open for writing: {exc}") from exc
        try:
            self._prepare(conn)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._error(f"not a usable SQLite database: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        self._opened = found
        try:
            self._checkpointer = _Checkpointer(uri)
        except (sqlite3.Error, RuntimeError) as exc:  # no connection or no thread: SQLite checkpoints in commits
            log.debug("state %s: no background checkpoints: %s", path, exc)
        else:
            conn.execute("PRAGMA wal_autocheckpoint=0")

    def _create(self) -> None:
        """Build a new state file beside ``path`` and link it into place (unless someone else was first)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{os.urandom(4).hex()}.new")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
            os.close(fd)
            conn = sqlite3.connect(tmp, isolation_level=None)
            try:
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={FORMAT}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("BEGIN IMMEDIATE")
                for ddl in _DDL:
                    conn.execute(ddl)
                conn.executemany(
                    "INSERT INTO computegroups_meta(key, value) VALUES (?, ?)",
                    [("schema", SCHEMA), ("revision", "0"), ("log_start", "0"), ("cluster", self._identity or "")],
                )
                conn.execute("COMMIT")
            finally:
                conn.close()
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return  # another process created it first: open that one
        except (OSError, sqlite3.Error) as exc:
            raise self._error(f"cannot create: {getattr(exc, 'strerror', None) or exc}") from exc
        finally:
            for leftover in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)

    def _check_file(self) -> None:
        """A readable regular file that starts like a SQLite database."""
        try:
            st = os.stat(self.path)
            if stat.S_ISDIR(st.st_mode):
                raise self._error("is a directory, not a state file")
            if not stat.S_ISREG(st.st_mode):
                raise self._error("is not a regular file")
            if st.st_size == 0:
                raise self._error(
                    "is an empty file; computegroups never leaves one, so it is not a state file "
                    "(delete it to start afresh)"
                )
            with open(self.path, "rb") as f:
                head = f.read(100)
        except OSError as exc:
            raise self._error(f"cannot read: {exc.strerror or exc}") from exc
        if not head.startswith(_SQLITE_MAGIC):
            raise self._error("not a SQLite database")
        if len(head) < 100:
            raise self._error(f"a truncated SQLite database ({len(head)} bytes)")

    def _inspect(self, uri: str) -> _Found:
        """Everything about the file, read through a read-only connection; StateError for anything amiss."""
        try:
            conn = sqlite3.connect(f"{uri}?mode=ro", uri=True, timeout=self._timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise self._error(f"cannot open: {exc}") from exc
        try:
            conn.execute("BEGIN")
            check = conn.execute("PRAGMA quick_check(1)").fetchone()
            if check is None or check[0] != "ok":
                detail = " ".join(str(check[0]).split()) if check else "no integrity answer"
                raise self._error(f"damaged SQLite database: {detail}")
            found = self._check_meta(conn)
            rows = conn.execute("SELECT id, rev, body, typeof(id), typeof(rev), typeof(body) FROM groups").fetchall()
            records = []
            for gid, rev, body, tid, trev, tbody in rows:
                if (tid, trev, tbody) != ("text", "integer", "text"):
                    raise self._error(f"a group row has types ({tid}, {trev}, {tbody}), not (text, integer, text)")
                if not 0 < rev <= found.revision:
                    raise self._error(f"group {gid!r} is at revision {rev}, beyond the file's {found.revision}")
                records.append(self._decode(gid, body))
            bad = conn.execute(
                "SELECT COUNT(*) FROM deletions WHERE typeof(id) != 'text' OR typeof(rev) != 'integer' "
                "OR rev < 0 OR rev > ?",
                (found.revision,),
            ).fetchone()[0]
            if bad:
                raise self._error(f"{bad} deletion log row(s) have the wrong types or revisions")
            cordons = {} if found.legacy or found.older else self._read_cordons(conn, found.revision)
            conn.execute("COMMIT")
            return found._replace(records=records, cordons=cordons)
        except sqlite3.DatabaseError as exc:
            raise self._error(f"not a usable SQLite database: {exc}") from exc
        finally:
            conn.close()

    def _check_meta(self, conn: sqlite3.Connection) -> _Found:
        """The header, the tables and the meta rows (without the records)."""
        app = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        objects = [tuple(row) for row in conn.execute(_SCHEMA_SQL)]
        if app == 0 and version == 0:
            if not objects:
                raise self._error(
                    "a SQLite database without tables; computegroups only initialises files it creates, "
                    "so it is not a state file"
                )
            if objects != _OBJECTS_2:
                tables = sorted(name for kind, name, _, _ in objects if kind == "table")
                raise self._error(
                    f"a SQLite database that is not a computegroups state file (tables: {', '.join(tables)})"
                )
            legacy = True
        elif app != APPLICATION_ID:
            raise self._error(
                f"a SQLite database of another program (application_id {app:#010x}, "
                f"computegroups uses {APPLICATION_ID:#010x})"
            )
        elif version != FORMAT and version not in _OBJECTS_OF:
            newer = "a newer" if version > FORMAT else "an unknown"
            raise self._error(f"format {version} is {newer} computegroups format; this version reads {FORMAT}")
        elif objects != _OBJECTS_OF.get(version, _OBJECTS):
            expected = {name for _, name, _, _ in _OBJECTS_OF.get(version, _OBJECTS)}
            present = {name for _, name, _, _ in objects}
            missing, extra = sorted(expected - present), sorted(present - expected)
            what = _difference(missing, extra) or "definitions differ"
            raise self._error(f"its tables are not a computegroups state file's ({what})")
        else:
            legacy = False
        rows = conn.execute("SELECT key, value, typeof(key), typeof(value) FROM computegroups_meta").fetchall()
        meta: dict[str, str] = {}
        for key, value, tkey, tvalue in rows:
            if (tkey, tvalue) != ("text", "text"):
                raise self._error(f"meta row {key!r} has types ({tkey}, {tvalue}), not (text, text)")
            meta[key] = value
        keys = _META_KEYS[:3] if legacy else _META_KEYS
        missing = [k for k in keys if k not in meta]
        extra = sorted(k for k in meta if k not in keys)
        if missing or extra:
            raise self._error(f"meta rows are damaged ({_difference(missing, extra)})")
        schema = _LEGACY_SCHEMA if legacy else _OLDER_SCHEMAS.get(version, SCHEMA)
        if meta["schema"] != schema:
            raise self._error(
                f"schema {meta['schema']!r} is not {schema!r}; use the computegroups version that wrote it"
            )
        for key in ("revision", "log_start"):
            if not _REVISION.fullmatch(meta[key]):
                raise self._error(f"meta {key} {meta[key]!r} is not a revision number")
        revision, log_start = int(meta["revision"]), int(meta["log_start"])
        if log_start > revision:
            raise self._error(f"meta log_start {log_start} is beyond revision {revision}")
        older = 2 if legacy else (version if version in _OLDER_SCHEMAS else 0)
        return _Found(legacy, revision, older, meta.get("cluster", ""), [], {})

    def _read_cordons(self, conn: sqlite3.Connection, revision: int) -> dict[str, str]:
        """The cordoned nodes, with their types and revisions checked (StateError if damaged)."""
        bad = conn.execute(
            "SELECT COUNT(*) FROM cordons WHERE typeof(node_id) != 'text' OR typeof(rev) != 'integer' "
            "OR rev <= 0 OR rev > ? OR typeof(reason) NOT IN ('text', 'null')",
            (revision,),
        ).fetchone()[0]
        if bad:
            raise self._error(f"{bad} node mark row(s) have the wrong types or revisions")
        return dict(conn.execute("SELECT node_id, reason FROM cordons WHERE reason IS NOT NULL").fetchall())

    def _check_identity(self, recorded: str) -> None:
        if self._identity is not None and recorded and recorded != self._identity:
            raise self._error(
                f"it belongs to cluster {recorded!r}, not to this one ({self._identity!r}); "
                "use another state file for this cluster"
            )

    def _prepare(self, conn: sqlite3.Connection) -> None:
        """After the inspection passed: WAL on, and under the write lock, re-check and bind."""
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'NORMAL'}")
        self._bind(conn)
        # From now on no lock another process holds is waited for by blocking the event loop: the
        # busy timeout is 0 and a busy lock is retried after an asynchronous pause.
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("PRAGMA cache_size=-16384")

    def _bind(self, conn: sqlite3.Connection) -> None:
        """Under the write lock: re-check the header and meta rows, adopt a 0.1.0 file, record the cluster."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = self._check_meta(conn)  # the file may have changed since the read-only pass
            self._check_identity(found.cluster)
            if found.legacy or found.older:
                conn.execute("UPDATE computegroups_meta SET value=? WHERE key='schema'", (SCHEMA,))
                if found.legacy:
                    conn.execute("INSERT INTO computegroups_meta(key, value) VALUES ('cluster', '')")
                for ddl in _ADDED_IN[found.older]:
                    conn.execute(ddl)
                conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version={FORMAT}")
            if not found.cluster and self._identity:
                conn.execute("UPDATE computegroups_meta SET value=? WHERE key='cluster'", (self._identity,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        self._opened = None
        self._held = None
        self._known = self._version = None
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise self._error("store is not open")
        return self._conn

    # -- the write lock ---------------------------------------------------------
    async def _begin(self, sql: str, first: str | None = None) -> tuple[object, ...] | None:
        """``BEGIN`` or ``BEGIN IMMEDIATE``; while another process holds the lock, pause (asynchronously) and retry.

        ``first``: a query run first in the transaction (a deferred ``BEGIN`` takes its read lock
        there); its first row is returned.
        """
        conn = self.conn
        pause, longest = _BACKOFF_S
        deadline = 0.0
        while True:
            try:
                if conn.in_transaction:  # another task of this process (the event log's writer) is inside one
                    raise sqlite3.OperationalError("a transaction of this connection is open")
                conn.execute(sql)
                if first is None:
                    return None
                try:
                    row: tuple[object, ...] | None = conn.execute(first).fetchone()
                    return row
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if conn.in_transaction:
                    pass
                elif getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _BUSY:
                    raise self._error(f"could not start a transaction: {exc}") from exc
                now = time.monotonic()
                if not deadline:
                    deadline = now + self._timeout
                elif now >= deadline:
                    what = "start reading" if first else "take the write lock"
                    raise self._error(f"could not {what} in {self._timeout:g}s: {exc}") from exc
            self.stats["busy_waits"] += 1
            await asyncio.sleep(pause * (0.5 + random.random()))
            pause = min(2 * pause, longest)

    async def lock(self) -> None:
        """Take the write lock now: the next :meth:`changes_since` and :meth:`commit` run under it.

        A caller that catches up, decides and commits under the lock never loses the race, so it
        never decides twice. :meth:`commit` releases the lock; so does :meth:`unlock`, writing nothing.
        """
        if self._held is None:
            await self._begin("BEGIN IMMEDIATE")
            self._held = -1

    def unlock(self) -> None:
        """Release the write lock taken by :meth:`lock` if no commit did (nothing is written)."""
        if self._held is not None:
            self._held = None
            if self._conn is not None and self._conn.in_transaction:
                self._conn.execute("ROLLBACK")

    # -- reads ------------------------------------------------------------------
    def _meta_int(self, key: str) -> int:
        return self._meta_value(key, self.conn.execute(_READ_META, (key,)).fetchone())

    def _meta_value(self, key: str, row: tuple[object, ...] | None) -> int:
        """The revision-valued meta row ``key`` as read (``row``), checked."""
        if row is None or not isinstance(row[0], str) or not _REVISION.fullmatch(row[0]):
            raise self._error(f"meta {key} is {'missing' if row is None else repr(row[0])}; the file is damaged")
        return int(row[0])

    def _data_version(self) -> int:
        """``PRAGMA data_version``: it changes when another connection commits, never for this one's commits."""
        return int(self.conn.execute("PRAGMA data_version").fetchone()[0])

    async def changes_since(self, revision: int) -> Changes:
        """What changed after ``revision``: the rows written after it (the ``groups_rev`` index is the
        change log, revision -> ids) and the deletion log after it; everything only if the deletion
        log no longer reaches back to ``revision``.

        Nothing is read when ``revision`` is the one this connection knows and no other connection has
        committed since (``PRAGMA data_version``): a writer does not read its own commits back.
        """
        conn = self.conn
        opened, self._opened = self._opened, None
        held = self._held is not None
        version: int | None = None
        first: tuple[object, ...] | None = None
        try:
            if not held:
                try:
                    version = self._data_version()  # read before the revision: never newer than it
                except sqlite3.OperationalError as exc:
                    if getattr(exc, "sqlite_errorcode", 0) & 0xFF not in _BUSY:
                        raise
                if version is not None and version == self._version and revision == self._known and opened is None:
                    return Changes(revision)
                first = await self._begin("BEGIN", _READ_REVISION)
            try:
                current = self._meta_int("revision") if held else self._meta_value("revision", first)
                if held:
                    self._held = current
                    version = self._data_version()  # in the write transaction: this very revision's
                changes = self._read(revision, current, opened)
            finally:
                if not held:
                    conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise self._error(f"read failed: {exc}") from exc
        self._known, self._version = changes.revision, version
        return changes

    def _read(self, revision: int, current: int, opened: _Found | None) -> Changes:
        """Inside a transaction at ``current``: what changed after ``revision``."""
        if current == revision:
            return Changes(current)
        if current < revision:
            raise self._error(f"revision went back from {revision} to {current}; the file was changed underneath")
        if opened is not None and opened.revision == current:  # what open() read and checked
            return Changes(current, opened.records, (), full=True, cordons=opened.cordons)
        conn = self.conn
        log_start = self._meta_int("log_start")
        stats = self.stats
        if revision < log_start:
            rows = conn.execute("SELECT id, body FROM groups").fetchall()
            stats["full_reads"] += 1
            stats["rows_read"] += len(rows)
            cordons = self._read_cordons(conn, current)
            return Changes(current, [self._decode(i, b) for i, b in rows], (), full=True, cordons=cordons)
        rows = conn.execute("SELECT id, body FROM groups WHERE rev > ?", (revision,)).fetchall()
        dels = [i for (i,) in conn.execute("SELECT id FROM deletions WHERE rev > ?", (revision,))]
        marks = conn.execute("SELECT node_id, reason FROM cordons WHERE rev > ?", (revision,)).fetchall()
        stats["reads"] += 1
        stats["rows_read"] += len(rows) + len(dels)
        ups = [self._decode(i, b) for i, b in rows]
        if dels and ups:  # an id written again after its deletion exists
            written = {r.id for r in ups}
            dels = [d for d in dels if d not in written]
        if marks:
            return Changes(current, ups, dels, cordons=_checked_marks(marks, self._error))
        return Changes(current, ups, dels)

    # -- writes -----------------------------------------------------------------
    async def commit(
        self,
        expected: int,
        upserts: Sequence[GroupRecord],
        deletes: Sequence[str] = (),
        events: Sequence[Event] = (),
        cordons: Cordons = NO_CORDONS,
    ) -> int:
        """One short ``BEGIN IMMEDIATE`` transaction writing only the changed rows (prepared statements),
        the change's ``events`` in the event log and its node marks."""
        conn = self.conn
        self._opened = None
        rev = expected + 1
        rows = [(r.id, rev, _body(r)) for r in upserts]  # encoded before the lock is taken
        logged = [_event_row(e) for e in events]
        if self._held is None:
            await self._begin("BEGIN IMMEDIATE")
            self._held = -1
        try:
            if self._held != expected:  # compare and swap: move the revision on only from ``expected``
                if conn.execute(_SWAP, (str(rev), str(expected))).rowcount != 1:
                    current = self._meta_int("revision")  # StateError if it is gone or damaged
                    self.stats["conflicts"] += 1
                    self._known = None
                    raise RevisionConflict(f"revision is {current}, not {expected}")
            elif conn.execute(_SET_REVISION, (str(rev),)).rowcount != 1:
                raise self._error("meta revision is missing; the file is damaged")
            if len(rows) == 1:
                conn.execute(_UPSERT, rows[0])
            elif rows:
                conn.executemany(_UPSERT, rows)
            if deletes:
                conn.executemany("DELETE FROM groups WHERE id=?", [(d,) for d in deletes])
                conn.executemany("INSERT INTO deletions(id, rev) VALUES (?, ?)", [(d, rev) for d in deletes])
                self._deleted += len(deletes)
                if self._deleted >= self._log_limit // 4:
                    self._deleted = 0
                    self._trim_log()
            if logged:
                self._log_events(logged)
            if cordons:
                conn.executemany(_MARK, [(node, rev, why) for node, why in cordons.items()])
            self._end_write()
        except BaseException as exc:
            self._abort(exc)
            raise
        finally:
            self._held = None
        # Still known if it was known at ``expected``: the swap from it succeeded, so none came between.
        self._known = rev if self._known == expected else None
        return rev

    def _abort(self, exc: BaseException) -> None:
        """A write transaction's body or its COMMIT raised ``exc``: roll back (StateError for SQLite's errors)."""
        conn = self.conn
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        if isinstance(exc, sqlite3.DatabaseError):
            raise self._error(f"write failed: {exc}") from exc

    def _end_write(self) -> None:
        """COMMIT this connection's write transaction (``_abort`` if it raises); every
        :data:`_CHECKPOINT_EVERY` commits, wake the background checkpoint."""
        self.conn.execute("COMMIT")
        self._commits += 1
        if self._commits >= _CHECKPOINT_EVERY and self._checkpointer is not None:
            self._commits = 0
            self._checkpointer.wake()

    # -- the event log ------------------------------------------------------------
    def _log_events(self, rows: Sequence[tuple[float, str]]) -> None:
        """Append to the event log (inside the caller's transaction); keep the newest :data:`EVENT_LIMIT`."""
        conn = self.conn
        cursor = conn.executemany(_ADD_EVENT, rows) if len(rows) > 1 else conn.execute(_ADD_EVENT, rows[0])
        last = cursor.lastrowid or conn.execute("SELECT MAX(seq) FROM events").fetchone()[0] or 0
        if last % 256 < len(rows):  # now and then, not at every commit
            conn.execute("DELETE FROM events WHERE seq <= ?", (last - EVENT_LIMIT,))

    async def record(self, events: Sequence[Event]) -> None:
        """Append events that change no record (refusals, health), in a transaction of their own."""
        if not events:
            return
        rows = [_event_row(e) for e in events]
        while self._held is not None:  # the manager holds the write lock until its commit: after it
            await asyncio.sleep(0.001)
        await self._begin("BEGIN IMMEDIATE")
        try:
            self._log_events(rows)
            self._end_write()
        except BaseException as exc:
            self._abort(exc)
            raise

    async def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """The kept events numbered after ``seq``, oldest first (at most ``limit``)."""
        try:
            rows = self.conn.execute(
                "SELECT seq, at, body FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)
            ).fetchall()
        except sqlite3.DatabaseError as exc:
            raise self._error(f"read failed: {exc}") from exc
        out = []
        for n, at, body in rows:
            try:
                data = _loads(body)
                out.append(
                    Event(
                        str(data["kind"]),
                        data.get("group_id"),
                        data.get("node_id"),
                        data.get("component"),
                        str(data.get("detail", "")),
                        float(at),
                        int(n),
                    )
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise self._error(f"event {n} is unreadable: {exc}") from exc
        return out

    def _trim_log(self) -> None:
        """Keep the newest half of the deletion log once it outgrows its limit; a reader from before
        the cut (``log_start``) then gets everything, as it can no longer be told what was deleted."""
        conn = self.conn
        count = conn.execute("SELECT COUNT(*) FROM deletions").fetchone()[0]
        if count > self._log_limit:
            cut = conn.execute(
                "SELECT rev FROM deletions ORDER BY rev DESC LIMIT 1 OFFSET ?", (self._log_limit // 2,)
            ).fetchone()[0]
            conn.execute("DELETE FROM deletions WHERE rev <= ?", (cut,))
            conn.execute("UPDATE computegroups_meta SET value=? WHERE key='log_start'", (str(cut),))

    def _decode(self, gid: object, body: object) -> GroupRecord:
        """One stored record, checked: a JSON object whose fields have their types and whose id is its row's."""
        try:
            data = _loads(body) if isinstance(body, str) else None
            if not isinstance(data, Mapping):
                raise ValueError("not a JSON object")
            record = GroupRecord.from_json(data)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise self._error(f"group record {gid!r} is unreadable: {exc}") from exc
        problem = _record_problem(record, gid)
        if problem:
            raise self._error(f"group record {gid!r} is unreadable: {problem}")
        return record


_SPARSE = (  # fields left out of a stored record while they are at their defaults
    *("component", "cpus_milli", "memory_mib", "request_id", "carved", "requirements", "constraints"),
    *("priority", "preemptible", "pool", "tenant", "expires_at", "pending", "preempted_by", "gang_id"),
)


def _body(r: GroupRecord) -> str:
    """A record as stored: a JSON object of its fields, those at their defaults left out.

    :meth:`GroupRecord.from_json` fills them in, so every version reads it; it is shorter to write
    and to parse than the whole record.
    """
    data: dict[str, object] = {
        "id": r.id,
        "node_id": r.node_id,
        "state": r.state.value,
        "devices": [[d.index, d.uuid, d.share_milli, d.memory_mib] for d in r.devices],
        "created_at": r.created_at,
        "updated_at": r.updated_at,
    }
    for key in _SPARSE:
        value = getattr(r, key)
        if value is None or value is False or (type(value) is int and value == 0):
            continue
        if isinstance(value, Mapping):
            if not value:
                continue
            value = dict(value)
        data[key] = value
    return _encode_json(data)


def _encode_json(data: object) -> str:
    """Compact JSON, UTF-8 unescaped: orjson (a tenth of the standard library's time), or the
    standard library's encoder for what orjson refuses (an integer beyond 64 bits)."""
    try:
        return orjson.dumps(data).decode()
    except TypeError:
        return _json_fallback(data)


def _loads(body: str) -> Any:
    """JSON text decoded (orjson; the standard library for what it refuses, such as ``NaN``)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return json.loads(body)


def _event_row(e: Event) -> tuple[float, str]:
    body = {"kind": e.kind, "group_id": e.group_id, "node_id": e.node_id, "component": e.component, "detail": e.detail}
    return e.at, _encode_json(body)


def _checked_marks(rows: Sequence[tuple[object, object]], error: Callable[[str], StateError]) -> dict[str, str | None]:
    """Node marks read back: a text node id, a text reason or NULL (StateError naming the row if not)."""
    out: dict[str, str | None] = {}
    for node, why in rows:
        if not isinstance(node, str) or not (why is None or isinstance(why, str)):
            raise error(f"node mark {node!r} is unreadable: {why!r} is not a reason")
        out[node] = why
    return out


def _difference(missing: Sequence[str], extra: Sequence[str]) -> str:
    parts = [f"missing {', '.join(missing)}" if missing else "", f"unexpected {', '.join(extra)}" if extra else ""]
    return "; ".join(p for p in parts if p)


def _record_problem(r: Any, gid: object) -> str:
    """What is wrong with a decoded record's types, or ''. (``r`` is read untyped: its fields may not
    have their declared types, which is what this finds out.)"""
    if not isinstance(r.id, str) or r.id != gid:
        return f"its id {r.id!r} is not the row's"
    if not isinstance(r.node_id, str):
        return f"node_id {r.node_id!r} is not a string"
    for key in ("component", "request_id", "pool", "tenant", "preempted_by", "gang_id"):
        value = getattr(r, key)
        if value is not None and not isinstance(value, str):
            return f"{key} {value!r} is not a string"
    if not isinstance(r.requirements, Mapping) or not isinstance(r.constraints, Mapping):
        return "requirements or constraints is not an object"
    if r.state not in AllocationState:
        return f"state {r.state!r} is unknown"
    return ""
