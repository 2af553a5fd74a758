"""The manager's monitor and reconciler: keep the state in step with the hardware and the processes.

:class:`Monitor` runs one round every ``interval_s`` while a manager is open
(``ComputeGroupManager(provider, state, monitor_interval=5.0)``): it samples
device health and utilization (so ``group.utilization`` and
``node.utilization`` are live), releases expired reservations, and runs the
registered monitor hooks (the local runtime registers one that notices exited
workers). :class:`Follower` samples health again whenever the provider says something
changed (the Kubernetes provider's watches of nodes, pods, slices and claims), monitor or not.

:func:`reconcile` runs once when a manager opens, and whenever called: it
compares the persisted state with what is really there and corrects it, each
correction logged and emitted as an event:

* a group holding a device that vanished (the node is still there but the GPU
  with that UUID is gone) is released: ``group-device-vanished``;
* a group holding a device that is unhealthy is reported, not released (its
  owner decides): ``group-unhealthy``;
* reconcile hooks add their own corrections (the local runtime releases
  allocations whose worker process is gone and stops workers whose group is gone).

Health states of a device: ``healthy``; ``unhealthy`` (a critical XID, a
double-bit ECC error, uncorrectable remapped rows, a failed remapping, or a lost
GPU), on which nothing new is placed; back to ``healthy`` when the provider
reports it healthy again or an operator clears it
(:meth:`ComputeGroupManager.clear_device_health`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

from computegroups.decide.ledger import Ledger
from computegroups.events import Event
from computegroups.model import AllocationState, ComputeGroup, NodeSpec
from computegroups.providers.base import DeviceHealth
from computegroups.retry import backoff_s
from computegroups.tasks import stop_task

__all__ = ["Follower", "Hook", "Managed", "Monitor", "observe_health", "reconcile"]

log = logging.getLogger("computegroups.monitor")

#: A monitor or reconcile hook: called with the manager, returns the events it caused.
Hook = Callable[[Any], Awaitable[Sequence[Event]]]


class Managed(Protocol):
    """What the monitor and the reconciler need of a manager (``ComputeGroupManager`` is one)."""

    monitor_hooks: list[Hook]
    reconcile_hooks: list[Hook]

    async def refresh_health(self) -> list[Event]: ...

    async def expire_reservations(self) -> int: ...

    async def list_compute_groups(self, filters: Mapping[str, Any] | None = None) -> list[ComputeGroup]: ...

    async def deallocate_compute_group(self, group_id: object) -> bool: ...

    async def delete_compute_group(self, group_id: object) -> bool: ...

    def node_specs(self) -> Sequence[NodeSpec]: ...

    def unhealthy_devices(self) -> dict[tuple[str, int], str]: ...

    def emit(self, event: Event) -> None: ...


def observe_health(
    ledger: Ledger, telemetry: dict[tuple[str, int], dict[str, float]], samples: Sequence[DeviceHealth]
) -> list[Event]:
    """Take one round of health samples: utilization into ``telemetry``, health marks onto the ledger
    (placement avoids unhealthy devices); returns the events of devices whose health changed."""
    events: list[Event] = []
    for h in samples:
        key = (h.node_id, h.index)
        if h.gpu_util is not None or h.memory_used_mib is not None:
            telemetry[key] = {"gpu": float(h.gpu_util or 0.0), "memory_used_mib": float(h.memory_used_mib or 0.0)}
        if ledger.set_unhealthy(h.node_id, h.index, None if h.healthy else h.reason or "unhealthy"):
            if h.healthy:
                events.append(Event("device-healthy", None, h.node_id, None, f"GPU {h.index}"))
            else:
                events.append(Event("device-unhealthy", None, h.node_id, None, f"GPU {h.index}: {h.reason}"))
    return events


class _Background:
    """A loop in a background task of the manager's event loop, started and stopped with the manager."""

    name = "computegroups-background"

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        """Start the background task (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        """Stop the background task and wait for it (idempotent)."""
        task, self._task = self._task, None
        await stop_task(task)


class Monitor(_Background):
    """One monitoring round every ``interval_s`` seconds, in a background task of the manager's loop."""

    name = "computegroups-monitor"

    def __init__(self, manager: Managed, interval_s: float) -> None:
        if not interval_s > 0:
            raise ValueError(f"monitor_interval: {interval_s!r} is not a number of seconds > 0")
        super().__init__()
        self.manager = manager
        self.interval_s = interval_s
        self.rounds = 0
        self.errors = 0

    async def tick(self) -> list[Event]:
        """One round: health and utilization, expired reservations, then each monitor hook."""
        mgr = self.manager
        events = list(await mgr.refresh_health())
        await mgr.expire_reservations()
        for hook in list(mgr.monitor_hooks):
            events.extend(await hook(mgr))
        self.rounds += 1
        return events

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed round must not end monitoring
                self.errors += 1
                log.exception("monitor round failed")
            await asyncio.sleep(self.interval_s)


class Follower(_Background):
    """Health sampled again as soon as the provider says something changed (``provider.changes()``):
    an open manager marks what other workloads took (or gave back) within ``settle_s`` of the
    provider's watch delivering it, monitor or not. Changes that come together are taken in one
    sample: after each signal it waits ``settle_s`` (or twice as long as the last sample took), then
    clears the signal and samples."""

    name = "computegroups-follower"

    def __init__(self, manager: Managed, changed: asyncio.Event, settle_s: float = 0.05) -> None:
        super().__init__()
        self.manager = manager
        self.changed = changed
        self.settle_s = settle_s
        self.rounds = 0

    async def _run(self) -> None:
        failures = 0
        took = 0.0
        while True:
            await self.changed.wait()
            # At most a third of the loop's time goes to samples, however often things change.
            await asyncio.sleep(max(2 * took, backoff_s(failures, initial_s=self.settle_s, max_s=5.0)))
            self.changed.clear()
            started = time.monotonic()
            try:
                await self.manager.refresh_health()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # try again, later and later, while the provider fails
                failures += 1
                self.changed.set()
                if failures == 1:
                    log.warning("health after a change: %s", exc)
            took = time.monotonic() - started
            self.rounds += 1


async def reconcile(manager: Managed) -> list[Event]:
    """Correct the persisted state against reality once; returns the events of the corrections."""
    events: list[Event] = list(await manager.refresh_health())
    corrections: list[Event] = []
    specs = {n.id: n for n in manager.node_specs()}
    unhealthy = manager.unhealthy_devices()
    for g in await manager.list_compute_groups():
        spec = specs.get(g.node_id)
        if spec is None:
            continue  # a node this manager does not discover (another provider's); not ours to judge
        devices = g.record.devices
        vanished = [d for d in devices if d.index >= len(spec.gpus) or spec.gpus[d.index].uuid != d.uuid]
        if vanished:
            what = ", ".join(f"GPU {d.index} ({d.uuid})" for d in vanished)
            if g.component is not None:
                await manager.deallocate_compute_group(g.id)
            elif g.record.state is AllocationState.FREE:
                await manager.delete_compute_group(g.id)
            corrections.append(
                Event("group-device-vanished", g.id, g.node_id, g.component, f"released: {what} is gone")
            )
            continue
        bad = [
            f"GPU {d.index}: {unhealthy[(g.node_id, d.index)]}" for d in devices if (g.node_id, d.index) in unhealthy
        ]
        if bad:
            corrections.append(Event("group-unhealthy", g.id, g.node_id, g.component, "; ".join(bad)))
    for e in corrections:
        log.warning("reconcile: %s %s: %s", e.kind, e.group_id, e.detail)
        manager.emit(e)
    events.extend(corrections)
    for hook in list(manager.reconcile_hooks):
        events.extend(await hook(manager))
    return events
