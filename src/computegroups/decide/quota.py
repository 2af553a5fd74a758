"""Quotas: what a component or a tenant may hold in a pool."""

from __future__ import annotations

from computegroups.decide.ledger import Ledger
from computegroups.errors import QuotaExceededError
from computegroups.model import MILLI, GroupRecord
from computegroups.pools import Quota

__all__ = ["check_quota"]


def check_quota(
    ledger: Ledger,
    component: str,
    pool_name: str | None,
    tenant: str | None,
    milli: int,
    replacing: GroupRecord | None = None,
) -> None:
    """Raise QuotaExceededError if ``milli`` more in pool ``pool_name`` would pass a quota.

    ``replacing``: a group whose own share is already counted and is being re-attributed.
    """
    if pool_name is None:
        return
    pool = ledger.pools[pool_name]
    _check(ledger, pool_name, "component", component, pool.component_quota(component), milli, replacing)
    if tenant:
        _check(ledger, pool_name, "tenant", tenant, pool.tenant_quota(tenant), milli, replacing)


def _check(
    ledger: Ledger,
    pool_name: str,
    kind: str,
    name: str,
    quota: Quota | None,
    milli: int,
    replacing: GroupRecord | None,
) -> None:
    if quota is None:
        return
    limit = quota.limit_milli(ledger.pool_gpus.get(pool_name, 0))
    if limit is None:
        return
    held = ledger.usage[(pool_name, kind, name)]
    if replacing is not None and replacing.pool == pool_name and replacing.component is not None:
        owner = replacing.component if kind == "component" else replacing.tenant
        if owner == name:
            held -= replacing.share_milli
    if held + milli > limit:
        raise QuotaExceededError(
            f"pool {pool_name}: {kind} {name} holds {held / MILLI:g} GPU(s); "
            f"{milli / MILLI:g} more would exceed its quota of {limit / MILLI:g}"
        )
