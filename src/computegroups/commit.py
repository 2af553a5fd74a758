"""The commit loop: decisions made on the ledger, committed to the store by compare-and-swap.

Decisions that arrive while a commit is in flight are committed together (a group commit): the
next commit decides them in arrival order, each on the ledger with the ones before it staged
(:meth:`Ledger.stage`), and writes them as one change set. N concurrent allocations then cost one
store write, not N, where a write is a network round trip (an API server's, an etcd's). A lost
race unstages every decision of the batch and decides them all again on the caught-up state, so
the store's compare-and-swap judges each decision against exactly the state it was made on. Each
caller gets its own plan or its own refusal; a refusal, like a read, commits nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from computegroups.decide import Ledger, Plan, Staged, plan_expire
from computegroups.errors import REFUSALS, ConflictError
from computegroups.events import Publisher
from computegroups.model import GroupRecord
from computegroups.state.base import Changes, RevisionConflict, StateStore

__all__ = ["Committer"]

log = logging.getLogger("computegroups")

_PRUNE_SLACK = 64  # released groups kept past ``tombstone_limit`` before a batch is pruned
BATCH = 32  # decisions in one commit at most (bounds the change set a store writes at once)


class _Call:
    """One decision waiting for its commit, and its outcome once committed (or refused)."""

    __slots__ = ("decide", "error", "plan", "taken")

    def __init__(self, decide: Callable[[float], Plan]) -> None:
        self.decide = decide
        self.taken = False  # a commit took it: it is decided (and maybe committed) by that commit
        self.plan: Plan | None = None
        self.error: BaseException | None = None


class Committer:
    """The commit loop of one manager: ``run`` a decision, ``read`` (catch up) before a view.

    ``lock`` serialises everything that reads or changes the ledger in this process; ``run`` takes
    it, ``read`` expects it held.
    """

    def __init__(
        self,
        store: StateStore,
        ledger: Ledger,
        clock: Callable[[], float],
        events: Publisher,
        *,
        max_attempts: int,
        tombstone_limit: int,
    ) -> None:
        self.store = store
        self.ledger = ledger
        self.lock = asyncio.Lock()
        self.expired = 0  # reservations released at their deadline
        self.conflicts = 0  # commits lost to another writer (caught up and decided again)
        self._clock = clock
        self._events = events
        self._max_attempts = max_attempts
        self._tombstone_limit = tombstone_limit
        self._queue: deque[_Call] = deque()
        self._peek: Callable[[], int] | None = getattr(store, "local_revision", None)  # no I/O
        self._seen: Callable[[int], Changes | None] | None = getattr(store, "changes_seen", None)  # a watch's
        self._store_lock: Callable[[], Awaitable[None]] | None = getattr(store, "lock", None)
        self._store_unlock: Callable[[], None] | None = getattr(store, "unlock", None)

    async def run(self, decide: Callable[[float], Plan]) -> Plan:
        """Decide and commit, with whatever else is waiting; returns the plan or raises its refusal."""
        call = _Call(decide)
        queue = self._queue
        queue.append(call)
        try:
            async with self.lock:
                if not call.taken:  # no commit took it while it waited: commit what is waiting now
                    if len(queue) == 1:  # alone, the common case
                        queue.popleft()
                        await self._settle([call])
                    else:  # others wait on this commit: it must finish even if this caller is cancelled
                        await _finish(self._settle([queue.popleft() for _ in range(min(len(queue), BATCH))]))
        except asyncio.CancelledError:
            if not call.taken:
                queue.remove(call)  # never decided
            raise
        if call.error is not None:
            raise call.error
        assert call.plan is not None
        return call.plan

    async def read(self) -> None:
        """Catch up before a read (with ``lock`` held), releasing reservations past their deadline."""
        await self._commit((), exact=True)

    async def _settle(self, calls: list[_Call]) -> None:
        for call in calls:
            call.taken = True
        try:
            await self._commit(calls)
        except Exception as exc:  # the store failed, or the race was lost too often: every call fails
            for call in calls:
                call.plan, call.error = None, exc

    async def refresh(self, exact: bool = True) -> bool:
        """Catch up with the store (changes since the ledger's revision). With ``exact=False``, from
        what a watch of the store delivered where it can tell (no I/O); returns False if it did."""
        ledger = self.ledger
        peek = self._peek
        if peek is not None and peek() == ledger.revision:
            return True  # an in-process store says nothing changed
        seen = None if exact or self._seen is None else self._seen(ledger.revision)
        changes: Changes = seen or await self.store.changes_since(ledger.revision)
        if changes.full:
            ledger.reload(changes.revision, changes.upserts, changes.cordons)
        elif changes.revision != ledger.revision:
            ledger.apply(changes.revision, changes.upserts, changes.deletes, changes.cordons)
        return seen is None

    async def _expire(self, due: list[GroupRecord], now: float) -> None:
        """Release reservations past their deadline (``Ledger.due``) in a commit of their own."""
        ledger = self.ledger
        expiry = plan_expire(due, now)
        try:
            rev = await self.store.commit(ledger.revision, expiry.upserts, (), expiry.events)
        except RevisionConflict:
            self.conflicts += 1
            ledger.requeue(due)  # someone else moved on; look at them again after catching up
            return
        ledger.apply(rev, expiry.upserts, ())
        self.expired += len(due)
        for event in expiry.events:  # in the log already, with its commit
            log.info("reservation %s of %s expired", event.group_id, event.component)
            self._events.emit(event, durable=False)

    async def _commit(self, calls: Sequence[_Call], *, exact: bool = False) -> None:
        """Decide ``calls`` on the freshest state and commit their change sets as one; retry on a lost race.

        Reservations past their deadline are released first, in a commit of their own. Old
        tombstones (released groups past ``tombstone_limit``) are pruned with a change, in batches.
        A retry after a lost race holds the store's write lock (if it has one) from catch-up to commit.
        Decisions may start from what a watch of the store delivered: if one commits nothing (a
        read, a refusal) they are all made again after a read; what commits is checked by the CAS.
        With no ``calls`` (a read) it returns once caught up (from the store itself with ``exact``).
        """
        ledger = self.ledger
        lock = self._store_lock
        try:
            for attempt in range(self._max_attempts):
                if attempt and lock is not None:
                    await lock()
                exact = await self.refresh(exact)
                now = self._clock()
                due = ledger.due(now)  # sync, and [] at once when nothing is: no coroutine made
                if due:
                    await self._expire(due, now)
                    continue
                if not calls:
                    return
                staged = Staged(len(ledger.tombstones))
                if not self._decide(calls, staged, now, exact):
                    ledger.unstage(staged)
                    exact = True  # decided on what a watch delivered: read the store and decide again
                    continue
                if staged.empty:
                    return
                pruned: list[str] = []
                if len(ledger.tombstones) > self._tombstone_limit:
                    pruned = ledger.prunable(self._tombstone_limit, _PRUNE_SLACK, staged)
                upserts = list(staged.upserts.values())
                deletes = [*staged.deletes, *pruned]
                try:
                    if staged.cordons:  # only then: a store of the old protocol still takes every other commit
                        rev = await self.store.commit(ledger.revision, upserts, deletes, staged.events, staged.cordons)
                    else:
                        rev = await self.store.commit(ledger.revision, upserts, deletes, staged.events)
                except RevisionConflict:
                    self.conflicts += 1
                    ledger.unstage(staged)
                    continue
                except BaseException:
                    ledger.unstage(staged)  # not known to be committed: a catch-up will tell
                    raise
                ledger.settle(staged, rev, pruned)
                return
        finally:
            if self._store_unlock is not None:
                self._store_unlock()
        raise ConflictError(f"state kept changing underneath; gave up after {self._max_attempts} attempts")

    def _decide(self, calls: Sequence[_Call], staged: Staged, now: float, exact: bool) -> bool:
        """Decide each call in order, staging what it changes; False if one must be decided again
        after a read (it refused, or changed nothing, on what a watch delivered)."""
        for call in calls:
            call.plan = call.error = None
            try:
                plan = call.decide(now)
            except REFUSALS as exc:
                if not exact:
                    return False
                call.error = exc
                continue
            except Exception as exc:  # a fault in one decision fails that call only
                call.error = exc
                continue
            if not (plan.upserts or plan.deletes or plan.cordons):
                if not exact:
                    return False
            else:
                self.ledger.stage(staged, plan)
            call.plan = plan
        return True


async def _finish(work: Awaitable[None]) -> None:
    """Await ``work`` to its end even if the caller is cancelled meanwhile (then re-raise that)."""
    task = asyncio.ensure_future(work)
    cancelled = False
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.done() and task.cancelled():
                raise
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
    task.result()
