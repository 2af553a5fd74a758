"""Releasing, draining, deleting and expiring groups, cordoning and draining nodes, and promoting
the preemptors that were waiting.

A release frees a group's capacity (a pre-carved group goes back to free); in the same change, a
waiting preemptor whose last victim it was is allocated, if the placement rules still admit its
devices (:func:`~computegroups.placement.existing.admits`). Pure: reads the ledger, returns a plan.
"""

from __future__ import annotations

from collections.abc import Mapping

from computegroups.decide.ledger import Ledger
from computegroups.decide.plan import Plan
from computegroups.decide.request import context
from computegroups.errors import ConflictError, NotFoundError
from computegroups.events import Event
from computegroups.model import AllocationState, Constraints, GroupRecord, Requirements
from computegroups.placement.existing import admits

__all__ = ["plan_cordon", "plan_delete", "plan_drain", "plan_drain_node", "plan_expire", "plan_release"]

_RELEASED = AllocationState.RELEASED
_DRAINING = AllocationState.DRAINING
NOTHING = Plan([], [], changed=False)


def plan_release(ledger: Ledger, gid: str, now: float) -> Plan:
    """Release a group (every part of a multi-node one); nothing to do if it has no owner."""
    prior = [r for r in ledger.parts(gid) if r.component is not None and r.state is not _RELEASED]
    if not prior:
        return NOTHING
    ups: list[GroupRecord] = []
    for r in prior:
        if r.carved:
            state = _DRAINING if r.state is _DRAINING else AllocationState.FREE
            ups.append(r.replace(state=state, component=None, request_id=None, updated_at=now))
        else:
            ups.append(r.replace(state=_RELEASED, updated_at=now))
    first = prior[0]
    group = first.gang_id or first.id
    released = Event("released", group, first.node_id, first.component)
    promoted = _promotions(ledger, prior, now)
    if not promoted:
        return Plan(ups, [], dematerialise=tuple(prior), events=(released,), group=group)
    events = [released] + [Event("allocated", w.id, w.node_id, w.component, "after preemption") for w in promoted]
    return Plan(
        ups + promoted, [], dematerialise=tuple(prior), materialise=tuple(promoted), events=tuple(events), group=group
    )


def _promotions(ledger: Ledger, released: list[GroupRecord], now: float) -> list[GroupRecord]:
    """Waiting preemptors whose last victim is among ``released`` and whose devices the rules admit now."""
    if not ledger.victims:
        return []  # nobody waits for a preempted group
    gone = {r.id for r in released}
    out: list[GroupRecord] = []
    for waiter_id in sorted({r.preempted_by for r in released if r.preempted_by}):
        waiter = ledger.records.get(waiter_id)
        if waiter is None or not waiter.pending or waiter.state is _RELEASED:
            continue
        if ledger.victims.get(waiter_id, set()) - gone:
            continue  # another victim still drains
        req = Requirements.parse(dict(waiter.requirements))
        cons = Constraints.parse(dict(waiter.constraints))
        ctx = context(ledger, cons, waiter.priority, nominee=waiter.id)
        if admits(ledger.cluster, waiter, req, cons, ctx, exact=True, released=released) is None:
            out.append(waiter.replace(state=AllocationState.ALLOCATED, pending=False, updated_at=now))
    return out


def plan_drain(ledger: Ledger, gid: str) -> Plan:
    """Mark a group draining: it gets no new owner; its owner keeps it until release."""
    parts = ledger.parts(gid)
    if all(r.state is _RELEASED for r in parts):
        raise ConflictError(f"group {gid} is released; there is nothing to drain")
    if any(r.pending for r in parts):
        raise ConflictError(f"group {gid} waits for preempted groups; release it to cancel the request")
    live = [r.replace(state=_DRAINING) for r in parts if r.state not in (_RELEASED, _DRAINING)]
    if not live:
        return NOTHING
    first = live[0]
    return Plan(live, [], events=(Event("drained", first.gang_id or gid, first.node_id, first.component),), group=gid)


def plan_cordon(ledger: Ledger, node_id: str, reason: str | None, *, cordon: bool = True) -> Plan:
    """Cordon a node (it takes no new groups; its groups keep their owners), with ``reason`` (None:
    the reason it has, or a default), or uncordon it (``cordon=False``); nothing to do if it already
    is. NotFoundError for a node discovery did not find."""
    if node_id not in ledger.specs:
        raise NotFoundError(f"node {node_id!r} is not in this cluster; nodes: {_some(ledger.specs)}")
    if cordon and reason is None:
        reason = ledger.cordons.get(node_id, "cordoned by an operator")
    if ledger.cordons.get(node_id) == reason:
        return NOTHING
    if reason is None:
        event = Event("uncordoned", None, node_id, None, f"was: {ledger.cordons[node_id]}")
    else:
        event = Event("cordoned", None, node_id, None, reason)
    return Plan([], [], events=(event,), cordons={node_id: reason})


def plan_drain_node(ledger: Ledger, node_id: str, reason: str | None) -> Plan:
    """Cordon a node and drain every group on it, in one change: none gets a new owner, each owner
    keeps its group until release (a multi-node group drains whole). A preemptor waiting for
    capacity there keeps waiting; the cordon stops it from being promoted onto the node."""
    cordon = plan_cordon(ledger, node_id, reason)
    ups: list[GroupRecord] = []
    events = list(cordon.events)
    seen: set[str] = set()
    for gid in sorted(ledger.by_node.get(node_id, ())):
        r = ledger.records[gid]
        group = r.gang_id or r.id
        if r.state in (_RELEASED, _DRAINING) or r.pending or group in seen:
            continue
        seen.add(group)
        drained = plan_drain(ledger, group)
        ups += drained.upserts
        events += drained.events
    if not ups and not cordon.cordons:
        return NOTHING
    return Plan(ups, [], events=tuple(events), cordons=cordon.cordons)


def _some(names: Mapping[str, object], shown: int = 5) -> str:
    listed = sorted(names)
    more = f", ... ({len(listed)} in all)" if len(listed) > shown else ""
    return ", ".join(listed[:shown]) + more


def plan_delete(ledger: Ledger, gid: str) -> Plan:
    """Delete a pre-carved group; a group with an owner is refused (ConflictError)."""
    parts = ledger.parts(gid)
    live = [r for r in parts if r.state is not _RELEASED]
    for r in live:
        if r.component is not None:
            raise ConflictError(f"group {gid} is {r.state.value} by {r.component}; deallocate it before deleting")
    if not live:
        return NOTHING
    return Plan([], [r.id for r in live], events=(Event("deleted", gid, parts[0].node_id),), group=gid)


def plan_expire(due: list[GroupRecord], now: float) -> Plan:
    """Release reservations past their deadline (``Ledger.due``)."""
    released = [r.replace(state=_RELEASED, updated_at=now) for r in due]
    events = tuple(Event("reservation-expired", r.id, r.node_id, r.component, "its capacity returns") for r in due)
    return Plan(released, [], events=events)
