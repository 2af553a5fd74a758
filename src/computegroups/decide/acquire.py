"""Allocating and reserving: which group serves a request, as a plan.

In order: the group a reused request id made; the reservation named by ``reservation_id``; a
matching reservation of the same component; a matching pre-carved free group; new capacity (one
node, or a gang of nodes); and when nothing fits and the request has a priority, preemption. An
existing group is judged by :func:`~computegroups.placement.existing.admits`, the same pipeline
as new capacity. Pure: reads the ledger, returns a :class:`Plan` or raises a typed error.
"""

from __future__ import annotations

from collections.abc import Callable

from computegroups.decide.ledger import Ledger
from computegroups.decide.plan import Plan
from computegroups.decide.quota import check_quota
from computegroups.decide.request import Ask, context
from computegroups.errors import (
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
    PreemptionPendingError,
)
from computegroups.events import Event
from computegroups.model import MILLI, AllocationState, GroupRecord
from computegroups.placement.engine import Decision, place
from computegroups.placement.existing import admits
from computegroups.placement.plugins import EMPTY_CONTEXT, Context
from computegroups.placement.preemption import find_victims

__all__ = ["plan_acquire", "plan_create"]

_ALLOCATED = AllocationState.ALLOCATED
_RESERVED = AllocationState.RESERVED
_RELEASED = AllocationState.RELEASED


def plan_acquire(ledger: Ledger, ask: Ask, now: float, new_id: Callable[[], str]) -> Plan:
    """The plan for one allocate or reserve call (see the module docstring)."""
    cons, req = ask.cons, ask.req
    if cons.request_id is not None:
        prior = ledger.by_request.get(cons.request_id)
        if prior is not None:
            return _reused(ledger, ask, ledger.records[prior])
    expires = now + ask.ttl if ask.ttl is not None else None
    if ask.state is _ALLOCATED and (
        cons.reservation_id is not None or ledger.reservations.get(ask.component) or ledger.carved_free
    ):
        plan = _existing(ledger, ask, expires, now)
        if plan is not None:
            return plan
    if cons.pool is not None:
        check_quota(
            ledger, ask.component, cons.pool, cons.tenant, (req.whole_gpus * MILLI or req.share_milli) * req.nodes
        )
    ctx = (
        context(ledger, cons, ask.priority)
        if cons.pool or cons.affinity or cons.anti_affinity or ledger.nominated
        else EMPTY_CONTEXT
    )
    try:
        if req.nodes == 1:
            d = place(ledger.cluster, req, cons, ctx=ctx, demand=ledger.demand)
            return _granted(ask, [_record(d, ask, expires, now, new_id())])
        decisions = _place_gang(ledger, ask, ctx)
    except InsufficientResourcesError:
        if ask.priority <= 0 or req.nodes > 1 or ask.state is not _ALLOCATED:
            raise
        plan = _preemption(ledger, ask, ctx, expires, now, new_id)
        if plan is None:
            raise
        return plan
    gang = new_id()
    return _granted(
        ask,
        [_record(d, ask, expires, now, f"{gang}.{n}", gang_id=gang, first=n == 0) for n, d in enumerate(decisions)],
    )


def plan_create(ledger: Ledger, ask: Ask, now: float, new_id: Callable[[], str]) -> Plan:
    """Pre-carve a free group: placed like an allocation, held without an owner."""
    if ask.req.nodes > 1:
        raise InvalidRequestError("requirements.nodes: a pre-carved group holds one node", key="requirements.nodes")
    d = place(ledger.cluster, ask.req, ask.cons, ctx=context(ledger, ask.cons, ask.priority), demand=ledger.demand)
    rec = GroupRecord(
        new_id(),
        d.node_id,
        AllocationState.FREE,
        None,
        d.devices,
        d.cpus_milli,
        d.memory_mib,
        carved=True,
        requirements=ask.req.stored,
        created_at=now,
        updated_at=now,
        pool=ask.cons.pool,
    )
    return Plan([rec], [], events=(Event("created", rec.id, rec.node_id),), group=rec.id)


def _granted(ask: Ask, records: list[GroupRecord]) -> Plan:
    first = records[0]
    allocated = ask.state is _ALLOCATED
    group = first.gang_id or first.id
    event = Event("allocated" if allocated else "reserved", group, first.node_id, ask.component)
    return Plan(records, [], materialise=tuple(records) if allocated else (), events=(event,), group=group)


def _reused(ledger: Ledger, ask: Ask, prior: GroupRecord) -> Plan:
    """A request id seen before names the group it made: that group, while it is held."""
    rid = ask.cons.request_id
    if prior.component != ask.component:
        raise ConflictError(f"constraints.request_id: {rid!r} was used by {prior.component!r}, not {ask.component!r}")
    group = prior.gang_id or prior.id
    if all(r.state is _RELEASED for r in ledger.parts(group)):
        raise ConflictError(
            f"constraints.request_id: {rid!r} made group {group}, which has been released; "
            "a request id names one allocation, so use a new one"
        )
    if prior.pending:
        victims = sorted(ledger.victims.get(prior.id, ()))
        raise PreemptionPendingError(
            f"{prior.component}: still waiting for {len(victims)} preempted group(s) to drain",
            group_id=prior.id,
            request_id=prior.request_id or "",
            victims=victims,
        )
    return Plan([], [], group=group)


def _existing(ledger: Ledger, ask: Ask, expires: float | None, now: float) -> Plan | None:
    """A reservation to claim or a pre-carved group to hand out, judged by the placement rules."""
    cons = ask.cons
    ctx = context(ledger, cons, ask.priority)
    claimed = _claim(ledger, ask, ctx)
    pool, tenant = cons.pool, cons.tenant
    if claimed is not None:
        pool, tenant = claimed.pool or pool, claimed.tenant or tenant
        check_quota(ledger, ask.component, pool, tenant, claimed.share_milli, claimed)
        chosen = claimed
    else:
        carved = _match_carved(ledger, ask, ctx)
        if carved is None:
            return None
        check_quota(ledger, ask.component, pool, tenant, carved.share_milli)
        chosen = carved
    rec = chosen.replace(
        state=_ALLOCATED,
        component=ask.component,
        request_id=cons.request_id,
        constraints=cons.stored,
        priority=ask.priority,
        preemptible=cons.preemptible,
        pool=pool,
        tenant=tenant,
        expires_at=expires,
        updated_at=now,
    )
    return _granted(ask, [rec])


def _claim(ledger: Ledger, ask: Ask, ctx: Context) -> GroupRecord | None:
    """The reservation this request claims, if any: by id (or an error saying why not), or the
    component's own that the request matches exactly."""
    cons, req = ask.cons, ask.req
    if cons.reservation_id is not None:
        r = ledger.records.get(cons.reservation_id)
        if r is None:
            raise NotFoundError(f"constraints.reservation_id: no reservation {cons.reservation_id!r}")
        if r.state is not _RESERVED or r.pending:
            raise ConflictError(
                f"constraints.reservation_id: {r.id} is {r.state.value}, not an open reservation"
                + (" (it expired)" if r.expires_at is not None and r.state is _RELEASED else "")
            )
        if req.nodes != 1:
            raise ConflictError(
                f"constraints.reservation_id: {r.id} holds one node; the request asks for {req.nodes} nodes"
            )
        why = admits(ledger.cluster, r, req, cons, ctx, exact=False)
        if why is not None:
            raise ConflictError(f"constraints.reservation_id: {r.id} cannot serve the request: {why.text()}")
        return r
    if req.nodes != 1:
        return None
    for gid in ledger.reservations.get(ask.component, {}):
        r = ledger.records[gid]
        if admits(ledger.cluster, r, req, cons, ctx, exact=True) is None:
            return r
    return None


def _match_carved(ledger: Ledger, ask: Ask, ctx: Context) -> GroupRecord | None:
    """A pre-carved free group of exactly the requested size that the placement rules admit."""
    if ask.req.nodes != 1:
        return None
    for gid in ledger.carved_free:
        r = ledger.records[gid]
        if admits(ledger.cluster, r, ask.req, ask.cons, ctx, exact=True) is None:
            return r
    return None


def _place_gang(ledger: Ledger, ask: Ask, ctx: Context) -> list[Decision]:
    """One decision per node, on distinct nodes, all or nothing."""
    req, cons = ask.req, ask.cons
    decisions: list[Decision] = []
    for part in range(req.nodes):
        taken = frozenset(d.node_id for d in decisions)
        try:
            decisions.append(
                place(
                    ledger.cluster,
                    req,
                    cons,
                    ctx=context(ledger, cons, ask.priority, taken) if taken else ctx,
                    demand=ledger.demand,
                )
            )
        except InsufficientResourcesError as exc:
            raise InsufficientResourcesError(
                f"a {req.nodes}-node group of {req.whole_gpus} GPU(s) per node does not fit: "
                f"only {part} node(s) can take a part; nothing was allocated",
                reasons=exc.reasons,
            ) from exc
    return decisions


def _preemption(
    ledger: Ledger, ask: Ask, ctx: Context, expires: float | None, now: float, new_id: Callable[[], str]
) -> Plan | None:
    """Drain the fewest, lowest-priority preemptible groups that let the request fit on one node, and
    record the request as a waiting group on the GPUs they free (committed together)."""
    candidates: dict[str, list[GroupRecord]] = {}
    for node_id, gids in ledger.preemptible.items():
        victims = [ledger.records[g] for g in gids if ledger.records[g].priority < ask.priority]
        if victims:
            candidates[node_id] = victims
    found = find_victims(ledger.cluster, ask.req, ask.cons, ctx, candidates)
    if found is None:
        return None
    gid = new_id()
    waiting = _record(found.decision, ask, expires, now, gid)._replace(
        state=_RESERVED, pending=True, request_id=ask.cons.request_id or f"preempt-{gid}"
    )
    drained = [v.replace(state=AllocationState.DRAINING, preempted_by=gid, updated_at=now) for v in found.victims]
    ids = [v.id for v in found.victims]
    by = f"by {gid} ({ask.component})"
    events = tuple(Event("preempted", v.id, v.node_id, v.component, by) for v in found.victims)
    error = PreemptionPendingError(
        f"{ask.component}: preempting {len(ids)} group(s) ({', '.join(ids)}) on {waiting.node_id}; "
        f"retry with request_id {waiting.request_id!r} once they have drained",
        group_id=gid,
        request_id=waiting.request_id or "",
        victims=ids,
    )
    return Plan([waiting, *drained], [], events=events, group=gid, error=error)


def _record(
    d: Decision,
    ask: Ask,
    expires: float | None,
    now: float,
    gid: str,
    *,
    gang_id: str | None = None,
    first: bool = True,
) -> GroupRecord:
    """The record of a new group (of one part of a multi-node group: only the first keeps the request id)."""
    cons = ask.cons
    return GroupRecord(
        gid,
        d.node_id,
        ask.state,
        ask.component,
        d.devices,
        d.cpus_milli,
        d.memory_mib,
        cons.request_id if first else None,
        False,
        ask.req.stored,
        cons.stored,
        now,
        now,
        ask.priority,
        cons.preemptible,
        cons.pool,
        cons.tenant,
        expires,
        gang_id=gang_id,
    )
