"""The provider contract: what differs between environments, and nothing else.

A provider discovers nodes (``discover_resources``), materialises an allocated
group into something a workload can run on (``allocate_resources``: an
environment, a process, a pod) and undoes it (``deallocate_resources``).
Decisions and state are not the provider's business: the manager makes them
the same way everywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from computegroups.model import NodeSpec

__all__ = ["ComputeResourceProvider", "DeviceHealth", "Inventory"]


@dataclass(frozen=True, slots=True)
class Inventory:
    """What discovery found: nodes, and notes a person should read (why no GPU was found...).

    ``cordoned``: ids of nodes that take no new groups (a Kubernetes node cordoned or tainted).
    ``unavailable``: (node, GPU index) -> why, for devices present but not usable now (held by
    another workload): marked like unhealthy devices from the start, so nothing new goes there
    and they are not counted free; the device keeps its index and UUID.
    """

    nodes: Sequence[NodeSpec]
    source: str
    notes: Sequence[str] = ()
    cordoned: frozenset[str] = frozenset()
    unavailable: Mapping[tuple[str, int], str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "notes": list(self.notes), "nodes": [n.id for n in self.nodes]}


@dataclass(frozen=True, slots=True)
class DeviceHealth:
    """One device's health and live use, as a provider samples it."""

    node_id: str
    index: int
    healthy: bool = True
    reason: str = ""
    gpu_util: float | None = None  # percent
    memory_used_mib: float | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


class ComputeResourceProvider(ABC):
    """Abstract base class for environment-specific resource providers.

    Used as an async context manager by the manager; ``discover_resources`` is
    called on enter. Implementations must make ``deallocate_resources``
    idempotent: undoing something already undone returns False, not an error.
    """

    name: str = "provider"

    async def __aenter__(self) -> ComputeResourceProvider:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Release what the provider holds (connections, daemons). Idempotent."""
        return None

    @abstractmethod
    async def discover_resources(self) -> Inventory:
        """Discover available compute resources in the environment."""

    @abstractmethod
    async def allocate_resources(self, component_name: str, resources: dict[str, Any]) -> dict[str, Any]:
        """Materialise an allocated group for a component; returns what the workload needs (env...)."""

    @abstractmethod
    async def deallocate_resources(self, component_name: str, resource_ids: list[str]) -> bool:
        """Undo materialisation of the given groups; False if there was nothing to undo."""

    @abstractmethod
    async def get_resource_state(self) -> dict[str, Any]:
        """The environment's own view of its resources (for diagnostics)."""

    def cluster_identity(self, inventory: Inventory) -> str:
        """The cluster a state file is bound to (a file made for one cluster is refused by another).

        By default the provider's name and a digest of the discovered node ids: a simulated cluster
        is its set of nodes. Providers of one machine or one API server name that instead, so that
        GPUs coming and going do not make the machine another cluster.
        """
        ids = "\n".join(sorted(n.id for n in inventory.nodes))
        digest = hashlib.sha256(ids.encode()).hexdigest()[:16]
        return f"{self.name}:{len(inventory.nodes)}-nodes-{digest}"

    async def sample_health(self) -> Sequence[DeviceHealth]:
        """Health and utilization of every device; providers that cannot tell return nothing."""
        return ()

    def changes(self) -> asyncio.Event | None:
        """An event the provider sets when what :meth:`sample_health` reports may have changed (a
        watch delivered something), so an open manager samples again at once (``monitor.Follower``);
        None (the default): only sampling tells."""
        return None
