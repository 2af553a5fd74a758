"""Group records as ``ComputeGroup`` custom resources, committed atomically through a ledger.

Kubernetes has no multi-object transaction: one object's ``resourceVersion`` is the
only compare-and-swap. So each store has one small ``ComputeGroupLedger`` object
whose update *is* the commit, and one ``ComputeGroup`` object per group that
people and tools read (``kubectl get computegroups``)::

    ComputeGroupLedger <name>   spec.revision = N
                                spec.pending  = {revision: N, upserts: [records], deletes: [ids]}
    ComputeGroup <group id>     spec.revision = revision of its last write
                                spec.record   = the GroupRecord (spec.deleted: a deletion tombstone)

``commit(expected, upserts, deletes)``:
  1. If the ledger's pending change set may not be in the group objects yet, write it
     (idempotent: see 4).
  2. Replace the ledger with ``revision = expected + 1`` and ``pending`` = the whole change
     set, guarded by the ledger's resourceVersion. A 409 means another writer won:
     :class:`RevisionConflict`, nothing written. **This one write is the commit point.**
  3. Write the change set into the group objects and return ``expected + 1``. A crash here
     loses nothing: the change set is in the ledger, and the next reader overlays it and
     the next writer finishes it (step 1) before it may commit.
  4. A group object is only ever moved forward: it is written with a resourceVersion
     guard and only if its ``spec.revision`` is older than the change set's, so a late
     finisher of an old change set can never overwrite newer data. Deletions are
     tombstone objects with a revision (so a late finisher cannot re-create them);
     tombstones older than ``gcBefore`` are removed later.

``changes_since(rev)`` reads the ledger, lists the group objects and overlays the pending
change set; if a group object is newer than the ledger it read (a commit landed in
between), it reads again. So a reader sees exactly the state after some commit, never
a state between two.

Errors from the API server become :class:`StateError` with a one-line message naming the
verb and the resource (``forbidden: cannot update computegroupledgers.computegroups.dev ...``).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

from computegroups.errors import StateError
from computegroups.kube.client import KubeClient, KubeError, Obj
from computegroups.kube.names import API_GROUP, API_VERSION, DELETED_LABEL, DNS_NAME, MANAGED_BY, STORE_LABEL, cr_name
from computegroups.model import GroupRecord
from computegroups.state.base import Changes, RevisionConflict

__all__ = ["API_GROUP", "API_VERSION", "KubernetesStateStore", "cr_name"]

log = logging.getLogger("computegroups.k8s")

GC_EVERY = 256  # commits between sweeps of old deletion tombstones
GC_LAG = 1024  # revisions a deletion tombstone is kept (readers further behind get a full reload)


class KubernetesStateStore:
    """The :class:`~computegroups.state.base.StateStore` over custom resources (see the module docstring).

    ``namespace``: where the ledger and group objects live (created by ``deploy/``).
    ``name``: the store (ledger) name; several stores can share a namespace.
    ``kubeconfig``/``context``/``in_cluster``: as for the Kubernetes provider.
    """

    def __init__(
        self,
        kubeconfig: str | os.PathLike[str] | None = None,
        *,
        namespace: str = "computegroups",
        name: str = "default",
        context: str | None = None,
        in_cluster: bool | None = None,
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
        self._applied = -1  # the pending change set at this revision is known to be in the group objects
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

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

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
            "spec": {"revision": 0, "gcBefore": 0},
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

    # -- reads ------------------------------------------------------------------------
    async def changes_since(self, revision: int) -> Changes:
        for _ in range(50):
            ledger = await self._get_ledger()
            self._ledger = ledger
            spec = ledger.get("spec") or {}
            current = int(spec.get("revision", 0))
            if current == revision:
                return Changes(current)
            try:
                listed = await self.client.list(self._groups_path, labelSelector=f"{STORE_LABEL}={self.name}")
            except KubeError as exc:
                raise self._error(exc) from exc
            effective: dict[str, tuple[int, GroupRecord | None]] = {}
            objects: dict[str, tuple[str, int]] = {}
            newer = False
            for item in listed["items"]:
                ispec = item.get("spec") or {}
                rev = int(ispec.get("revision", 0))
                if rev > current:
                    newer = True
                    break
                objects[item["metadata"]["name"]] = (str(item["metadata"]["resourceVersion"]), rev)
                gid = str(ispec.get("id"))
                record = None if ispec.get("deleted") else _decode(ispec.get("record"))
                effective[gid] = (rev, record)
            if newer:
                continue  # a commit landed between reading the ledger and listing; read again
            self._objects = objects
            pending = spec.get("pending") or {}
            prev = int(pending.get("revision", 0))
            behind = False
            for raw in pending.get("upserts") or []:
                rec = _decode(raw)
                if effective.get(rec.id, (-1, None))[0] < prev:
                    effective[rec.id] = (prev, rec)
                    behind = True
            for gid in pending.get("deletes") or []:
                if effective.get(gid, (-1, None))[0] < prev:
                    effective[gid] = (prev, None)
                    behind = True
            if not behind:
                self._applied = max(self._applied, prev)
            if revision < 0 or revision > current or revision < int(spec.get("gcBefore", 0)):
                return Changes(current, [r for _, r in effective.values() if r is not None], (), full=True)
            ups = [r for rev, r in effective.values() if rev > revision and r is not None]
            dels = [gid for gid, (rev, r) in effective.items() if rev > revision and r is None]
            return Changes(current, ups, dels)
        raise StateError(f"state {self}: the store kept changing while it was read; gave up")

    # -- writes -----------------------------------------------------------------------
    async def commit(self, expected: int, upserts: Sequence[GroupRecord], deletes: Sequence[str] = ()) -> int:
        ledger = self._ledger
        if ledger is None or int((ledger.get("spec") or {}).get("revision", 0)) != expected:
            ledger = self._ledger = await self._get_ledger()
        spec = ledger.get("spec") or {}
        current = int(spec.get("revision", 0))
        if current != expected:
            raise RevisionConflict(f"revision is {current}, not {expected}")
        pending = spec.get("pending") or {}
        if pending and int(pending.get("revision", 0)) > self._applied:
            await self._apply(pending)  # the previous change set must be in place before it is overwritten
        rev = expected + 1
        gc_before = int(spec.get("gcBefore", 0))
        sweep = rev % GC_EVERY == 0 and rev > GC_LAG
        if sweep:
            gc_before = rev - GC_LAG
        change = {
            "revision": rev,
            "upserts": [r.to_json() for r in upserts],
            "deletes": list(deletes),
        }
        body = {
            "apiVersion": API_VERSION,
            "kind": "ComputeGroupLedger",
            "metadata": {**ledger["metadata"], "resourceVersion": ledger["metadata"]["resourceVersion"]},
            "spec": {"revision": rev, "gcBefore": gc_before, "pending": change},
        }
        try:
            self._ledger = await self.client.put(self._ledger_path, body)
        except KubeError as exc:
            self._ledger = None
            if exc.status == 409:
                raise RevisionConflict(f"the ledger moved on from revision {expected}") from exc
            raise self._error(exc) from exc
        # Committed. Writing the group objects can fail now without losing anything.
        try:
            await self._apply(change)
            if sweep:
                await self._sweep(gc_before)
        except (KubeError, StateError) as exc:
            log.warning(
                "state %s: revision %d is committed; its group objects will be finished later: %s", self, rev, exc
            )
        return rev

    async def _apply(self, change: Obj) -> None:
        rev = int(change.get("revision", 0))
        writes: list[tuple[str, GroupRecord | None]] = [(str(r["id"]), _decode(r)) for r in change.get("upserts") or []]
        writes += [(str(gid), None) for gid in change.get("deletes") or []]
        sem = asyncio.Semaphore(16)

        async def one(gid: str, rec: GroupRecord | None) -> None:
            async with sem:
                await self._write(gid, rec, rev)

        try:
            await asyncio.gather(*(one(g, r) for g, r in writes))
        except KubeError as exc:
            raise self._error(exc) from exc
        self._applied = max(self._applied, rev)

    async def _write(self, gid: str, rec: GroupRecord | None, rev: int) -> None:
        """Move one group object forward to revision ``rev`` (never backward)."""
        name = cr_name(gid, self.name)
        labels = {MANAGED_BY: "computegroups", STORE_LABEL: self.name}
        spec: dict[str, Any] = {"id": gid, "revision": rev, "deleted": rec is None}
        if rec is None:
            labels[DELETED_LABEL] = "true"
        else:
            spec.update(
                record=rec.to_json(),
                state=rec.state.value,
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
            if known is None:
                try:
                    made = await self.client.post(self._groups_path, body)
                    self._objects[name] = (made["metadata"]["resourceVersion"], rev)
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
            self._groups_path, labelSelector=f"{STORE_LABEL}={self.name},{DELETED_LABEL}=true"
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
            except KubeError as exc:
                if exc.status not in (404, 409):
                    raise


def _decode(raw: Any) -> GroupRecord:
    try:
        return GroupRecord.from_json(raw)
    except (ValueError, KeyError, TypeError) as exc:
        raise StateError(f"state: a group record is unreadable: {exc}") from exc
