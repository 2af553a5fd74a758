"""Materialisation shared by providers whose workloads are configured by environment only."""

from __future__ import annotations

from typing import Any

__all__ = ["EnvMaterialiser"]


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
