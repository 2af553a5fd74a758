"""What a decision returns: the change set to commit, the effects to run after it, and the outcome."""

from __future__ import annotations

from computegroups.errors import ComputeGroupsError
from computegroups.events import Event
from computegroups.model import GroupRecord

__all__ = ["Plan"]


class Plan:
    """One decision: records to write and ids to delete in one commit, then effects, then the outcome.

    Effects, run in this order once the commit is durable: ``dematerialise`` (undo what the provider
    made for one group's records), ``materialise`` (make each record real: environment, worker, pod),
    ``events`` (publish). ``group``: the id of the group the call returns a view of. ``error``: raised
    after the effects (a preemption that must wait). An empty change set commits nothing.
    ``changed``: what the call reports (a release that found nothing to release: False).
    ``cordons``: node marks committed with the change set (node -> reason; None: uncordoned).

    A plain class, not a named tuple: compiled, it is built several times faster, and every call
    that changes state builds one.
    """

    __slots__ = (
        "changed",
        "cordons",
        "deletes",
        "dematerialise",
        "error",
        "events",
        "group",
        "materialise",
        "upserts",
    )

    def __init__(
        self,
        upserts: list[GroupRecord],
        deletes: list[str],
        *,
        materialise: tuple[GroupRecord, ...] = (),
        dematerialise: tuple[GroupRecord, ...] = (),
        events: tuple[Event, ...] = (),
        group: str | None = None,
        error: ComputeGroupsError | None = None,
        changed: bool = True,
        cordons: dict[str, str | None] | None = None,
    ) -> None:
        self.upserts = upserts
        self.deletes = deletes
        self.materialise = materialise
        self.dematerialise = dematerialise
        self.events = events
        self.group = group
        self.error = error
        self.changed = changed
        self.cordons = cordons
