"""Events: what happened to a group or a device, and the stream that delivers them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

__all__ = ["Event", "event_stream"]


@dataclass(frozen=True, slots=True)
class Event:
    """Something that happened to a group or a device, for the event stream and logs."""

    kind: str  # allocated, released, drained, created, deleted, device-unhealthy, device-healthy, ...
    group_id: str | None = None
    node_id: str | None = None
    component: str | None = None
    detail: str = ""
    at: float = field(default_factory=time.time)


async def event_stream(subscribers: list[asyncio.Queue[Event]]) -> AsyncIterator[Event]:
    """Events published to ``subscribers`` from now on, until the consumer stops iterating."""
    q: asyncio.Queue[Event] = asyncio.Queue()
    subscribers.append(q)
    try:
        while True:
            yield await q.get()
    finally:
        subscribers.remove(q)
