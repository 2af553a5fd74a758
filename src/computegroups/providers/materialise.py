"""Materialisation shared by providers whose workloads are configured by environment only."""

from __future__ import annotations

from typing import Any

from computegroups.providers.base import ComputeResourceProvider

__all__ = ["EnvMaterialiser", "EnvironmentProvider"]


class EnvMaterialiser:
    """Remembers which groups were materialised for which component; the env is the whole result."""

    def __init__(self) -> None:
        self.active: dict[str, str] = {}  # group id -> component

    def allocate(self, component_name: str, resources: dict[str, Any]) -> dict[str, Any]:
        self.active[str(resources["group_id"])] = component_name
        return {"env": dict(resources.get("env", {}))}

    def deallocate(self, component_name: str, resource_ids: list[str]) -> bool:
        changed = False
        for gid in resource_ids:
            if self.active.get(gid) == component_name:
                del self.active[gid]
                changed = True
        return changed


class EnvironmentProvider(ComputeResourceProvider):
    """A provider whose workloads are isolated by environment alone (local and simulated machines).

    Materialising a group records it and returns its environment; processes, if any, are the
    runtime's business (``computegroups.runtime``).
    """

    def __init__(self) -> None:
        self._materialised = EnvMaterialiser()

    async def allocate_resources(self, component_name: str, resources: dict[str, Any]) -> dict[str, Any]:
        return self._materialised.allocate(component_name, resources)

    async def deallocate_resources(self, component_name: str, resource_ids: list[str]) -> bool:
        return self._materialised.deallocate(component_name, resource_ids)
