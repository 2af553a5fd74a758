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

from computegroups.config import PoolConfig, QuotaConfig, parse
from computegroups.errors import InvalidRequestError
from computegroups.model import NodeSpec

__all__ = ["Pool", "Quota", "parse_pools"]


@dataclass(frozen=True, slots=True)
class Quota:
    """A ceiling on what one component or tenant may hold in a pool."""

    max_gpus: float | None = None
    max_share: float | None = None  # of the pool's GPUs, in (0, 1]

    def __post_init__(self) -> None:
        # The same rule as in a pools file (QuotaConfig), for Quota objects made in code.
        parse(QuotaConfig, {"max_gpus": self.max_gpus, "max_share": self.max_share}, "quota")

    def limit_milli(self, pool_gpus: int) -> int | None:
        """The ceiling in thousandths of a GPU, the tighter of the two."""
        limits = []
        if self.max_gpus is not None:
            limits.append(round(self.max_gpus * 1000))
        if self.max_share is not None:
            limits.append(math.floor(self.max_share * pool_gpus * 1000 + 1e-6))
        return min(limits) if limits else None

    @classmethod
    def of(cls, config: QuotaConfig | None) -> Quota | None:
        return None if config is None else cls(config.max_gpus, config.max_share)


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


def parse_pools(value: Sequence[Pool | Mapping[str, Any]] | None) -> list[Pool]:
    """Validate pool definitions: Pool objects, or mappings shaped as :class:`~computegroups.config.PoolConfig`."""
    out: list[Pool] = []
    names: set[str] = set()
    if value is not None and not isinstance(value, Sequence):
        raise InvalidRequestError("pools: not a list", key="pools")
    for n, item in enumerate(value or ()):
        if isinstance(item, Pool):
            pool = item
        else:
            c = parse(PoolConfig, item, f"pools[{n}]", "pools")
            q = c.quotas
            pool = Pool(
                name=c.name,
                selector=dict(c.selector),
                nodes=tuple(c.nodes),
                priority=c.priority,
                components={k: Quota(v.max_gpus, v.max_share) for k, v in q.components.items()},
                tenants={k: Quota(v.max_gpus, v.max_share) for k, v in q.tenants.items()},
                default_component=Quota.of(q.default_component),
                default_tenant=Quota.of(q.default_tenant),
            )
        if pool.name in names:
            raise InvalidRequestError(f"pools[{n}].name: duplicate pool {pool.name!r}", key="pools")
        names.add(pool.name)
        out.append(pool)
    return out
