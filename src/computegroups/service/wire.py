"""The HTTP API's JSON: groups, nodes and typed errors, both ways.

One table maps each error class to its HTTP status and code; the server writes it and the client
reads it back into the same exception type, so a caller of the HTTP client sees exactly what a
caller of the Python API sees.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from computegroups.errors import (
    ComputeGroupsError,
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
    PreemptionPendingError,
    ProviderError,
    QuotaExceededError,
    StateError,
)
from computegroups.model import ComputeGroup, GangComputeGroup, GroupRecord

__all__ = ["ERRORS", "RemoteComputeGroup", "error_body", "error_from_body", "group_from_json", "group_json"]

#: Error class -> (HTTP status, code), most specific first. Anything else is a 500.
ERRORS: tuple[tuple[type[ComputeGroupsError], int, str], ...] = (
    (InvalidRequestError, 400, "invalid_request"),
    (QuotaExceededError, 403, "quota_exceeded"),
    (NotFoundError, 404, "not_found"),
    (PreemptionPendingError, 409, "preemption_pending"),
    (InsufficientResourcesError, 409, "insufficient_resources"),
    (ConflictError, 409, "conflict"),
    (StateError, 500, "state_error"),
    (ProviderError, 502, "provider_error"),
)


def error_body(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """The status and JSON body for an exception raised while serving a request."""
    for cls, status, code in ERRORS:
        if isinstance(exc, cls):
            body: dict[str, Any] = {"error": code, "type": cls.__name__, "message": _message(exc)}
            if isinstance(exc, InvalidRequestError) and exc.key is not None:
                body["key"] = exc.key
            if isinstance(exc, InsufficientResourcesError) and exc.reasons:
                body["reasons"] = exc.reasons
            if isinstance(exc, PreemptionPendingError):
                body.update(group_id=exc.group_id, request_id=exc.request_id, victims=exc.victims)
            return status, body
    return 500, {"error": "internal", "type": type(exc).__name__, "message": "internal error; see the server log"}


def _message(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, InsufficientResourcesError) and exc.reasons:
        return text.split(" (", 1)[0]  # the reasons travel as data and are formatted again on the other side
    return text


def error_from_body(status: int, body: Mapping[str, Any]) -> ComputeGroupsError:
    """The exception a JSON error body stands for (ProviderError when it is not one of ours)."""
    code = body.get("error")
    message = str(body.get("message", f"HTTP {status}"))
    for cls, _, known in ERRORS:
        if code != known:
            continue
        if cls is InvalidRequestError:
            key = body.get("key")
            return InvalidRequestError(message, key=key if isinstance(key, str) else None)
        if cls is PreemptionPendingError:
            return PreemptionPendingError(
                message,
                group_id=str(body.get("group_id", "")),
                request_id=str(body.get("request_id", "")),
                victims=[str(v) for v in body.get("victims", [])],
            )
        if issubclass(cls, InsufficientResourcesError):
            reasons = body.get("reasons") or {}
            return cls(message, reasons={str(k): int(v) for k, v in reasons.items()})
        return cls(message)
    return ProviderError(f"server answered HTTP {status}: {message}")


def group_json(group: ComputeGroup) -> dict[str, Any]:
    """A group as the API returns it: its ``to_dict`` plus the stored record(s) behind it."""
    out = group.to_dict()
    if isinstance(group, GangComputeGroup):
        out["records"] = [r.to_json() for r in group.part_records]
    else:
        out["records"] = [group.record.to_json()]
    return out


class RemoteComputeGroup(ComputeGroup):
    """A group as read over HTTP: the same properties as the server's view, from its JSON."""

    __slots__ = ("_data", "_parts")

    def __init__(self, data: Mapping[str, Any]) -> None:
        parts = [GroupRecord.from_json(r) for r in data["records"]]
        super().__init__(parts[0], None)
        self._data = dict(data)
        self._parts = parts

    @property
    def id(self) -> str:
        return str(self._data["id"])

    @property
    def resources(self) -> dict[str, Any]:
        return dict(self._data["resources"])

    @property
    def topology(self) -> dict[str, Any]:
        return dict(self._data["topology"])

    @property
    def utilization(self) -> dict[str, float]:
        return {}

    @property
    def part_records(self) -> list[GroupRecord]:
        """Every node's record (one unless the group is a gang)."""
        return list(self._parts)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k != "records"}

    def __repr__(self) -> str:
        return f"RemoteComputeGroup(id={self.id!r}, node={self.node_id!r}, state={self.allocation_state})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemoteComputeGroup) and other._parts == self._parts and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)


def group_from_json(data: Any) -> RemoteComputeGroup:
    """Parse a group the API returned; a body that is not one is a ProviderError."""
    try:
        return RemoteComputeGroup(data)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ProviderError(f"server returned a malformed group: {exc}") from exc
