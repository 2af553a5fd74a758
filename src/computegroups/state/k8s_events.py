"""The Kubernetes store's event log: core ``v1 Event`` objects, as ``kubectl get events`` shows them.

Each event is an ``Event`` in the store's namespace (``/api/v1/namespaces/<ns>/events``)::

    involvedObject      the group's ComputeGroup (kind, name = cr_name(group id), namespace, uid), or the
                        store's ComputeGroupLedger for events of no group (refusals, health)
    reason, type        the kind in CamelCase (Allocated, Refused, DeviceUnhealthy); Warning for refusals,
                        provider errors, unhealthy devices and groups, shortfalls; Normal otherwise
    message             the detail (a sentence naming the group, component and node when there is none)
    count, firstTimestamp, lastTimestamp, eventTime, source.component, reportingComponent/Instance
    labels              app.kubernetes.io/managed-by=computegroups, computegroups.dev/store=<store>
    annotations         computegroups.dev/event-kind, -group, -component, -node, -at (and -detail when the
                        message is not the detail): the computegroups event, read back exactly

Writing (:meth:`KubeEventLog.add`) never waits for the API server: events are queued and written by one
background task, **after** the commit that made them (Kubernetes has no multi-object transaction), and a
write that fails is logged and counted (``failed``), never raised: the commit stands. As client-go's
EventRecorder does, an event identical to one this process wrote within :data:`AGGREGATE_WINDOW_S` (same
object, kind, detail, component and node) increments that object's ``count`` and ``lastTimestamp`` (one
PATCH) instead of making a new object, and identical events still queued are merged into one write. Writes
pass a token bucket (:data:`EVENT_BURST` at once, then :data:`EVENT_RATE` a second); while it is empty
they wait in the queue, which holds at most :data:`QUEUE_LIMIT` distinct events; events beyond it, and
those still queued :data:`FLUSH_S` after ``close()`` began, are dropped and counted (``dropped``).

Reading (:meth:`KubeEventLog.since`): an event's number is the ``resourceVersion`` of the write that
recorded it (etcd's revision: one order for every process, the order the API server made the writes
visible in). The first read lists the store's events (paged) and keeps the newest ``EVENT_LIMIT``; a
background watch from the list's ``resourceVersion`` then adds each new event, and each ``count``
increment as a new occurrence, within moments of its write. A reader that starts after an aggregated
event was incremented sees it once, at its latest occurrence. How long events are kept is the API
server's ``--event-ttl`` (1 h by default), counted from each object's last write.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import os
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from computegroups.errors import StateError
from computegroups.events import Event
from computegroups.kube.client import KubeClient, KubeError, Obj
from computegroups.kube.informer import follow
from computegroups.kube.names import API_GROUP, MANAGED_BY, STORE_LABEL
from computegroups.state.base import EVENT_LIMIT
from computegroups.tasks import stop_task

__all__ = [
    "AGGREGATE_WINDOW_S",
    "EVENT_BURST",
    "EVENT_RATE",
    "QUEUE_LIMIT",
    "KubeEventLog",
    "TokenBucket",
    "event_reason",
    "event_type",
]

log = logging.getLogger("computegroups.k8s")

COMPONENT = "computegroups"  # source.component and reportingComponent
#: Event writes (creates and patches) let through at once, then per second: kubelet's defaults for its
#: events (eventBurst 100, eventRecordQPS 50), enough for a planner committing dozens of changes a second.
EVENT_BURST = 100
EVENT_RATE = 50.0
#: An identical event within this long of its object's last write increments that object (client-go's
#: aggregation window), for up to AGGREGATE_KEYS distinct events (its LRU cache's size).
AGGREGATE_WINDOW_S = 600.0
AGGREGATE_KEYS = 4096
#: Distinct events waiting for the limiter; beyond this they are dropped (client-go's queue length).
QUEUE_LIMIT = 1000
FLUSH_S = 5.0  # close() waits this long for the queue to be written
MESSAGE_LIMIT = 1024  # the API server refuses a longer message; the detail is then kept in an annotation
WARNING_KINDS = frozenset({"refused", "provider-error"})
WARNING_SUFFIXES = ("-unhealthy", "-shortfall", "-vanished")

_ANN = f"{API_GROUP}/event-"
KIND_ANN, GROUP_ANN, COMPONENT_ANN = f"{_ANN}kind", f"{_ANN}group", f"{_ANN}component"
NODE_ANN, AT_ANN, DETAIL_ANN = f"{_ANN}node", f"{_ANN}at", f"{_ANN}detail"


def event_reason(kind: str) -> str:
    """The Event ``reason`` of a kind: ``device-unhealthy`` -> ``DeviceUnhealthy``."""
    words = kind.replace("_", "-").split("-")
    return "".join(w[:1].upper() + w[1:] for w in words if w)[:128] or "Event"


def event_type(kind: str) -> str:
    """``Warning`` for refusals, provider errors, unhealthy devices and groups, shortfalls; else ``Normal``."""
    return "Warning" if kind in WARNING_KINDS or kind.endswith(WARNING_SUFFIXES) else "Normal"


def _message(e: Event) -> str:
    if e.detail:
        return e.detail
    words = [e.kind.replace("-", " ")]
    if e.group_id:
        words.append(f"group {e.group_id}")
    if e.component:
        words.append(f"of {e.component}")
    if e.node_id:
        words.append(f"on node {e.node_id}")
    return " ".join(words)


def _time(at: float, micro: bool = False) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if micro else "%Y-%m-%dT%H:%M:%SZ")


def _seconds(text: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def event_object(
    e: Event, involved: Obj, *, name: str, namespace: str, store: str, count: int, first: float, instance: str
) -> Obj:
    """The ``v1 Event`` of ``e`` (``count`` occurrences, the first at ``first``)."""
    message = _message(e)
    annotations = {KIND_ANN: e.kind, AT_ANN: repr(e.at)}
    for key, value in ((GROUP_ANN, e.group_id), (COMPONENT_ANN, e.component), (NODE_ANN, e.node_id)):
        if value is not None:
            annotations[key] = value
    if message != e.detail or len(message) > MESSAGE_LIMIT:
        annotations[DETAIL_ANN] = e.detail
    reason = event_reason(e.kind)
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {MANAGED_BY: COMPONENT, STORE_LABEL: store},
            "annotations": annotations,
        },
        "involvedObject": involved,
        "reason": reason,
        "message": message[:MESSAGE_LIMIT],
        "type": event_type(e.kind),
        "source": {"component": COMPONENT},
        "count": count,
        "firstTimestamp": _time(first),
        "lastTimestamp": _time(e.at),
        "eventTime": _time(first, micro=True),
        "action": reason,
        "reportingComponent": COMPONENT,
        "reportingInstance": instance,
    }


def event_of(obj: Obj) -> Event | None:
    """The computegroups event an Event object records (at its latest occurrence); None if unreadable."""
    meta = obj.get("metadata") or {}
    ann = meta.get("annotations") or {}
    try:
        seq = int(meta["resourceVersion"])
    except (KeyError, TypeError, ValueError):
        return None
    try:
        at = float(ann[AT_ANN])
    except (KeyError, TypeError, ValueError):
        at = _seconds(obj.get("lastTimestamp") or obj.get("eventTime")) or 0.0
    return Event(
        kind=str(ann.get(KIND_ANN) or obj.get("reason") or ""),
        group_id=ann.get(GROUP_ANN),
        node_id=ann.get(NODE_ANN),
        component=ann.get(COMPONENT_ANN),
        detail=str(ann[DETAIL_ANN] if DETAIL_ANN in ann else obj.get("message") or ""),
        at=at,
        seq=seq,
    )


class TokenBucket:
    """``burst`` tokens at once, refilled at ``rate`` a second (a token: one API write)."""

    def __init__(self, burst: int, rate: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst = burst
        self.rate = rate
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def _fill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate)
        self._at = now

    def wait_s(self) -> float:
        """Seconds until a token is there (0: now)."""
        self._fill()
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self.rate

    def take(self) -> bool:
        """Take a token if there is one."""
        self._fill()
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


@dataclass(slots=True)
class _Pending:
    involved: Obj
    event: Event  # the latest occurrence
    count: int
    first: float


@dataclass(slots=True)
class _Written:
    name: str
    count: int
    at: float  # monotonic time of the last write


Key = tuple[str, str, str, str, str | None, str | None, str | None]


class KubeEventLog:
    """The events of one store (``namespace``, ``store``) as ``v1 Event`` objects (see the module docstring).

    ``client()`` returns the store's open client. ``burst``/``rate``: the write limiter. Counters:
    ``written`` (API writes sent), ``dropped`` (occurrences dropped by the limiter's queue or at close),
    ``failed`` (occurrences whose write the API server refused or did not answer).
    """

    def __init__(
        self,
        client: Callable[[], KubeClient],
        namespace: str,
        store: str,
        *,
        burst: int = EVENT_BURST,
        rate: float = EVENT_RATE,
    ) -> None:
        if not (isinstance(burst, int) and burst >= 1) or not rate > 0:
            raise StateError(f"state: the event limiter needs a burst >= 1 and a rate > 0, not {burst!r} and {rate!r}")
        self._client = client
        self.namespace = namespace
        self.store = store
        self.path = f"/api/v1/namespaces/{namespace}/events"
        self.selector = f"{MANAGED_BY}={COMPONENT},{STORE_LABEL}={store}"
        self.instance = f"{socket.gethostname()}-{os.getpid()}"[:128]
        self.limiter = TokenBucket(burst, rate)
        self.written = 0
        self.dropped = 0
        self.failed = 0
        self._queue: OrderedDict[Key, _Pending] = OrderedDict()
        self._recent: OrderedDict[Key, _Written] = OrderedDict()
        self._writer: asyncio.Task[None] | None = None
        self._failing = False
        self._last_ns = 0
        self._seen: deque[Event] = deque(maxlen=EVENT_LIMIT)
        self._counts: dict[str, int] = {}  # Event object name -> the count last seen
        self._rv: str | None = None  # where the watch goes on from (None: list first)
        self._watcher: asyncio.Task[None] | None = None

    # -- writing ----------------------------------------------------------------------
    def add(self, events: Sequence[Event], involved: Callable[[Event], Obj]) -> None:
        """Queue ``events`` for writing (``involved``: the object reference of each); returns at once."""
        for e in events:
            ref = involved(e)
            key: Key = (ref["kind"], ref["name"], e.kind, e.detail, e.component, e.node_id, e.group_id)
            pending = self._queue.get(key)
            if pending is not None:  # merged: one write for both
                pending.count += 1
                pending.event = e
                self._queue.move_to_end(key)
            elif len(self._queue) >= QUEUE_LIMIT:
                self._drop(1)
            else:
                self._queue[key] = _Pending(ref, e, 1, e.at)
        if self._queue and (self._writer is None or self._writer.done()):
            self._writer = asyncio.get_running_loop().create_task(self._write_all(), name="computegroups-k8s-events")

    def _drop(self, n: int) -> None:
        if not self.dropped:
            log.warning(
                "events %s/%s: more events than the limiter lets through (burst %d, %g a second); "
                "dropped ones are counted, not logged",
                self.namespace,
                self.store,
                self.limiter.burst,
                self.limiter.rate,
            )
        self.dropped += n

    async def _write_all(self) -> None:
        while self._queue:
            wait = self.limiter.wait_s()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            self.limiter.take()
            key, pending = self._queue.popitem(last=False)
            await self._write(key, pending)

    def _name(self, involved: Obj) -> str:
        ns = max(time.time_ns(), self._last_ns + 1)
        self._last_ns = ns
        return f"{str(involved['name'])[:236].rstrip('.-')}.{ns:x}"

    async def _write(self, key: Key, p: _Pending) -> None:
        """One create, or one patch of the object an identical event went to; failures are counted."""
        now = time.monotonic()
        prior = self._recent.get(key)
        try:
            client = self._client()
            written: _Written | None = None
            if prior is not None and now - prior.at <= AGGREGATE_WINDOW_S:
                count = prior.count + p.count
                body = {
                    "count": count,
                    "lastTimestamp": _time(p.event.at),
                    "metadata": {"annotations": {AT_ANN: repr(p.event.at)}},
                }
                try:
                    self.written += 1
                    await client.patch(f"{self.path}/{prior.name}", body)
                    written = _Written(prior.name, count, now)
                except KubeError as exc:
                    if exc.status != 404:  # 404: gone (its time to live ran out); make a new one
                        raise
            if written is None:
                name = self._name(p.involved)
                obj = event_object(
                    p.event,
                    p.involved,
                    name=name,
                    namespace=self.namespace,
                    store=self.store,
                    count=p.count,
                    first=p.first,
                    instance=self.instance,
                )
                self.written += 1
                await client.post(self.path, obj)
                written = _Written(name, p.count, now)
        except (KubeError, StateError) as exc:
            self.failed += p.count
            if not self._failing:
                self._failing = True
                log.warning(
                    "events %s/%s: could not write an event (the change it records is committed; "
                    "further failures are counted, not logged): %s",
                    self.namespace,
                    self.store,
                    exc.one_line() if isinstance(exc, KubeError) else exc,
                )
            return
        if self._failing:
            self._failing = False
            log.info("events %s/%s: events are written again (%d failed)", self.namespace, self.store, self.failed)
        self._recent[key] = written
        self._recent.move_to_end(key)
        while len(self._recent) > AGGREGATE_KEYS:
            self._recent.popitem(last=False)

    async def flush(self, timeout_s: float | None = None) -> None:
        """Wait until the queued events are written (at most ``timeout_s``; those left then are dropped)."""
        writer = self._writer
        if writer is not None and not writer.done():
            try:
                await asyncio.wait_for(asyncio.shield(writer), timeout_s)
            except TimeoutError:
                await stop_task(writer)
        if self._queue:
            self._drop(sum(p.count for p in self._queue.values()))
            self._queue.clear()

    async def close(self) -> None:
        """Stop watching; write what is queued (for up to :data:`FLUSH_S`). The client is still open."""
        watcher, self._watcher = self._watcher, None
        await stop_task(watcher)
        await self.flush(FLUSH_S)
        if self.dropped or self.failed:
            log.warning(
                "events %s/%s: %d event(s) dropped by the limiter, %d not written",
                self.namespace,
                self.store,
                self.dropped,
                self.failed,
            )

    # -- reading ----------------------------------------------------------------------
    async def since(self, seq: int, limit: int) -> list[Event]:
        """The kept events numbered after ``seq``, oldest first (the first call lists them, then watches)."""
        if self._watcher is None or self._watcher.done():
            if self._watcher is not None and not self._watcher.cancelled() and self._watcher.exception():
                log.warning(
                    "events %s/%s: the watch stopped: %s", self.namespace, self.store, self._watcher.exception()
                )
            await self._list()
            self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="computegroups-k8s-events-watch")
        seen = self._seen
        if not seen or seen[-1].seq <= seq:
            return []
        out: list[Event] = []
        for e in seen:
            if e.seq > seq:
                out.append(e)
                if len(out) >= limit:
                    break
        return out

    async def _list(self) -> None:
        """Read the store's Event objects (paged), keep the newest, and the resourceVersion to watch from."""
        newest: list[tuple[int, str, Event, int]] = []  # a heap of the newest EVENT_LIMIT
        rv: str | None = None
        async for page in self._client().pages(self.path, labelSelector=self.selector):
            rv = str((page.get("metadata") or {}).get("resourceVersion") or "") or None
            for item in page["items"]:
                e = event_of(item)
                if e is None:
                    continue
                entry = (e.seq, str(item["metadata"]["name"]), e, int(item.get("count") or 1))
                if len(newest) < EVENT_LIMIT:
                    heapq.heappush(newest, entry)
                else:
                    heapq.heappushpop(newest, entry)
        after = self._seen[-1].seq if self._seen else 0
        self._counts = {}
        for seq, name, e, count in sorted(newest, key=lambda x: x[0]):
            self._counts[name] = count
            if seq > after:
                self._seen.append(e)
        self._rv = rv

    def _watch(self) -> Coroutine[Any, Any, None]:
        """Add each new event and count increment as the API server reports it (``kube.informer.follow``:
        from the list's version; listed again when too far behind)."""
        return follow(
            self._client,
            self.path,
            self._relist,
            self._apply,
            what=f"events {self.namespace}/{self.store}",
            params={"labelSelector": self.selector},
            since=self._rv,
        )

    async def _relist(self) -> str:
        await self._list()
        return self._rv or ""

    def _apply(self, kind: str, obj: Obj) -> None:
        """Take one watch event in."""
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        if kind == "DELETED":
            self._counts.pop(name, None)
            return
        if kind not in ("ADDED", "MODIFIED"):
            return  # BOOKMARK: only the resourceVersion
        count = int(obj.get("count") or 1)
        if count <= self._counts.get(name, 0):
            return  # not a new occurrence (a label or annotation changed)
        self._counts[name] = count
        e = event_of(obj)
        if e is not None and (not self._seen or e.seq > self._seen[-1].seq):
            self._seen.append(e)
