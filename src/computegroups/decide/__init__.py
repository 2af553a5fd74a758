"""The decision layer: pure, synchronous functions from (ledger, request) to a plan.

``ledger`` owns the committed records and every index derived from them; ``acquire`` decides
allocations, reservations, claims, pre-carved matches, gangs and preemption; ``release`` decides
releases, drains, deletes, expiry and promotion; ``quota`` and ``request`` hold the rules they share.
Nothing here awaits, reads a store or talks to a provider: the commit loop (:mod:`computegroups.commit`)
stages the plan's change set on the ledger, commits it, then the manager runs its effects.
"""

from computegroups.decide.acquire import plan_acquire, plan_create
from computegroups.decide.ledger import Ledger, Staged
from computegroups.decide.plan import Plan
from computegroups.decide.release import (
    plan_cordon,
    plan_delete,
    plan_drain,
    plan_drain_node,
    plan_expire,
    plan_release,
)
from computegroups.decide.request import Ask, context, priority_of, resolve_pool

__all__ = [
    "Ask",
    "Ledger",
    "Plan",
    "Staged",
    "context",
    "plan_acquire",
    "plan_cordon",
    "plan_create",
    "plan_delete",
    "plan_drain",
    "plan_drain_node",
    "plan_expire",
    "plan_release",
    "priority_of",
    "resolve_pool",
]
