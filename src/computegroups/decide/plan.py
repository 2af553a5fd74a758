"""What a decision returns: the change set to commit, the effects to run after it, and the outcome."""

from __future__ import annotations

from typing import NamedTuple

from computegroups.errors import ComputeGroupsError
from computegroups.events import Event
from computegroups.model import GroupRecord

__all__ = ["Dematerialise", "Effect", "Emit", "Materialise", "Plan"]


class Materialise(NamedTuple):
    """After the commit: make the group real through the provider (environment, worker, pod)."""

    record: GroupRecord


class Dematerialise(NamedTuple):
    """After the commit: undo what the provider made for these records (one group, or a gang's parts)."""

    records: tuple[GroupRecord, ...]


class Emit(NamedTuple):
    """After the commit: publish an event."""

    event: Event


Effect = Materialise | Dematerialise | Emit


class Plan(NamedTuple):
    """One decision: records to write and ids to delete in one commit, then effects, then the outcome.

    ``group``: the id of the group the call returns a view of. ``error``: raised once the commit is
    durable and the effects have run (a preemption that must wait). An empty change set commits
    nothing. ``changed``: what the call reports (a release that found nothing to release: False).
    """

    upserts: list[GroupRecord]
    deletes: list[str]
    effects: tuple[Effect, ...] = ()
    group: str | None = None
    error: ComputeGroupsError | None = None
    changed: bool = True
