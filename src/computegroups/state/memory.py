"""An in-memory state store for simulation, tests and benchmarks (lost on exit)."""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import replace

from computegroups.events import Event
from computegroups.model import GroupRecord
from computegroups.state.base import EVENT_LIMIT, NO_CORDONS, Changes, Cordons, RevisionConflict

__all__ = ["MemoryStateStore"]


class MemoryStateStore:
    """Keeps records in a dict, with a change log so several managers can share one store."""

    def __init__(self, log_limit: int = 100_000, event_limit: int = EVENT_LIMIT) -> None:
        self._events: deque[tuple[int, Event]] = deque(maxlen=event_limit)  # numbered when read
        self._event_seq = 0
        self._records: dict[str, GroupRecord] = {}
        self._revision = 0
        self._log: list[tuple[int, str]] = []  # (revision, id) of every write or delete
        self._log_start = 0  # revisions at or below this are no longer in the log
        self._log_limit = log_limit
        self._cordons: dict[str, tuple[int, str | None]] = {}  # node -> (revision, reason or None)

    def bind(self, identity: str) -> None:
        """Any cluster may use an in-memory store (it lives and dies with its process)."""
        return None

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    def local_revision(self) -> int:
        """The current revision, read without I/O (the store lives in this process)."""
        return self._revision

    async def changes_since(self, revision: int) -> Changes:
        if revision == self._revision:
            return Changes(revision)
        if revision < self._log_start or revision > self._revision:
            cordons = {n: why for n, (_, why) in self._cordons.items() if why is not None}
            return Changes(self._revision, tuple(self._records.values()), (), full=True, cordons=cordons)
        ids = {gid for rev, gid in self._log if rev > revision}
        ups = [self._records[g] for g in ids if g in self._records]
        dels = [g for g in ids if g not in self._records]
        if not self._cordons:
            return Changes(self._revision, ups, dels)
        marks = {n: why for n, (rev, why) in self._cordons.items() if rev > revision}
        return Changes(self._revision, ups, dels, cordons=marks)

    async def record(self, events: Sequence[Event]) -> None:
        """Append events that change no record (refusals, health)."""
        self._append(events)

    async def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """The kept events after ``seq``, oldest first, at most ``limit``."""
        return [replace(e, seq=n) for n, e in self._events if n > seq][:limit]

    def _append(self, events: Sequence[Event]) -> None:
        for e in events:
            self._event_seq += 1
            self._events.append((self._event_seq, e))

    async def commit(
        self,
        expected: int,
        upserts: Sequence[GroupRecord],
        deletes: Sequence[str] = (),
        events: Sequence[Event] = (),
        cordons: Cordons = NO_CORDONS,
    ) -> int:
        if expected != self._revision:
            raise RevisionConflict(f"revision is {self._revision}, not {expected}")
        if events:
            self._append(events)
        self._revision += 1
        rev = self._revision
        for r in upserts:
            self._records[r.id] = r
            self._log.append((rev, r.id))
        for gid in deletes:
            self._records.pop(gid, None)
            self._log.append((rev, gid))
        for node_id, why in cordons.items():
            self._cordons[node_id] = (rev, why)
        if len(self._log) > self._log_limit:
            cut = len(self._log) // 2
            self._log_start = self._log[cut - 1][0]
            del self._log[:cut]
        return rev
