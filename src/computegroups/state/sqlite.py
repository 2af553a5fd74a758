"""The embedded default state store: one SQLite file, safe across processes.

WAL journal, one ``BEGIN IMMEDIATE`` transaction per commit (so the revision
check and the write happen under SQLite's write lock), ``synchronous=NORMAL`` by
default: a committed change survives a crash of any process; ``durable=True``
selects ``synchronous=FULL`` to survive power loss as well, at an fsync per
commit. A file that is not SQLite, or is SQLite but not ours, raises
:class:`StateError`; the store never resets a file it does not recognise.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

from computegroups.errors import StateError
from computegroups.model import GroupRecord
from computegroups.state.base import Changes, RevisionConflict

__all__ = ["SCHEMA", "SqliteStateStore", "default_state_path"]

SCHEMA = "computegroups/1"
_DELETION_LOG_LIMIT = 100_000


def default_state_path() -> Path:
    """``$COMPUTEGROUPS_STATE``, else ``$XDG_STATE_HOME/computegroups/state.db`` (``~/.local/state`` by default)."""
    explicit = os.environ.get("COMPUTEGROUPS_STATE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "computegroups" / "state.db"


class SqliteStateStore:
    """Group records in a SQLite file; see the module docstring for guarantees."""

    def __init__(self, path: str | os.PathLike[str], *, durable: bool = False, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self._durable = durable
        self._timeout = busy_timeout_s
        self._conn: sqlite3.Connection | None = None

    # -- lifecycle --------------------------------------------------------------
    async def open(self) -> None:
        if self._conn is not None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"state {self.path}: cannot create its folder: {exc}") from exc
        existed = self.path.exists() and self.path.stat().st_size > 0
        try:
            conn = sqlite3.connect(self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False)
        except sqlite3.Error as exc:
            raise StateError(f"state {self.path}: cannot open: {exc}") from exc
        try:
            await self._prepare_when_free(conn, existed)
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StateError(f"state {self.path}: not a usable SQLite database: {exc}") from exc
        except StateError:
            conn.close()
            raise
        self._conn = conn
        if not existed:
            with contextlib.suppress(OSError):
                os.chmod(self.path, 0o600)

    async def _prepare_when_free(self, conn: sqlite3.Connection, existed: bool) -> None:
        """``_prepare``, retried (without blocking the event loop) while another process holds its lock.

        Switching a new file to WAL takes an exclusive lock, and SQLite answers "database is
        locked" at once, without its busy handler, when several processes open a new file together.
        """
        deadline = time.monotonic() + self._timeout
        delay = 0.005
        while True:
            try:
                self._prepare(conn, existed)
                return
            except sqlite3.OperationalError as exc:
                busy = "locked" in str(exc) or "busy" in str(exc)
                if not busy or time.monotonic() + delay > deadline:
                    raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    def _prepare(self, conn: sqlite3.Connection, existed: bool) -> None:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if existed and tables and "computegroups_meta" not in tables:
            raise StateError(f"state {self.path}: a SQLite database that is not a computegroups state file")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self._durable else 'NORMAL'}")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("CREATE TABLE IF NOT EXISTS computegroups_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            conn.execute(
                "CREATE TABLE IF NOT EXISTS groups (id TEXT PRIMARY KEY, rev INTEGER NOT NULL, body TEXT NOT NULL)"
            )
            conn.execute("CREATE INDEX IF NOT EXISTS groups_rev ON groups(rev)")
            conn.execute("CREATE TABLE IF NOT EXISTS deletions (id TEXT NOT NULL, rev INTEGER NOT NULL)")
            conn.execute("CREATE INDEX IF NOT EXISTS deletions_rev ON deletions(rev)")
            meta = dict(conn.execute("SELECT key, value FROM computegroups_meta").fetchall())
            if not meta:
                conn.executemany(
                    "INSERT INTO computegroups_meta(key, value) VALUES (?, ?)",
                    [("schema", SCHEMA), ("revision", "0"), ("log_start", "0")],
                )
            elif meta.get("schema") != SCHEMA:
                raise StateError(
                    f"state {self.path}: schema {meta.get('schema')!r} is not {SCHEMA!r}; "
                    "use the computegroups version that wrote it"
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateError(f"state {self.path}: store is not open")
        return self._conn

    # -- reads ------------------------------------------------------------------
    def _meta_int(self, key: str) -> int:
        row = self.conn.execute("SELECT value FROM computegroups_meta WHERE key=?", (key,)).fetchone()
        return int(row[0]) if row else 0

    async def changes_since(self, revision: int) -> Changes:
        conn = self.conn
        try:
            current = self._meta_int("revision")
            if current == revision:
                return Changes(current)
            conn.execute("BEGIN")
            try:
                current = self._meta_int("revision")
                log_start = self._meta_int("log_start")
                if revision < log_start or revision > current:
                    rows = conn.execute("SELECT body FROM groups").fetchall()
                    return Changes(current, [_decode(b) for (b,) in rows], (), full=True)
                rows = conn.execute("SELECT body FROM groups WHERE rev > ?", (revision,)).fetchall()
                dels = [i for (i,) in conn.execute("SELECT id FROM deletions WHERE rev > ?", (revision,))]
                return Changes(current, [_decode(b) for (b,) in rows], dels)
            finally:
                conn.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            raise StateError(f"state {self.path}: read failed: {exc}") from exc

    # -- writes -----------------------------------------------------------------
    async def commit(self, expected: int, upserts: Sequence[GroupRecord], deletes: Sequence[str] = ()) -> int:
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise StateError(f"state {self.path}: could not take the write lock: {exc}") from exc
        try:
            current = self._meta_int("revision")
            if current != expected:
                raise RevisionConflict(f"revision is {current}, not {expected}")
            rev = current + 1
            if upserts:
                conn.executemany(
                    "INSERT OR REPLACE INTO groups(id, rev, body) VALUES (?, ?, ?)",
                    [(r.id, rev, json.dumps(r.to_json(), separators=(",", ":"))) for r in upserts],
                )
            if deletes:
                conn.executemany("DELETE FROM groups WHERE id=?", [(d,) for d in deletes])
                conn.executemany("INSERT INTO deletions(id, rev) VALUES (?, ?)", [(d, rev) for d in deletes])
                if rev % 1024 == 0:
                    self._trim_log(rev)
            conn.execute("UPDATE computegroups_meta SET value=? WHERE key='revision'", (str(rev),))
            conn.execute("COMMIT")
            return rev
        except BaseException as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(exc, sqlite3.DatabaseError):
                raise StateError(f"state {self.path}: write failed: {exc}") from exc
            raise

    def _trim_log(self, rev: int) -> None:
        count = self.conn.execute("SELECT COUNT(*) FROM deletions").fetchone()[0]
        if count > _DELETION_LOG_LIMIT:
            cut = self.conn.execute(
                "SELECT rev FROM deletions ORDER BY rev DESC LIMIT 1 OFFSET ?", (_DELETION_LOG_LIMIT // 2,)
            ).fetchone()[0]
            self.conn.execute("DELETE FROM deletions WHERE rev <= ?", (cut,))
            self.conn.execute("UPDATE computegroups_meta SET value=? WHERE key='log_start'", (str(cut),))


def _decode(body: str) -> GroupRecord:
    try:
        return GroupRecord.from_json(json.loads(body))
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"state: a group record is unreadable: {exc}") from exc
