"""Pools: named sets of nodes (by label selector and/or explicit ids) with quotas and a priority.

A pool is configuration, given to the manager (``ComputeGroupManager(..., pools=[...])``) or in a
spec file's ``pools:`` section::

    pools:
      - name: serving
        selector: {pool: serving}        # nodes whose labels all match
        nodes: [dgx-0]                   # and/or explicit node ids
        priority: 10                     # default priority of requests in this pool
        quotas:
          components: {decode: {max_gpus: 8}}
          tenants: {team-a: {max_gpus: 16, max_share: 0.5}}   # max_share: of the pool's GPUs
          default_component: {max_gpus: 4}                   # for components not listed

Every process sharing a state store must be given the same pools.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from computegroups.errors import InvalidRequestError, one_of
from computegroups.model import NodeSpec

__all__ = ["Pool", "Quota", "parse_pools"]


@dataclass(frozen=True, slots=True)
class Quota:
    """A ceiling on what one component or tenant may hold in a pool."""

    max_gpus: float | None = None
    max_share: float | None = None  # of the pool's GPUs, in (0, 1]

    KEYS = ("max_gpus", "max_share")

    def __post_init__(self) -> None:
        for key in self.KEYS:
            v = getattr(self, key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) or v < 0:
                raise InvalidRequestError(f"quota.{key}: {v!r} is not a number >= 0", key=f"quota.{key}")
        if self.max_share is not None and self.max_share > 1:
            raise InvalidRequestError(f"quota.max_share: {self.max_share!r} is above 1", key="quota.max_share")

    def limit_milli(self, pool_gpus: int) -> int | None:
        """The ceiling in thousandths of a GPU, the tighter of the two."""
        limits = []
        if self.max_gpus is not None:
            limits.append(round(self.max_gpus * 1000))
        if self.max_share is not None:
            limits.append(math.floor(self.max_share * pool_gpus * 1000 + 1e-6))
        return min(limits) if limits else None

    @classmethod
    def parse(cls, value: object, key: str) -> Quota:
        if isinstance(value, Quota):
            return value
        if not isinstance(value, Mapping):
            raise InvalidRequestError(f"{key}: {value!r} is not a quota mapping", key=key)
        unknown = sorted(str(k) for k in value if k not in cls.KEYS)
        if unknown:
            raise InvalidRequestError(f"{key}.{unknown[0]}: unknown key; allowed: {one_of(cls.KEYS)}", key=key)
        return cls(**value)


@dataclass(frozen=True, slots=True)
class Pool:
    """A named set of nodes with quotas per component and per tenant, and a default priority."""

    name: str
    selector: Mapping[str, str] = field(default_factory=dict)
    nodes: tuple[str, ...] = ()
    priority: int = 0
    components: Mapping[str, Quota] = field(default_factory=dict)
    tenants: Mapping[str, Quota] = field(default_factory=dict)
    default_component: Quota | None = None
    default_tenant: Quota | None = None

    def members(self, nodes: Iterable[NodeSpec]) -> frozenset[str]:
        """Ids of the nodes in this pool."""
        explicit = set(self.nodes)
        out = set()
        for n in nodes:
            if n.id in explicit or (self.selector and all(n.labels.get(k) == v for k, v in self.selector.items())):
                out.add(n.id)
        return frozenset(out)

    def component_quota(self, component: str) -> Quota | None:
        return self.components.get(component, self.default_component)

    def tenant_quota(self, tenant: str) -> Quota | None:
        return self.tenants.get(tenant, self.default_tenant)


_POOL_KEYS = ("name", "selector", "nodes", "priority", "quotas")
_QUOTA_KEYS = ("components", "tenants", "default_component", "default_tenant")


def parse_pools(value: Sequence[Pool | Mapping[str, Any]] | None) -> list[Pool]:
    """Validate pool definitions (Pool objects or mappings in the documented shape)."""
    out: list[Pool] = []
    names: set[str] = set()
    for n, item in enumerate(value or ()):
        where = f"pools[{n}]"
        if isinstance(item, Pool):
            pool = item
        else:
            if not isinstance(item, Mapping):
                raise InvalidRequestError(f"{where}: not a mapping", key="pools")
            unknown = sorted(str(k) for k in item if k not in _POOL_KEYS)
            if unknown:
                raise InvalidRequestError(
                    f"{where}.{unknown[0]}: unknown key; allowed: {one_of(_POOL_KEYS)}", key="pools"
                )
            name = item.get("name")
            if not isinstance(name, str) or not name:
                raise InvalidRequestError(f"{where}.name: {name!r} is not a name", key="pools")
            selector = item.get("selector") or {}
            nodes = item.get("nodes") or []
            priority = item.get("priority", 0)
            if not isinstance(selector, Mapping) or not all(isinstance(v, str) for v in selector.values()):
                raise InvalidRequestError(f"{where}.selector: not a mapping of strings", key="pools")
            if not isinstance(nodes, list | tuple) or not all(isinstance(x, str) for x in nodes):
                raise InvalidRequestError(f"{where}.nodes: not a list of node ids", key="pools")
            if isinstance(priority, bool) or not isinstance(priority, int):
                raise InvalidRequestError(f"{where}.priority: {priority!r} is not an integer", key="pools")
            if not selector and not nodes:
                raise InvalidRequestError(f"{where}: give a selector or nodes", key="pools")
            quotas = item.get("quotas") or {}
            if not isinstance(quotas, Mapping):
                raise InvalidRequestError(f"{where}.quotas: not a mapping", key="pools")
            unknown = sorted(str(k) for k in quotas if k not in _QUOTA_KEYS)
            if unknown:
                raise InvalidRequestError(
                    f"{where}.quotas.{unknown[0]}: unknown key; allowed: {one_of(_QUOTA_KEYS)}", key="pools"
                )
            pool = Pool(
                name=name,
                selector=dict(selector),
                nodes=tuple(nodes),
                priority=priority,
                components={
                    k: Quota.parse(v, f"{where}.quotas.components.{k}")
                    for k, v in (quotas.get("components") or {}).items()
                },
                tenants={
                    k: Quota.parse(v, f"{where}.quotas.tenants.{k}") for k, v in (quotas.get("tenants") or {}).items()
                },
                default_component=Quota.parse(quotas["default_component"], f"{where}.quotas.default_component")
                if quotas.get("default_component")
                else None,
                default_tenant=Quota.parse(quotas["default_tenant"], f"{where}.quotas.default_tenant")
                if quotas.get("default_tenant")
                else None,
            )
        if pool.name in names:
            raise InvalidRequestError(f"{where}.name: duplicate pool {pool.name!r}", key="pools")
        names.add(pool.name)
        out.append(pool)
    return out
