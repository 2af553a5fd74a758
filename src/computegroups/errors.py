"""Exceptions raised by computegroups.

Every error the library raises on purpose derives from one root, so callers
can catch everything with a single ``except ComputeGroupsError``::

    ComputeGroupsError
    ├── InvalidRequestError        a request is malformed; nothing was changed
    ├── InsufficientResourcesError a valid request that does not fit now
    │   ├── QuotaExceededError     it would take a component or tenant past its pool quota
    │   └── PreemptionPendingError it will fit once preempted groups finish draining
    ├── NotFoundError              a group, node or reservation id is unknown
    ├── ConflictError              the request contradicts the current state
    ├── StateError                 the state store is unreadable, corrupt or not ours
    └── ProviderError              discovery or materialisation failed underneath

Errors from libraries underneath (sqlite3, NVML, Kubernetes) are translated at
one boundary per backend with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

__all__ = [
    "REFUSALS",
    "ComputeGroupsError",
    "ConflictError",
    "InsufficientResourcesError",
    "InvalidRequestError",
    "NotFoundError",
    "PreemptionPendingError",
    "ProviderError",
    "QuotaExceededError",
    "StateError",
]


class ComputeGroupsError(Exception):
    """Root of every error raised on purpose by computegroups."""


class InvalidRequestError(ComputeGroupsError, ValueError):
    """A request is malformed: unknown key, wrong type, impossible number.

    Raised before anything is read or written, so the state is unchanged.
    ``key`` names the offending field (``"requirements.gpus"``), when one does.
    The caller fixes the request; retrying it unchanged fails the same way.
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class InsufficientResourcesError(ComputeGroupsError):
    """A valid request that no node can satisfy at the moment.

    ``reasons`` maps a filter's explanation ("2 of 8 GPUs free, 4 requested")
    to the number of nodes it rejected, so a caller can tell what to free or
    relax. Retrying after capacity is released may succeed.
    """

    def __init__(self, message: str, *, reasons: Mapping[str, int] | None = None) -> None:
        self.reasons: dict[str, int] = dict(reasons or {})
        if self.reasons:
            top = sorted(self.reasons.items(), key=lambda kv: (-kv[1], kv[0]))[:4]
            detail = "; ".join(f"{n} node(s): {why}" for why, n in top)
            message = f"{message} ({detail})"
        super().__init__(message)


class QuotaExceededError(InsufficientResourcesError):
    """The request would take a component or tenant past its quota in a pool. Nothing was changed."""


class PreemptionPendingError(InsufficientResourcesError):
    """The request preempted lower-priority groups; it gets its group once they finish draining.

    The victims were moved to draining in the same commit that recorded the waiting group
    ``group_id``. Retry ``allocate_compute_group`` with ``request_id`` to get the group once it is
    allocated (the retry raises this error again while the victims still drain).
    """

    def __init__(self, message: str, *, group_id: str, request_id: str, victims: Sequence[str]) -> None:
        super().__init__(message)
        self.group_id = group_id
        self.request_id = request_id
        self.victims = list(victims)


class NotFoundError(ComputeGroupsError, LookupError):
    """An id (group, node, reservation) is unknown to the state store."""


class ConflictError(ComputeGroupsError):
    """The request contradicts the current state.

    Examples: deleting an allocated group, reusing a request id for a different
    request, or a compare-and-swap that kept losing to concurrent writers.
    Nothing was changed.
    """


class StateError(ComputeGroupsError):
    """The state store cannot be used: corrupt, unreadable, or not a computegroups store.

    The library never silently resets a store; an operator has to look.
    """


class ProviderError(ComputeGroupsError):
    """Discovery or materialisation failed in the environment underneath."""


#: The errors that refuse a valid request (as opposed to a malformed one): each is recorded as a ``refused`` event.
REFUSALS = (InsufficientResourcesError, NotFoundError, ConflictError)


def one_of(values: Sequence[str]) -> str:
    """Format a closed set of allowed values for an error message."""
    return ", ".join(values)
