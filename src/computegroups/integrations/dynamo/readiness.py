"""When is a Dynamo worker ready? Registered in Dynamo's discovery, healthy over HTTP, or simply still running.

Dynamo 1.6.1 workers (a ``DistributedRuntime`` with the etcd discovery backend) register
each endpoint they serve as one etcd key under the runtime's primary lease (TTL 30 s, kept
alive while the process runs)::

    v1/instances/{namespace}/{component}/{endpoint}/{instance id, hex}
      = {"type": "Endpoint", "namespace": ..., "component": ..., "endpoint": ...,
         "instance_id": ..., "transport": {"tcp": "HOST:PORT/..."}, ...}

That is what Dynamo's planner counts (a client of ``{namespace}.{component}.{endpoint}``
and its instance ids). :class:`DiscoveryReadiness` reads the same keys and finds which
worker each one belongs to: a TCP transport names the port the worker's request server
listens on, and the process listening there (on this machine) is the worker or one of its
children. A key whose transport is not TCP, or not on this machine, cannot be attributed
that way and counts for the role's oldest unattributed workers.

A worker that is killed leaves its key until its lease runs out (30 s); a worker stopped
gracefully (SIGTERM, as the actuator stops them) revokes it at once.
:meth:`DiscoveryReadiness.gone` tells whether the keys of stopped workers have gone, so a
scale-down is acknowledged only once the planner's count has come down too.

:class:`HealthReadiness` asks an HTTP URL per worker (Dynamo's system status server:
``DYN_SYSTEM_PORT``, ``/health``) and :class:`SettleReadiness` only checks that the process
has run for a while: fallbacks for workers that do not register.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from computegroups.errors import InvalidRequestError
from computegroups.integrations.etcd import EtcdClient, EtcdError

__all__ = [
    "INSTANCES_ROOT",
    "DiscoveryReadiness",
    "HealthReadiness",
    "Instance",
    "Readiness",
    "SettleReadiness",
    "WorkerRef",
    "free_port",
    "instances_prefix",
    "parse_instance",
]

log = logging.getLogger("computegroups.dynamo")

#: Where Dynamo's etcd discovery backend keeps endpoint instances.
INSTANCES_ROOT = "v1/instances/"


def instances_prefix(namespace: str, component: str, endpoint: str) -> str:
    """The keys of the instances of one endpoint: ``v1/instances/{namespace}/{component}/{endpoint}/``."""
    return f"{INSTANCES_ROOT}{namespace}/{component}/{endpoint}/"


@dataclass(frozen=True, slots=True)
class Instance:
    """One registered endpoint instance, as Dynamo's discovery keeps it."""

    key: str
    namespace: str
    component: str
    endpoint: str
    instance_id: int
    host: str | None = None
    port: int | None = None


def parse_instance(key: str, value: str) -> Instance | None:
    """An :class:`Instance` from a discovery key and its JSON value; None if it is not an endpoint instance."""
    try:
        data = json.loads(value)
    except ValueError:
        return None
    if not isinstance(data, dict) or data.get("type", "Endpoint") != "Endpoint":
        return None
    parts = key.removeprefix(INSTANCES_ROOT).split("/")
    if not key.startswith(INSTANCES_ROOT) or len(parts) != 4:
        return None
    namespace = str(data.get("namespace", parts[0]))
    component = str(data.get("component", parts[1]))
    endpoint = str(data.get("endpoint", parts[2]))
    try:
        instance_id = int(data.get("instance_id", int(parts[3], 16)))
    except (TypeError, ValueError):
        instance_id = 0
    host: str | None = None
    port: int | None = None
    transport = data.get("transport")
    tcp = transport.get("tcp") if isinstance(transport, dict) else None
    if isinstance(tcp, str):
        address = tcp.split("/", 1)[0]
        name, sep, number = address.rpartition(":")
        if sep and number.isdigit():
            host, port = name.strip("[]"), int(number)
    return Instance(key, namespace, component, endpoint, instance_id, host, port)


@dataclass(frozen=True, slots=True)
class WorkerRef:
    """A running worker as readiness sees it: its group, role, processes, start time and Dynamo names."""

    group_id: str
    role: str
    pids: tuple[int, ...]
    started_at: float
    component: str
    endpoint: str
    extra: Mapping[str, Any] = field(default_factory=dict)


class Readiness(Protocol):
    """Decides which running workers are ready to serve."""

    #: What the actuator's messages call it ("registered in Dynamo's discovery", ...).
    description: str

    async def ready(self, namespace: str, workers: Sequence[WorkerRef]) -> set[str]:
        """The group ids of the ``workers`` that are ready."""
        ...

    async def keys_of(self, namespace: str, workers: Sequence[WorkerRef]) -> list[str]:
        """What ``workers`` left that must go before a scale-down is done (discovery keys); may be empty."""
        ...

    async def gone(self, keys: Sequence[str]) -> bool:
        """Whether every one of ``keys`` (from :meth:`keys_of`) has gone."""
        ...


def _local_addresses() -> set[str]:
    import psutil

    addresses = {"127.0.0.1", "::1", "0.0.0.0", "::", "localhost", socket.gethostname()}
    for entries in psutil.net_if_addrs().values():
        for entry in entries:
            addresses.add(str(entry.address).split("%", 1)[0])
    return addresses


def _listeners() -> dict[int, int]:
    """TCP port -> pid of the process listening on it (processes this user may see)."""
    import psutil

    ports: dict[int, int] = {}
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.pid and conn.laddr:
                ports.setdefault(int(conn.laddr.port), int(conn.pid))
    return ports


def _lineage(pid: int) -> set[int]:
    """``pid`` and its ancestors."""
    import psutil

    out = {pid}
    with contextlib.suppress(psutil.Error, OSError):
        out.update(p.pid for p in psutil.Process(pid).parents())
    return out


class DiscoveryReadiness:
    """Ready = registered in Dynamo's discovery in etcd under the planner's namespace (see the module docstring)."""

    description = "registered in Dynamo's discovery"

    def __init__(self, etcd: EtcdClient) -> None:
        self.etcd = etcd

    async def instances(self, namespace: str, component: str, endpoint: str) -> list[Instance]:
        """The registered instances of ``{namespace}.{component}.{endpoint}``, read from etcd."""
        kvs, _ = await self.etcd.aget_prefix(instances_prefix(namespace, component, endpoint))
        found = (parse_instance(k, kv.value) for k, kv in sorted(kvs.items()))
        return [i for i in found if i is not None]

    async def _attribute(self, namespace: str, workers: Sequence[WorkerRef]) -> dict[str, list[str]]:
        """group id -> the discovery keys that belong to that worker."""
        owned: dict[str, list[str]] = {}
        if not workers:
            return owned
        listeners, local = await asyncio.to_thread(lambda: (_listeners(), _local_addresses()))
        by_pid: dict[int, str] = {pid: w.group_id for w in workers for pid in w.pids}
        groups: dict[tuple[str, str], list[WorkerRef]] = {}
        for w in workers:
            groups.setdefault((w.component, w.endpoint), []).append(w)
        for (component, endpoint), members in groups.items():
            try:
                instances = await self.instances(namespace, component, endpoint)
            except EtcdError as exc:
                log.warning("dynamo %s: reading discovery: %s", namespace, exc)
                continue
            loose: list[Instance] = []
            for inst in instances:
                pid = listeners.get(inst.port) if inst.port is not None and inst.host in local else None
                if pid is None:
                    if inst.port is None or inst.host not in local:
                        loose.append(inst)  # not attributable here; a local port nobody listens on is stale
                    continue
                owner = next((by_pid[p] for p in _lineage(pid) if p in by_pid), None)
                if owner is not None:
                    owned.setdefault(owner, []).append(inst.key)
            # Instances that cannot be attributed count for the oldest workers that have none yet.
            waiting = sorted((w for w in members if w.group_id not in owned), key=lambda w: w.started_at)
            for w, inst in zip(waiting, loose, strict=False):
                owned[w.group_id] = [inst.key]
        return owned

    async def ready(self, namespace: str, workers: Sequence[WorkerRef]) -> set[str]:
        return set(await self._attribute(namespace, workers))

    async def keys_of(self, namespace: str, workers: Sequence[WorkerRef]) -> list[str]:
        owned = await self._attribute(namespace, workers)
        return sorted(k for keys in owned.values() for k in keys)

    async def gone(self, keys: Sequence[str]) -> bool:
        for key in keys:
            if await asyncio.to_thread(self.etcd.get, key) is not None:
                return False
        return True


def free_port(low: int = 20000, high: int = 32767) -> int:
    """A TCP port in ``[low, high]`` that nothing listens on now on the loopback interface.

    Below 32768 because Dynamo 1.6.1 reads ``DYN_SYSTEM_PORT`` as a signed 16-bit number.
    """
    import random

    for port in random.sample(range(low, high + 1), min(200, high - low + 1)):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free TCP port in {low}-{high}")


def health_url_problem(url: str) -> str | None:
    """What is wrong with a health URL template, or None (see :class:`HealthReadiness`)."""
    if not url.startswith(("http://", "https://")):
        return "not an http:// or https:// URL"
    try:
        url.format(port=0, group_id="")
    except (KeyError, IndexError, ValueError) as exc:
        return f"only {{port}} and {{group_id}} may be filled in ({exc})"
    return None


class HealthReadiness:
    """Ready = an HTTP GET of the worker's health URL answers 2xx.

    ``url``: a template; ``{port}`` is the port the actuator gave the worker in
    ``DYN_SYSTEM_PORT`` (Dynamo's system status server, whose ``/health`` answers 200
    once the worker is ready), ``{group_id}`` its compute group.
    """

    description = "healthy"

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        problem = health_url_problem(url)
        if problem is not None:
            raise InvalidRequestError(f"health URL: {url!r}: {problem}", key="health_url")
        self.url = url
        self.timeout_s = timeout_s

    @property
    def wants_port(self) -> bool:
        return "{port}" in self.url

    def url_of(self, worker: WorkerRef) -> str:
        return self.url.format(port=worker.extra.get("port", 0), group_id=worker.group_id)

    def _healthy(self, url: str) -> bool:
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as resp:
                return 200 <= int(resp.status) < 300
        except (urllib.error.URLError, OSError, ValueError):
            return False

    async def ready(self, namespace: str, workers: Sequence[WorkerRef]) -> set[str]:
        del namespace
        results = await asyncio.gather(*(asyncio.to_thread(self._healthy, self.url_of(w)) for w in workers))
        return {w.group_id for w, ok in zip(workers, results, strict=True) if ok}

    async def keys_of(self, namespace: str, workers: Sequence[WorkerRef]) -> list[str]:
        return []

    async def gone(self, keys: Sequence[str]) -> bool:
        return True


class SettleReadiness:
    """Ready = the worker's process has been running for ``settle_s`` seconds (it registers nowhere)."""

    def __init__(self, settle_s: float = 0.3) -> None:
        if settle_s < 0:
            raise InvalidRequestError(f"settle time: {settle_s} is negative", key="settle")
        self.settle_s = settle_s
        self.description = f"running for {settle_s:g}s"

    async def ready(self, namespace: str, workers: Sequence[WorkerRef]) -> set[str]:
        del namespace
        now = time.time()
        return {w.group_id for w in workers if w.pids and now - w.started_at >= self.settle_s}

    async def keys_of(self, namespace: str, workers: Sequence[WorkerRef]) -> list[str]:
        return []

    async def gone(self, keys: Sequence[str]) -> bool:
        return True
