"""The state store contract: a revisioned set of group records, changed by compare-and-swap.

Every change is one commit of a change set (records to write, ids to delete)
that succeeds only if the store's revision is still the one the caller decided
against. A caller that loses the race re-reads what changed and decides again.
So nothing is visible before it is durable, and two writers never both win.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NamedTuple, Protocol, runtime_checkable

from computegroups.errors import ConflictError
from computegroups.events import Event
from computegroups.model import GroupRecord

__all__ = ["EVENT_LIMIT", "NO_CORDONS", "Changes", "Cordons", "EventLog", "RevisionConflict", "StateStore"]


#: Events a store keeps (the oldest go first); enough for hours of a busy planner.
EVENT_LIMIT = 10_000


class RevisionConflict(ConflictError):
    """The store moved on since the caller's revision; re-read and decide again."""


#: Node marks of a change: node id -> the reason it is cordoned, or None (uncordoned).
Cordons = Mapping[str, str | None]
NO_CORDONS: Cordons = MappingProxyType({})


class Changes(NamedTuple):
    """What changed after a revision. ``full`` means: forget everything, these are all records.

    ``cordons``: nodes an operator cordoned (a reason) or uncordoned (None) after the revision; with
    ``full``, every node cordoned now.
    """

    revision: int
    upserts: Sequence[GroupRecord] = ()
    deletes: Sequence[str] = ()
    full: bool = False
    cordons: Cordons = NO_CORDONS


@runtime_checkable
class StateStore(Protocol):
    """Where group records live. Implementations: memory, SQLite (and Kubernetes custom resources).

    Contract:
      * ``changes_since(rev)`` returns every record written and every id deleted after
        ``rev`` (or ``full=True`` with all records), and the current revision.
      * ``commit(expected, upserts, deletes)`` applies the change set atomically and
        returns the new revision, or raises :class:`RevisionConflict` if the revision
        is no longer ``expected``; then nothing was written.
      * node marks: a store given ``cordons=`` (only when a change cordons or uncordons a
        node) writes them in the same commit, and ``changes_since`` returns them.
      * ``close()`` is idempotent.
    """

    async def open(self) -> None:
        """Create or validate the store; raises StateError if it is not usable."""
        ...

    async def close(self) -> None:
        """Release resources. Idempotent."""
        ...

    async def changes_since(self, revision: int) -> Changes:
        """Records changed after ``revision``."""
        ...

    async def commit(
        self,
        expected: int,
        upserts: Sequence[GroupRecord],
        deletes: Sequence[str] = (),
        events: Sequence[Event] = (),
        cordons: Cordons = NO_CORDONS,
    ) -> int:
        """Write the change set if the revision is ``expected``; return the new revision.

        A store with an event log (:class:`EventLog`) writes ``events`` in the same transaction;
        ``cordons`` (node marks) are written in it too.
        """
        ...


@runtime_checkable
class EventLog(Protocol):
    """A store that keeps events: those of a change in the commit that makes it (``commit(..., events=)``),
    others (refusals, health) on their own; numbered in order, the newest :data:`EVENT_LIMIT` kept."""

    async def record(self, events: Sequence[Event]) -> None:
        """Append events that change no record."""
        ...

    async def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """The kept events numbered after ``seq``, oldest first."""
        ...
