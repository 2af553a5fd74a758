"""Choosing preemption victims: the fewest, then the lowest-priority, groups whose release lets a request fit.

Pure: reads the cluster and candidate victims, returns a decision and its victims, or None.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from computegroups.model import Constraints, GroupRecord, Requirements
from computegroups.placement.cluster import Cluster
from computegroups.placement.engine import DEFAULT_FILTERS, Decision, judge, prefilter
from computegroups.placement.plugins import UNRESOLVABLE, Context, Pick

__all__ = ["Preemption", "find_victims"]


@dataclass(frozen=True, slots=True)
class Preemption:
    """Where the preemptor goes once ``victims`` are gone."""

    decision: Decision
    victims: tuple[GroupRecord, ...]


def find_victims(
    cluster: Cluster,
    req: Requirements,
    cons: Constraints,
    ctx: Context,
    candidates: Mapping[str, Sequence[GroupRecord]],
    *,
    max_victims: int = 8,
) -> Preemption | None:
    """The minimal victim set over all nodes: fewest victims, then lowest top priority, then lowest sum.

    ``candidates`` maps node ids to groups that may be preempted (preemptible, lower priority than
    the request, not already draining). Ties go to the node that comes first. Only nodes where the
    request was refused for want of capacity are searched: releasing groups cannot fix a wrong
    label, model, pool or rule (an unresolvable reason).
    """
    screen = prefilter(DEFAULT_FILTERS, cluster, req, cons, ctx)
    best: tuple[tuple[int, int, int, int], Preemption] | None = None
    for node_id in sorted(candidates, key=lambda n: cluster.by_id[n].ordinal if n in cluster.by_id else 1 << 62):
        node = cluster.by_id.get(node_id)
        if node is None:
            continue
        now = judge(node, req, cons, ctx, screen)
        if not isinstance(now, Pick) and now.code == UNRESOLVABLE:
            continue
        pool = sorted(candidates[node_id], key=lambda r: (r.priority, r.created_at, r.id))
        for k in range(1, min(len(pool), max_victims) + 1):
            if best is not None and k > best[0][0]:
                break
            found = None
            for combo in itertools.combinations(pool, k):
                key = (k, max(r.priority for r in combo), sum(r.priority for r in combo), node.ordinal)
                if best is not None and key >= best[0]:
                    continue
                picked = judge(node.without(combo), req, cons, ctx, screen)
                if not isinstance(picked, Pick):
                    continue
                decision = Decision(node_id, picked.devices, req.cpus_milli, req.memory_mib, 0.0)
                if found is None or key < found[0]:
                    found = (key, Preemption(decision, combo))
            if found is not None:
                if best is None or found[0] < best[0]:
                    best = found
                break
    return best[1] if best else None
