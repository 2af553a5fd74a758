"""Events: what happened to a group or a device, and the stream that delivers them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

__all__ = ["Event", "Publisher", "event_stream"]

log = logging.getLogger("computegroups")


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a group or a device, for the event stream and logs."""

    kind: str  # allocated, released, drained, created, deleted, device-unhealthy, device-healthy, refused, ...
    group_id: str | None = None
    node_id: str | None = None
    component: str | None = None
    detail: str = ""
    at: float = field(default_factory=time.time)
    seq: int = 0  # its place in the store's event log (0: not stored)

    def to_dict(self) -> dict[str, object]:
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "group_id": self.group_id,
            "node_id": self.node_id,
            "component": self.component,
            "detail": self.detail,
        }


async def event_stream(subscribers: list[asyncio.Queue[Event]]) -> AsyncIterator[Event]:
    """Events published to ``subscribers`` from now on, until the consumer stops iterating."""
    q: asyncio.Queue[Event] = asyncio.Queue()
    subscribers.append(q)
    try:
        while True:
            yield await q.get()
    finally:
        subscribers.remove(q)


class Publisher:
    """Where a manager's events go: its live streams, the recent ones in memory, and the store's event log.

    The events of a change are written by the commit that makes it (``durable=False`` here: already
    stored); others (refusals, health, workers, Dynamo) are appended to the log by one background
    writer, in order, so :meth:`emit` stays synchronous. :meth:`drain` waits for that writer.
    """

    def __init__(self, record: Callable[[Sequence[Event]], Awaitable[None]] | None) -> None:
        self.subscribers: list[asyncio.Queue[Event]] = []
        self.recent: deque[Event] = deque(maxlen=1000)
        self._record = record
        self._pending: list[Event] = []
        self._writer: asyncio.Task[None] | None = None

    def emit(self, event: Event, durable: bool = True) -> None:
        self.recent.append(event)
        log.debug("event %s", event)
        for q in self.subscribers:
            q.put_nowait(event)
        if durable and self._record is not None:
            self._pending.append(event)
            if self._writer is None or self._writer.done():
                self._writer = asyncio.get_running_loop().create_task(self._write())

    async def _write(self) -> None:
        while self._pending and self._record is not None:
            batch, self._pending = self._pending, []
            try:
                await self._record(batch)
            except Exception as exc:  # the live streams have them; the log is best effort here
                log.warning("could not record %d event(s) in the state's event log: %s", len(batch), exc)

    async def note(self, event: Event) -> None:
        """Emit ``event`` and write it to the log now, after what was emitted before it (a refusal)."""
        self.emit(event, durable=False)
        await self.drain()
        if self._record is not None:
            try:
                await self._record([event])
            except Exception as exc:
                log.warning("could not record an event in the state's event log: %s", exc)

    async def drain(self) -> None:
        """Wait until every emitted event is in the store's log."""
        if self._writer is not None:
            await self._writer

    def stream(self) -> AsyncIterator[Event]:
        return event_stream(self.subscribers)
