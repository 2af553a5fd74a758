"""Judging an existing group for a request with the same rules as a fresh placement.

A pre-carved group, a reservation being claimed and a waiting preemptor being promoted already
name their devices. Whether one of them may serve a request is decided by the ordinary pipeline
(pre-filters, filters, device choice) run on a view of its node in which the group's own capacity
counts as free and every other GPU is unavailable, so the answer is exactly the answer a fresh
placement limited to those devices would give: model, memory, MIG profile, health, cordon, labels,
pool, affinity, NVLink and NUMA constraints alike. On top of that, the group must hold what the
request asks for (:func:`holds`): that is its size, not a placement rule. Pure and synchronous.
"""

from __future__ import annotations

from collections.abc import Sequence

from computegroups.model import MILLI, Constraints, GroupRecord, Requirements
from computegroups.placement.cluster import Cluster
from computegroups.placement.engine import DEFAULT_FILTERS, judge, prefilter
from computegroups.placement.plugins import UNRESOLVABLE, Context, FilterPlugin, Pick, Reason, share_memory

__all__ = ["admits", "holds"]


def holds(record: GroupRecord, req: Requirements, *, exact: bool) -> Reason | None:
    """Whether the group holds what ``req`` asks for (``exact``: no more GPU capacity than that)."""
    devices = record.devices
    if req.share_milli:
        if len(devices) != 1 or devices[0].share_milli < req.share_milli:
            return Reason(UNRESOLVABLE, "holds no share of {:g} of a GPU", (req.share_milli / MILLI,))
        if exact and devices[0].share_milli != req.share_milli:
            return Reason(
                UNRESOLVABLE, "holds {:g} of a GPU, not {:g}", (devices[0].share_milli / MILLI, req.share_milli / MILLI)
            )
    else:
        if any(d.share_milli != MILLI for d in devices) or len(devices) < req.whole_gpus:
            return Reason(UNRESOLVABLE, "holds {} whole GPU(s), fewer than {}", (len(devices), req.whole_gpus))
        if exact and len(devices) != req.whole_gpus:
            return Reason(UNRESOLVABLE, "holds {} GPU(s), not {}", (len(devices), req.whole_gpus))
    if record.cpus_milli < req.cpus_milli:
        return Reason(
            UNRESOLVABLE, "holds {:g} CPUs, fewer than {:g}", (record.cpus_milli / MILLI, req.cpus_milli / MILLI)
        )
    if record.memory_mib < req.memory_mib:
        return Reason(UNRESOLVABLE, "holds {} MiB memory, less than {}", (record.memory_mib, req.memory_mib))
    return None


def admits(
    cluster: Cluster,
    record: GroupRecord,
    req: Requirements,
    cons: Constraints,
    ctx: Context,
    *,
    exact: bool,
    released: Sequence[GroupRecord] = (),
    filters: Sequence[FilterPlugin] = DEFAULT_FILTERS,
) -> Reason | None:
    """None if the existing group ``record`` may serve ``req`` under ``cons``, else why not.

    ``released``: groups on the node that are being released in the same change (a preemptor's
    last victims), counted as gone.
    """
    size = holds(record, req, exact=exact)
    if size is not None:
        return size
    node = cluster.by_id.get(record.node_id)
    if node is None:
        return Reason(UNRESOLVABLE, "node {} is no longer discovered", (record.node_id,))
    mask = 0
    for d in record.devices:
        mask |= 1 << d.index
    gone = [r for r in released if r.node_id == record.node_id and r.holds_capacity]
    if record.holds_capacity:
        gone.append(record)
    view = node.limited_to(mask, gone)
    picked = judge(view, req, cons, ctx, prefilter(filters, cluster, req, cons, ctx))
    if not isinstance(picked, Pick):
        return picked
    if req.share_milli:
        (mine,) = record.devices
        need = share_memory(view, mine.index, req)
        if mine.memory_mib < need:
            return Reason(UNRESOLVABLE, "holds {} MiB of GPU memory, less than {}", (mine.memory_mib, need))
    return None
