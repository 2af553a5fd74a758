"""Group records as ``ComputeGroup`` custom resources, committed atomically through a ledger.

Kubernetes has no multi-object transaction: one object's ``resourceVersion`` is the
only compare-and-swap. So each store has one small ``ComputeGroupLedger`` object
whose update *is* the commit and which carries the last change sets inline, and one
``ComputeGroup`` object per group, a mirror for people, tools and readers that fell
behind (``kubectl get cg -l 'computegroups.dev/state notin (released,deleted)'``)::

    ComputeGroupLedger <name>   spec.revision = N
                                spec.log      = [{revision, changes: '{"upserts": [records], "deletes": [ids]}'}, ...]
                                                the change sets of the last revisions up to N, oldest
                                                first (at most LOG_ENTRIES and about LOG_BYTES), each
                                                one JSON string (the API server decodes, validates and
                                                stores a string for a fraction of the cost of the same
                                                records as objects; a ledger of the older format, with
                                                ``upserts`` and ``deletes`` as fields, is read as well)
                                spec.mirrored = every change set up to this one is in the group objects
                                (an entry's ``done``: its writer wrote it there in full)
                                spec.cordons  = {node: {revision, reason}}: nodes an operator cordoned
                                (reason null: uncordoned at that revision), written by the commit
    ComputeGroup <group id>     spec.revision = revision of its last write; label state=<record state>
                                spec.record   = the GroupRecord (state=deleted: a deletion tombstone)

``commit(expected, upserts, deletes)``: one write of the ledger (``revision = expected + 1``, the
change set appended to the log, the oldest entries dropped), guarded by its resourceVersion: a 409
is :class:`RevisionConflict` and nothing was written. **This one write is the commit point.** The
group objects are written after it by a background writer (a mirror; a crash before it loses
nothing, the change set is in the log), a few milliseconds later, several change sets at a time:
each object once, at its newest state (a group allocated and released in between is written once).
:meth:`KubernetesStateStore.flush` waits for it; ``close()`` flushes. Before a change set leaves
the log (or when it is ``MIRROR_LAG`` revisions old) and no writer has confirmed it in the group
objects, the committer writes it there first; so everything older than the log is always in the
group objects. Group objects only move forward (resourceVersion-guarded, skipped when their
``spec.revision`` is already as new), so a late writer of an old change set never
overwrites newer data; deletions leave tombstone objects, swept ``GC_LAG`` revisions later.

The ledger is followed by a watch (list-then-watch from its resourceVersion, reopened after a
broken stream or a 410 Gone with a fresh GET), so a commit needs no GET before it: the ledger it
replaces is the newest one the watch delivered. :meth:`KubernetesStateStore.changes_seen` folds what
the watch delivered without a request, for the manager's decisions; a decision made on a ledger
the watch had not yet brought up to date loses its compare-and-swap and is made again.

``changes_since(rev)``: one GET of the ledger. A reader whose ``rev`` is within the log folds the
entries after it (no list). A reader further behind (or opening) lists the group objects but
deletion tombstones (label selector), reads the ledger again, and overlays the log entries of both
reads; see docs/kubernetes.md for why that is exactly the state after one commit.

Events (the store is an :class:`~computegroups.state.base.EventLog`): core ``v1 Event`` objects
about the ComputeGroup of their group (or the ledger), written by a background task **after** the
commit that made them, since no write can be atomic with the ledger's; a write that fails is logged
and counted, never raised, and never undoes the commit. Identical events are aggregated (``count``)
and writes are rate-limited; reads list them once, then watch. See :mod:`computegroups.state.k8s_events`.

Errors from the API server become :class:`StateError` with a one-line message naming the
verb and the resource (``forbidden: cannot update computegroupledgers.computegroups.dev ...``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Sequence
from typing import Any

from computegroups.errors import StateError
from computegroups.events import Event
from computegroups.kube.client import KubeClient, KubeError, Obj
from computegroups.kube.informer import follow
from computegroups.kube.names import (
    API_GROUP,
    API_VERSION,
    DNS_NAME,
    MANAGED_BY,
    STATE_LABEL,
    STORE_LABEL,
    cr_name,
)
from computegroups.model import AllocationState, GroupRecord
from computegroups.state.base import NO_CORDONS, Changes, Cordons, RevisionConflict
from computegroups.state.k8s_events import EVENT_BURST, EVENT_RATE, KubeEventLog
from computegroups.tasks import stop_task

__all__ = ["API_GROUP", "API_VERSION", "KubernetesStateStore", "cr_name"]

#: Record states whose group object most likely exists already (written when the group was made).
_MOST_LIKELY_THERE = (AllocationState.RELEASED, AllocationState.DRAINING)

log_ = logging.getLogger("computegroups.k8s")

GC_EVERY = 256  # commits between sweeps of old deletion tombstones
GC_LAG = 1024  # revisions a deletion tombstone is kept (a late writer of an older change set is refused)
LOG_ENTRIES = 8  # change sets the ledger carries; a reader further behind lists the group objects
LOG_BYTES = 16 * 1024  # about this much JSON of change sets in the ledger (the newest is always kept)
MIRROR_LAG = 6  # a change set this old that no writer confirmed in the group objects is written again
BACKOFF_BASE = 0.002  # seconds; a writer that lost n races in a row waits up to BASE * 2**n (jittered)
BACKOFF_CAP = 0.05
MIRROR_DELAY_S = 0.05  # the group-object writer waits this long after a commit, for more to gather


class KubernetesStateStore:
    """The :class:`~computegroups.state.base.StateStore` over custom resources (see the module docstring).

    ``namespace``: where the ledger and group objects live (created by ``deploy/``).
    ``name``: the store (ledger) name; several stores can share a namespace.
    ``kubeconfig``/``context``/``in_cluster``: as for the Kubernetes provider.
    ``event_burst``/``event_rate``: the limiter of Event writes (writes at once, then a second).
    ``event_log``: the events' writer and reader; its ``dropped``, ``failed`` and ``written`` count.
    """

    def __init__(
        self,
        kubeconfig: str | os.PathLike[str] | None = None,
        *,
        namespace: str = "computegroups",
        name: str = "default",
        context: str | None = None,
        in_cluster: bool | None = None,
        event_burst: int = EVENT_BURST,
        event_rate: float = EVENT_RATE,
    ) -> None:
        if not DNS_NAME.match(name) or len(name) > 63:
            raise StateError(f"state: store name {name!r} is not a lowercase DNS name")
        self.namespace = namespace
        self.name = name
        self._kubeconfig = kubeconfig
        self._context = context
        self._in_cluster = in_cluster
        self._client: KubeClient | None = None
        self._ledger: Obj | None = None
        self._objects: dict[str, tuple[str, int]] = {}  # object name -> (resourceVersion, spec.revision)
        self._mirrored: set[int] = set()  # change sets after the ledger's `mirrored` this store wrote in full
        self._lost = 0  # commits lost to another writer in a row
        self._following = False  # the watch of the ledger is open (self._ledger is as new as it delivered)
        self._tasks: list[asyncio.Task[None]] = []  # the watch and the group-object writer
        self._dirty: list[tuple[Obj, Sequence[Event]]] = []  # committed change sets (and their events)
        # not yet written into the group objects
        self._wake = asyncio.Event()
        self._mirroring = asyncio.Lock()
        self._sweep_before = 0  # deletion tombstones older than this are due to be swept
        self._uids: dict[str, str] = {}  # group object name -> uid (for the events' involvedObject)
        self._ledger_uid = ""
        self.event_log = KubeEventLog(lambda: self.client, namespace, name, burst=event_burst, rate=event_rate)
        base = f"/apis/{API_GROUP}/v1alpha1/namespaces/{namespace}"
        self._ledger_path = f"{base}/computegroupledgers/{name}"
        self._groups_path = f"{base}/computegroups"

    def __repr__(self) -> str:
        return f"KubernetesStateStore(namespace={self.namespace!r}, name={self.name!r})"

    # -- lifecycle --------------------------------------------------------------------
    async def open(self) -> None:
        if self._client is not None:
            return
        try:
            self._client = await KubeClient.create(self._kubeconfig, self._context, in_cluster=self._in_cluster)
        except KubeError as exc:
            raise StateError(f"state {self}: {exc.one_line()}") from exc
        try:
            self._ledger = await self._get_ledger()
        except BaseException:
            await self.close()
            raise
        self._tasks = [asyncio.create_task(self._follow()), asyncio.create_task(self._mirror_loop())]

    async def close(self) -> None:
        """Write what is left into the group objects and the queued events, stop following the ledger, disconnect."""
        tasks, self._tasks = self._tasks, []
        try:
            for attempt in range(3 if self._client is not None and tasks else 0):
                try:
                    await self.flush()
                    break
                except StateError as exc:
                    log_.warning("%s (try %d of 3)", exc, attempt + 1)
                    await asyncio.sleep(0.1 * 2**attempt)
            else:
                if self._dirty:  # their events are still told; the next writer finishes the objects
                    self.event_log.add([e for _, events in self._dirty for e in events], self._involved)
                    self._dirty.clear()
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                await stop_task(task)
            self._following = False
            if self._client is not None:
                try:
                    await self.event_log.close()  # the queued events, for a few seconds at most
                finally:
                    client, self._client = self._client, None
                    await client.close()

    # -- following the ledger ---------------------------------------------------------
    async def _follow(self) -> None:
        """Keep ``self._ledger`` as new as the API server's: watch it (``kube.informer.follow``)."""
        held = self._ledger
        await follow(
            lambda: self.client,
            self._ledger_path.rsplit("/", 1)[0],
            self._reread,
            self._delivered,
            what=f"the ledger of {self}",
            params={"fieldSelector": f"metadata.name={self.name}"},
            watching=self._watching,
            since=str(held["metadata"]["resourceVersion"]) if held is not None else None,
        )

    async def _reread(self) -> str:
        ledger = self._ledger = await self._get_ledger()
        return str(ledger["metadata"]["resourceVersion"])

    def _delivered(self, kind: str, obj: Obj) -> None:
        if kind in ("ADDED", "MODIFIED"):
            self._take(obj)

    def _watching(self, open_: bool) -> None:
        self._following = open_

    def _take(self, obj: Obj) -> None:
        """A ledger version the watch delivered: kept if it is newer than the one held."""
        held = self._ledger
        revision = int((obj.get("spec") or {}).get("revision", 0))
        if held is None or revision > int((held.get("spec") or {}).get("revision", 0)):
            self._ledger = obj

    def changes_seen(self, revision: int) -> Changes | None:
        """What changed after ``revision`` as far as the watch delivered, without a request; None when
        only a read can tell (the watch is not open, or the ledger's log no longer reaches back)."""
        ledger = self._ledger
        if not self._following or ledger is None:
            return None
        return _from_ledger(ledger.get("spec") or {}, revision)

    @property
    def client(self) -> KubeClient:
        if self._client is None:
            raise StateError(f"state {self}: store is not open")
        return self._client

    def _error(self, exc: KubeError) -> StateError:
        if exc.status == 404 and "could not find the requested resource" in exc.message:
            return StateError(
                f"state {self}: the ComputeGroup custom resources are not installed "
                f"({exc.verb} {exc.resource}); apply deploy/crds.yaml"
            )
        return StateError(f"state {self}: {exc.one_line()}")

    async def _get_ledger(self) -> Obj:
        try:
            return await self.client.get(self._ledger_path)
        except KubeError as exc:
            if exc.status != 404 or "could not find the requested resource" in exc.message:
                raise self._error(exc) from exc
        body = {
            "apiVersion": API_VERSION,
            "kind": "ComputeGroupLedger",
            "metadata": {"name": self.name, "labels": {MANAGED_BY: "computegroups", STORE_LABEL: self.name}},
            "spec": {"revision": 0, "gcBefore": 0, "mirrored": 0, "log": []},
        }
        try:
            return await self.client.post(self._ledger_path.rsplit("/", 1)[0], body)
        except KubeError as exc:
            if exc.status == 409:  # another process created it first
                try:
                    return await self.client.get(self._ledger_path)
                except KubeError as again:
                    raise self._error(again) from again
            raise self._error(exc) from exc

    # -- events -----------------------------------------------------------------------
    async def record(self, events: Sequence[Event]) -> None:
        """Queue events that change no record (refusals, health); written in the background."""
        if self._client is None:
            raise StateError(f"state {self}: store is not open")
        if self._dirty or self._mirroring.locked():  # after the events of commits still being written
            self._dirty.append(({}, events))
            self._wake.set()
        else:
            self.event_log.add(events, self._involved)

    async def events_since(self, seq: int, limit: int = 1000) -> list[Event]:
        """The store's events numbered after ``seq`` (a number is its write's resourceVersion), oldest first."""
        try:
            return await self.event_log.since(seq, limit)
        except KubeError as exc:
            raise self._error(exc) from exc

    def _involved(self, e: Event) -> Obj:
        """The object an event is about: its group's ComputeGroup, or this store's ledger."""
        if e.group_id is None:
            kind, name = "ComputeGroupLedger", self.name
            self._ledger_uid = str(((self._ledger or {}).get("metadata") or {}).get("uid") or self._ledger_uid)
            uid = self._ledger_uid
        else:
            kind, name = "ComputeGroup", cr_name(e.group_id, self.name)
            uid = self._uids.get(name, "")
        ref: Obj = {"apiVersion": API_VERSION, "kind": kind, "name": name, "namespace": self.namespace}
        if uid:
            ref["uid"] = uid
        return ref

    # -- reads ------------------------------------------------------------------------
    async def changes_since(self, revision: int) -> Changes:
        for _ in range(50):
            ledger = await self._get_ledger()
            self._take(ledger)  # unless the watch has delivered a newer one since
            spec = ledger.get("spec") or {}
            seen = _from_ledger(spec, revision)
            if seen is not None:
                return seen
            full = await self._reload(int(spec.get("revision", 0)), _log_of(spec))
            if full is not None:
                return full
        raise StateError(f"state {self}: the store kept changing while it was read; gave up")

    async def _reload(self, current: int, log: list[Obj]) -> Changes | None:
        """All records: the group objects but deletion tombstones, overlaid by the log of the ledger read
        before the list (``current``, ``log``) and by the log of one read after it. None: read again.

        Released groups are read too: they are the manager's tombstones (a second release of one is a
        no-op, in any manager), bounded by its ``tombstone_limit``."""
        try:
            listed = await self.client.list(
                self._groups_path, labelSelector=f"{STORE_LABEL}={self.name},{STATE_LABEL}!=deleted"
            )
        except KubeError as exc:
            raise self._error(exc) from exc
        after = self._ledger = await self._get_ledger()
        aspec = after.get("spec") or {}
        arev = int(aspec.get("revision", 0))
        alog = _log_of(aspec)
        if (int(alog[0]["revision"]) if alog else arev + 1) > current + 1:
            return None  # so many commits during the list that the log no longer reaches back to `current`
        effective: dict[str, GroupRecord | None] = {}
        objects: dict[str, tuple[str, int]] = {}
        for item in listed["items"]:
            ispec = item.get("spec") or {}
            if int(ispec.get("revision", 0)) > arev:
                return None  # not expected (the list came before the second read); read again
            objects[item["metadata"]["name"]] = (str(item["metadata"]["resourceVersion"]), int(ispec["revision"]))
            self._uids[item["metadata"]["name"]] = str(item["metadata"].get("uid") or "")
            if not ispec.get("deleted"):  # objects written before the state label existed
                rec = _decode(ispec.get("record"))
                effective[rec.id] = rec
        ups, _ = _fold(log + [e for e in alog if int(e["revision"]) > current])
        effective.update(ups)
        self._objects = objects
        marks = {n: why for n, why in _cordons_of(aspec, -1).items() if why is not None}
        return Changes(arev, [r for r in effective.values() if r is not None], (), full=True, cordons=marks)

    # -- writes -----------------------------------------------------------------------
    async def commit(
        self,
        expected: int,
        upserts: Sequence[GroupRecord],
        deletes: Sequence[str] = (),
        events: Sequence[Event] = (),
        cordons: Cordons = NO_CORDONS,
    ) -> int:
        """The ledger's write is the commit; ``events`` are queued for writing after it (never atomically
        with it: a failed or dropped Event write leaves the commit as it is)."""
        ledger = self._ledger
        if ledger is None or int((ledger.get("spec") or {}).get("revision", 0)) != expected:
            ledger = self._ledger = await self._get_ledger()
        spec = ledger.get("spec") or {}
        current = int(spec.get("revision", 0))
        if current != expected:
            raise RevisionConflict(f"revision is {current}, not {expected}")
        rev = expected + 1
        # Entries this writer wrote into the group objects in full are marked done (by their own writer,
        # on its next commit), so no other writer has to check them.
        mine = self._mirrored
        log = [{**e, "done": True} if not e.get("done") and int(e["revision"]) in mine else e for e in _log_of(spec)]
        changes = {"upserts": [r.to_json() for r in upserts], "deletes": list(deletes)}
        entry: Obj = {"revision": rev, "changes": json.dumps(changes, separators=(",", ":"))}
        kept = _trim([*log, entry])
        keep_from = int(kept[0]["revision"])
        # Everything older than the log must be in the group objects: write the change sets that leave
        # the log now, and old ones, unless they are done.
        mirrored = max(int(spec.get("mirrored", 0)), (int(log[0]["revision"]) if log else rev) - 1)
        for old in log:
            orev = int(old["revision"])
            if orev > mirrored and not old.get("done") and (orev < keep_from or orev <= rev - MIRROR_LAG):
                await self._apply(old, probe=True)
                old["done"] = True
        for old in log:
            if int(old["revision"]) == mirrored + 1 and old.get("done"):
                mirrored += 1
        self._mirrored = {r for r in mine if r > mirrored}
        gc_before = int(spec.get("gcBefore", 0))
        sweep = rev % GC_EVERY == 0 and rev > GC_LAG
        if sweep:
            gc_before = rev - GC_LAG
        new_spec: Obj = {"revision": rev, "gcBefore": gc_before, "mirrored": mirrored, "log": kept}
        marks = dict(spec.get("cordons") or {})
        marks.update({node: {"revision": rev, "reason": why} for node, why in cordons.items()})
        if marks:
            new_spec["cordons"] = marks
        body = {
            "apiVersion": API_VERSION,
            "kind": "ComputeGroupLedger",
            "metadata": {**ledger["metadata"], "resourceVersion": ledger["metadata"]["resourceVersion"]},
            "spec": new_spec,
        }
        try:
            self._ledger = await self.client.put(self._ledger_path, body)
        except KubeError as exc:
            self._ledger = None
            if exc.status == 409:
                # Lost the race. Wait a little, longer after each loss in a row (jittered), so two busy
                # writers do not keep colliding; the caller catches up and decides again.
                self._lost += 1
                await asyncio.sleep(random.uniform(0, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** min(self._lost, 8))))
                raise RevisionConflict(f"the ledger moved on from revision {expected}") from exc
            raise self._error(exc) from exc
        self._lost = 0
        # Committed. The group objects are written by the background writer, then the events (about
        # those objects); that can fail without losing anything (the change set is in the log until
        # it is in the objects).
        self._dirty.append((entry, events))
        if sweep:
            self._sweep_before = gc_before
        self._wake.set()
        return rev

    # -- the group objects ----------------------------------------------------------------
    async def _mirror_loop(self) -> None:
        pause = MIRROR_DELAY_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            await asyncio.sleep(pause)
            try:
                await self.flush()
                pause = MIRROR_DELAY_S
            except StateError as exc:  # kept, and tried again after a pause
                log_.warning("%s; tried again in %.2fs (the change sets are safe in the ledger)", exc, 2 * pause)
                pause = min(2 * pause, 2.0)
                self._wake.set()

    async def flush(self) -> None:
        """Write every change set this store committed into the group objects: each object once, at its
        newest state, then their events. StateError if a write failed: the change sets are kept for the
        next flush (and they stay in the ledger's log, whose writers finish any that leave it unwritten)."""
        async with self._mirroring:
            batch, self._dirty = self._dirty, []
            if batch:
                try:
                    await self._write_all(_net([entry for entry, _ in batch if entry]))
                except (KubeError, StateError) as exc:
                    self._dirty[:0] = batch
                    last = max(int(entry.get("revision", 0)) for entry, _ in batch)
                    raise StateError(f"state {self}: group objects up to revision {last} unwritten: {exc}") from exc
                self._mirrored.update(int(entry["revision"]) for entry, _ in batch if entry)
                self.event_log.add([e for _, events in batch for e in events], self._involved)
            if self._sweep_before:
                before, self._sweep_before = self._sweep_before, 0
                try:
                    await self._sweep(before)
                except KubeError as exc:
                    raise self._error(exc) from exc

    async def _apply(self, change: Obj, probe: bool = False) -> None:
        """Write one change set into the group objects (idempotent; each object only moves forward).
        ``probe``: the objects most likely exist already (another writer's change set): read before writing."""
        try:
            await self._write_all(_net([change], probe))
        except KubeError as exc:
            raise self._error(exc) from exc
        self._mirrored.add(int(change.get("revision", 0)))

    async def _write_all(self, net: dict[str, tuple[GroupRecord | None, int, bool]]) -> None:
        """Write each group object of ``net`` (:func:`_net`), 16 at a time."""
        sem = asyncio.Semaphore(16)

        async def one(gid: str, rec: GroupRecord | None, rev: int, probe: bool) -> None:
            async with sem:
                await self._write(gid, rec, rev, probe)

        await asyncio.gather(*(one(g, r, v, p) for g, (r, v, p) in net.items()))

    async def _write(self, gid: str, rec: GroupRecord | None, rev: int, probe: bool) -> None:
        """Move one group object forward to revision ``rev`` (never backward). ``probe``: it most likely
        exists already (written by another change set): read it first rather than try to create it."""
        name = cr_name(gid, self.name)
        state = "deleted" if rec is None else rec.state.value
        labels = {MANAGED_BY: "computegroups", STORE_LABEL: self.name, STATE_LABEL: state}
        spec: dict[str, Any] = {"id": gid, "revision": rev, "deleted": rec is None, "state": state}
        if rec is not None:
            spec.update(
                record=rec.to_json(),
                nodeName=rec.node_id,
                component=rec.component or "",
                gpus=f"{rec.gpus:g}",
            )
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": "ComputeGroup",
            "metadata": {"name": name, "labels": labels},
            "spec": spec,
        }
        known = self._objects.get(name)
        for _ in range(20):
            if known is None and probe:
                probe = False
                try:
                    cur = await self.client.get(f"{self._groups_path}/{name}")
                    known = (str(cur["metadata"]["resourceVersion"]), int((cur.get("spec") or {}).get("revision", 0)))
                except KubeError as exc:
                    if exc.status != 404:
                        raise
            if known is None:
                try:
                    made = await self.client.post(self._groups_path, body)
                    self._objects[name] = (made["metadata"]["resourceVersion"], rev)
                    self._uids[name] = str(made["metadata"].get("uid") or "")
                    return
                except KubeError as exc:
                    if exc.status != 409:
                        raise
                try:
                    cur = await self.client.get(f"{self._groups_path}/{name}")
                except KubeError as exc:
                    if exc.status == 404:
                        continue
                    raise
                known = (str(cur["metadata"]["resourceVersion"]), int((cur.get("spec") or {}).get("revision", 0)))
            if known[1] >= rev:
                return  # someone already moved it to this revision or past it
            body["metadata"]["resourceVersion"] = known[0]
            try:
                made = await self.client.put(f"{self._groups_path}/{name}", body)
                self._objects[name] = (made["metadata"]["resourceVersion"], rev)
                self._uids[name] = str(made["metadata"].get("uid") or "")
                return
            except KubeError as exc:
                if exc.status not in (404, 409):
                    raise
                body["metadata"].pop("resourceVersion", None)
                known = None
        raise StateError(f"state {self}: group object {name} kept changing while revision {rev} was written")

    async def _sweep(self, before: int) -> None:
        """Remove deletion tombstones older than ``before`` (each guarded by its resourceVersion)."""
        listed = await self.client.list(
            self._groups_path, labelSelector=f"{STORE_LABEL}={self.name},{STATE_LABEL}=deleted"
        )
        for item in listed["items"]:
            if int((item.get("spec") or {}).get("revision", 0)) >= before:
                continue
            meta = item["metadata"]
            try:
                await self.client.delete(
                    f"{self._groups_path}/{meta['name']}",
                    {"preconditions": {"resourceVersion": meta["resourceVersion"]}},
                )
                self._objects.pop(meta["name"], None)
                self._uids.pop(meta["name"], None)
            except KubeError as exc:
                if exc.status not in (404, 409):
                    raise


def _net(changes: Sequence[Obj], probe: bool = False) -> dict[str, tuple[GroupRecord | None, int, bool]]:
    """Change sets (oldest first) as the newest state of each group they touch: id -> (record, or None
    when deleted; the revision; whether its object most likely exists already, so is read before it is
    written: a deletion, a release or drain first seen, or every one with ``probe``)."""
    net: dict[str, tuple[GroupRecord | None, int, bool]] = {}
    for change in changes:
        rev = int(change.get("revision", 0))
        ups, dels = _changes_of(change)
        for raw in ups:
            rec = _decode(raw)
            first = net.get(rec.id)
            net[rec.id] = (rec, rev, probe or rec.state in _MOST_LIKELY_THERE if first is None else first[2])
        for gid in dels:
            net[str(gid)] = (None, rev, True)
    return net


def _from_ledger(spec: Obj, revision: int) -> Changes | None:
    """What changed after ``revision`` according to one ledger version; None if its log does not reach back."""
    current = int(spec.get("revision", 0))
    if current == revision:
        return Changes(current)
    log = _log_of(spec)
    start = int(log[0]["revision"]) if log else current + 1
    if not (0 <= revision < current and revision >= start - 1):
        return None
    ups, dels = _fold(e for e in log if int(e["revision"]) > revision)
    marks = _cordons_of(spec, revision)
    return Changes(current, [r for r in ups.values() if r is not None], list(dels), cordons=marks)


def _cordons_of(spec: Obj, after: int) -> dict[str, str | None]:
    """The ledger's node marks written after revision ``after`` (node -> reason, None: uncordoned)."""
    out: dict[str, str | None] = {}
    for node, mark in (spec.get("cordons") or {}).items():
        if not isinstance(mark, dict) or not isinstance(mark.get("reason"), str | None):
            raise StateError(f"ledger spec.cordons.{node}: {mark!r} is not a node mark")
        if int(mark.get("revision", 0)) > after:
            out[str(node)] = mark["reason"]
    return out


def _log_of(spec: Obj) -> list[Obj]:
    """The ledger's change sets, oldest first (a ledger of the older format has one, ``pending``)."""
    log = spec.get("log")
    if log is None:
        pending = spec.get("pending")
        return [pending] if pending else []
    return list(log)


def _trim(log: list[Obj]) -> list[Obj]:
    """The newest change sets within LOG_ENTRIES and about LOG_BYTES (the newest is always kept)."""
    kept: list[Obj] = []
    size = 0
    for entry in reversed(log[-LOG_ENTRIES:]):
        changes = entry.get("changes")
        size += len(changes) if isinstance(changes, str) else len(json.dumps(entry, separators=(",", ":")))
        if kept and size > LOG_BYTES:
            break
        kept.append(entry)
    kept.reverse()
    return kept


def _fold(entries: Any) -> tuple[dict[str, GroupRecord | None], list[str]]:
    """The net effect of change sets in order: id -> last record written (None: deleted), and the deleted ids."""
    out: dict[str, GroupRecord | None] = {}
    for entry in entries:
        ups, dels = _changes_of(entry)
        for raw in ups:
            rec = _decode(raw)
            out[rec.id] = rec
        for gid in dels:
            out[str(gid)] = None
    return out, [g for g, r in out.items() if r is None]


def _changes_of(entry: Obj) -> tuple[list[Any], list[Any]]:
    """A log entry's upserts (records as JSON) and deleted ids: from its ``changes`` string, or from the
    fields of the older format."""
    changes = entry.get("changes")
    if changes is None:
        return list(entry.get("upserts") or []), list(entry.get("deletes") or [])
    try:
        parsed = json.loads(changes)
    except (TypeError, ValueError):
        parsed = None
    ups, dels = (parsed.get("upserts", []), parsed.get("deletes", [])) if isinstance(parsed, dict) else (None, None)
    if not isinstance(ups, list) or not isinstance(dels, list):
        raise StateError(f"state: ledger change set {entry.get('revision')} is unreadable")
    return ups, dels


def _decode(raw: Any) -> GroupRecord:
    try:
        return GroupRecord.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"state: a group record is unreadable: {exc}") from exc
