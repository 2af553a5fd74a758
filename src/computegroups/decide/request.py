"""A request as the decision layer sees it: constraints with the pool resolved, a priority, a context."""

from __future__ import annotations

import dataclasses

from computegroups.decide.ledger import Ledger
from computegroups.errors import InvalidRequestError, one_of
from computegroups.memo import Memo
from computegroups.model import AllocationState, Constraints, Requirements
from computegroups.placement.plugins import EMPTY_CONTEXT, Context
from computegroups.pools import Pool

__all__ = ["Ask", "context", "priority_of", "resolve_pool"]


class Ask:
    """One allocate, reserve or create call: who asks, for what, under which constraints, into which state.

    ``cons`` has the pool of ``req`` merged in (``resolve_pool``); ``state`` is ALLOCATED, RESERVED
    or FREE (a pre-carved group); ``ttl``: for reservations, seconds until the capacity returns;
    ``priority``: the request's own, else its pool's.
    """

    __slots__ = ("component", "cons", "priority", "req", "state", "ttl")

    def __init__(
        self,
        component: str,
        req: Requirements,
        cons: Constraints,
        state: AllocationState,
        ttl: float | None,
        priority: int,
    ) -> None:
        self.component = component
        self.req = req
        self.cons = cons
        self.state = state
        self.ttl = ttl
        self.priority = priority


_WITH_POOL: Memo[tuple[int, str | None], tuple[Constraints, Constraints]] = Memo("constraints object, pool", 1024)


def resolve_pool(pools: dict[str, Pool], req: Requirements, cons: Constraints) -> Constraints:
    """Constraints with the pool named in requirements merged in; InvalidRequestError for an unknown pool."""
    pool = cons.pool
    if req.pool is not None:
        if pool is not None and pool != req.pool:
            raise InvalidRequestError(
                f"requirements.pool: {req.pool!r} differs from constraints.pool {pool!r}", key="requirements.pool"
            )
        pool = req.pool
    if pool is not None and pool not in pools:
        allowed = one_of(sorted(pools)) or "none are defined"
        raise InvalidRequestError(f"constraints.pool: {pool!r} is not a pool; pools: {allowed}", key="constraints.pool")
    if pool == cons.pool:
        return cons
    # Requests repeat: remember the merged constraints (the entry holds ``cons``, so its id stays its own).
    key = (id(cons), pool)
    known = _WITH_POOL.get(key)
    if known is None or known[0] is not cons:
        known = _WITH_POOL.put(key, (cons, dataclasses.replace(cons, pool=pool)))
    return known[1]


def priority_of(pools: dict[str, Pool], cons: Constraints) -> int:
    """The request's priority: its own, else its pool's default."""
    if cons.priority or cons.pool is None:
        return cons.priority
    return pools[cons.pool].priority


def context(
    ledger: Ledger,
    cons: Constraints,
    priority: int,
    excluded: frozenset[str] = frozenset(),
    nominee: str | None = None,
) -> Context:
    """What placement needs beyond occupancy, resolved to node sets (see :class:`Context`).

    ``nominee``: a waiting preemptor being judged for promotion; its own nomination does not block it.
    """
    nominated = ledger.nominated
    if not (cons.pool or cons.affinity or cons.anti_affinity or excluded or nominated):
        return EMPTY_CONTEXT  # the common case: nothing to resolve (priority matters only beside nominations)
    near = tuple(ledger.nodes_near(r.component, r.scope) for r in cons.affinity) if cons.affinity else ()
    away = tuple(ledger.nodes_near(r.component, r.scope) for r in cons.anti_affinity) if cons.anti_affinity else ()
    return Context(
        allowed=ledger.pool_members[cons.pool] if cons.pool else None,
        excluded=excluded,
        near=near,
        away=away,
        prefer_near=tuple(s for r, s in zip(cons.affinity, near, strict=True) if not r.required) if near else (),
        prefer_away=tuple(s for r, s in zip(cons.anti_affinity, away, strict=True) if not r.required) if away else (),
        nominated={n: tuple(m for gid, m in v.items() if gid != nominee) for n, v in nominated.items() if v}
        if nominated
        else {},
        priority=priority,
    )
