"""Prometheus metrics of a manager: the state at scrape time, and the decisions this process served.

State series are computed from a fresh read of the state when scraped (so they are right whichever
process made the change); counters and the latency histogram count what this process decided. The
commit-conflict counter is the manager's own count, read at scrape time, so it counts every commit
the manager lost whichever path made it. A process with more to tell (the Dynamo actuator) adds its
collectors to the same registry.
The GPU assignment series carries the DCGM exporter's labels (``Hostname``, ``gpu``, ``UUID``), so a
dashboard joins ``DCGM_FI_DEV_GPU_UTIL`` with the component that holds each GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

from computegroups.model import MILLI, AllocationState, ComputeNode
from computegroups.service.wire import error_body

if TYPE_CHECKING:
    from computegroups.manager import ComputeGroupManager

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_GPU_STATES = ("free", "allocated", "reserved", "draining", "unhealthy")
_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class _State(Collector):
    """Series computed from the last snapshot of the nodes and their groups."""

    def __init__(self) -> None:
        self.nodes: list[ComputeNode] = []
        self.revision = 0
        self.conflicts = 0

    def collect(self) -> Iterator[Any]:
        gpus = GaugeMetricFamily(
            "computegroups_gpus", "GPUs by node and state (shares count as fractions).", labels=["node", "state"]
        )
        info = InfoMetricFamily(
            "computegroups_group", "One series per group holding capacity.", labels=["group", "node"]
        )
        assigned = GaugeMetricFamily(
            "computegroups_gpu_assignment",
            "Share of each GPU a group holds, labelled like the DCGM exporter's series (Hostname, gpu, UUID).",
            labels=["Hostname", "gpu", "UUID", "component", "group"],
        )
        cordoned = GaugeMetricFamily(
            "computegroups_node_cordoned", "1 for each node that takes no new groups.", labels=["node", "reason"]
        )
        for node in self.nodes:
            spec = node.spec
            if node.cordoned:
                cordoned.add_metric([spec.id, node.cordoned], 1.0)
            by_state = dict.fromkeys(_GPU_STATES, 0.0)
            by_state["free"] = float(node.resources["free"]["gpus"])
            by_state["unhealthy"] = float(len(node.resources["unhealthy_gpus"]))
            for group in node.compute_groups:
                rec = group.record
                state = rec.state
                key = "reserved" if state in (AllocationState.FREE, AllocationState.RESERVED) else state.value
                by_state[key] = by_state.get(key, 0.0) + rec.share_milli / MILLI
                gid = rec.gang_id or rec.id
                info.add_metric(
                    [gid, spec.id],
                    {"component": rec.component or "", "state": state.value, "pool": rec.pool or ""},
                )
                for d in rec.devices:
                    gpu = spec.gpus[d.index] if d.index < len(spec.gpus) else None
                    index = d.index if gpu is None else gpu.smi_index  # a MIG device: its GPU, as DCGM labels it
                    uuid = (gpu.parent_uuid if gpu is not None else "") or d.uuid
                    assigned.add_metric([spec.id, str(index), uuid, rec.component or "", gid], d.share_milli / MILLI)
            for state_name, value in by_state.items():
                gpus.add_metric([spec.id, state_name], round(value, 3))
        revision = GaugeMetricFamily("computegroups_state_revision", "Revision of the state store last read.")
        revision.add_metric([], self.revision)
        conflicts = CounterMetricFamily(
            "computegroups_commit_conflicts",
            "Commits this process's manager lost to another writer (it caught up and decided again).",
        )
        conflicts.add_metric([], self.conflicts)
        yield from (gpus, info, assigned, cordoned, revision, conflicts)


class Metrics:
    """The metrics of one long-running process around one manager, and of ``collectors`` beside it."""

    def __init__(self, manager: ComputeGroupManager, collectors: Iterable[Collector] = ()) -> None:
        self.manager = manager
        self.registry = CollectorRegistry(auto_describe=True)
        self.state = _State()
        self.registry.register(self.state)
        for collector in collectors:
            self.registry.register(collector)
        self.decisions = Histogram(
            "computegroups_decision_seconds",
            "Time to decide and commit one request, by operation.",
            ["operation"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.outcomes = Counter(
            "computegroups_requests",
            "Requests served, by operation and outcome (ok or the error code).",
            ["operation", "outcome"],
            registry=self.registry,
        )

    @contextmanager
    def observe(self, operation: str) -> Iterator[None]:
        """Time one request and count its outcome (the error's code when it raises one of ours)."""
        t0 = time.perf_counter()
        try:
            yield
        except Exception as exc:
            self.outcomes.labels(operation, error_body(exc)[1]["error"]).inc()
            raise
        finally:
            self.decisions.labels(operation).observe(time.perf_counter() - t0)
        self.outcomes.labels(operation, "ok").inc()

    async def render(self) -> bytes:
        """The exposition text, after a fresh read of the state."""
        self.state.nodes = await self.manager.list_compute_nodes()
        self.state.revision = self.manager.revision
        self.state.conflicts = self.manager.conflicts
        return generate_latest(self.registry)
