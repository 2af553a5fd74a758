"""List-then-watch: follow a collection of the API server incrementally, as client-go's informers do.

:func:`follow` is the loop, written once for every collection the project follows (the state
store's ledger, its event log, and the nodes, pods, ResourceSlices and ResourceClaims discovery
reads): list once, then watch from the list's ``resourceVersion`` with bookmarks on, moving that
version on with every event; when the server ends a watch (after ``timeout_s``) or the connection
drops, watch again from the last version, so nothing is missed and nothing is listed again; when
the server says that version is too old (``410 Gone``: etcd compacted it away), list again (a
resync) and go on from there. Failures back off (doubling, jittered, up to 5 s) and are logged
once per run of failures.

:class:`Informer` keeps a collection's objects by namespace and name on that loop, with a version
that moves with every change it takes in and an :class:`asyncio.Event` set on each, so a reader
rebuilds what it derives only when something changed, and can wait for it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

from computegroups.kube.client import KubeClient, KubeError, Obj
from computegroups.retry import backoff_s
from computegroups.tasks import stop_task

__all__ = ["WATCH_S", "Informer", "follow", "key_of"]

log = logging.getLogger("computegroups.k8s")

WATCH_S = 300  # the server ends each watch after this long; it is started again from where it was


def key_of(obj: Obj) -> str:
    """``namespace/name`` (``name`` for cluster-scoped objects)."""
    meta = obj.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{ns}/{meta.get('name')}" if ns else str(meta.get("name"))


async def follow(
    client: Callable[[], KubeClient],
    path: str,
    relist: Callable[[], Awaitable[str]],
    take: Callable[[str, Obj], None],
    *,
    what: str,
    params: dict[str, str] | None = None,
    watching: Callable[[bool], None] | None = None,
    since: str | None = None,
    timeout_s: int = WATCH_S,
) -> None:
    """Follow ``path`` until cancelled (see the module docstring).

    ``relist()`` reads the collection (or the object) afresh and returns the ``resourceVersion`` to
    watch from; ``take(type, object)`` is called with each ``ADDED``, ``MODIFIED``, ``DELETED`` and
    ``BOOKMARK`` the watch delivers, in order; ``watching(open)`` is told when a watch opens and
    when it stops (while one is open, what ``take`` was given is as new as the server sent it).
    ``since``: a version the caller has just read, to watch from without a first ``relist``.
    ``client()`` gives the connection (it raises if the owner closed it).
    """
    rv = since
    failures = 0
    while True:
        started = time.monotonic()
        delivered = False
        try:
            if rv is None:
                rv = await relist()
            stream = client().watch(
                path, timeout_s=timeout_s, resourceVersion=rv, allowWatchBookmarks="true", **(params or {})
            )
            if watching is not None:
                watching(True)
            async for change in stream:
                kind = str(change.get("type") or "")
                obj = change.get("object") or {}
                if kind == "ERROR":  # 410 Gone is answered below, as for an HTTP 410
                    raise KubeError(int(obj.get("code") or 0), "watch", what, str(obj.get("message") or ""))
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    rv = str(version)
                take(kind, obj)
                delivered = True
                failures = 0
            if delivered or time.monotonic() - started > 1:
                continue
            failures += 1  # ended at once with nothing: wait a little, as after an error
        except KubeError as exc:
            if exc.status == 410:
                rv = None
                continue
            failures += 1
            if failures == 1:
                log.warning("kubernetes: watching %s failed, trying again: %s", what, exc.one_line())
        except Exception as exc:  # an unreadable line; the owner closed the client; a reader's error
            failures += 1
            if failures == 1:
                log.warning("kubernetes: watching %s failed, trying again: %s", what, exc)
        finally:
            if watching is not None:
                watching(False)
        await asyncio.sleep(backoff_s(failures, initial_s=0.05, max_s=5.0, jitter=0.5))


class Informer:
    """A collection's objects (``items``: ``namespace/name`` -> object), kept by :func:`follow`.

    :meth:`start` lists it (raising :class:`KubeError` if that fails, so the caller's first view is
    complete or refused) and then follows it in a background task. ``version`` moves on with every
    change taken in, and ``changed`` (set on each; the reader clears it) is shared by the informers
    a reader follows together. With ``relevant`` (what the reader reads of an object), a change that
    leaves it equal (a status heartbeat) is kept without moving either; with ``quiet`` (objects the
    reader made itself, whose changes it knows of already), so are their adds, changes and deletions.
    """

    def __init__(
        self,
        client: KubeClient,
        path: str,
        *,
        params: Mapping[str, str | None] | None = None,
        changed: asyncio.Event | None = None,
        relevant: Callable[[Obj], object] | None = None,
        quiet: Callable[[Obj], bool] | None = None,
    ) -> None:
        self.client = client
        self.path = path
        self.params = {k: v for k, v in (params or {}).items() if v is not None}
        self.items: dict[str, Obj] = {}
        self.version = 0
        self.changed = changed if changed is not None else asyncio.Event()
        self.relevant = relevant
        self.quiet = quiet
        self.lists = 0  # how many times the collection was listed (1 + one per resync)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """List, then follow in the background (idempotent)."""
        if self._task is not None:
            return
        since = await self._relist()
        self._task = asyncio.get_running_loop().create_task(
            follow(
                lambda: self.client,
                self.path,
                self._relist,
                self._take,
                what=self.path,
                params=self.params,
                since=since,
            ),
            name=f"computegroups-informer{self.path}",
        )

    async def _relist(self) -> str:
        page = await self.client.list(self.path, **self.params)
        self.items = {key_of(o): o for o in page["items"]}
        self.lists += 1
        self._moved()
        return str((page.get("metadata") or {}).get("resourceVersion") or "")

    def _take(self, kind: str, obj: Obj) -> None:
        quiet = self.quiet
        if kind in ("ADDED", "MODIFIED"):
            key = key_of(obj)
            held = self.items.get(key)
            self.items[key] = obj
            if held is not None and self.relevant is not None and self.relevant(held) == self.relevant(obj):
                return  # kept, but nothing a reader derives from it moved
            if quiet is not None and quiet(obj) and (held is None or quiet(held)):
                return  # the reader's own
        elif kind == "DELETED":
            held = self.items.pop(key_of(obj), None)
            if quiet is not None and quiet(obj) and (held is None or quiet(held)):
                return
        else:
            return  # BOOKMARK: only the resourceVersion moved
        self._moved()

    def _moved(self) -> None:
        self.version += 1
        self.changed.set()

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        task, self._task = self._task, None
        await stop_task(task)
