"""Packing quality on a synthetic, seeded LLM-serving workload with arrivals and departures.

Workers of tensor-parallel degree 1, 2, 4 and 8 (whole GPUs) and fractional
shares (0.25, 0.5 of a GPU, small models or embedders) arrive as a Poisson
process and leave after exponential lifetimes; a request that cannot be placed
is rejected and not retried. The same event sequence is replayed through:

* ours: ``allocate_compute_group`` / ``deallocate_compute_group``, default strategy;
* first-fit: nodes in order, the lowest-numbered GPUs that fit;
* optimum: an oracle that may re-pack every running worker at every arrival, so
  it rejects only when no assignment of all running workers plus the new one
  exists (exhaustive search over assignments; see :func:`exact_fits`). No
  online placer without migration can accept a request this oracle rejects
  from the same running set, so its utilisation is the reference.

Reported: time-averaged share of GPUs held, requests rejected, and requests
rejected although enough GPU capacity was free in total (fragmentation).
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from bench.common import mixed_spec
from computegroups import ComputeGroupManager, InsufficientResourcesError, SimulatedComputeResourceProvider

MILLI = 1000
GPUS_PER_NODE = 8
#: (GPU request in thousandths, per-GPU-share?) and its share of arrivals.
MIX: tuple[tuple[int, float], ...] = ((250, 0.10), (500, 0.15), (1000, 0.35), (2000, 0.2), (4000, 0.12), (8000, 0.08))


@dataclass(frozen=True, slots=True)
class Event:
    t: float
    kind: str  # "arrive" or "leave"
    job: int
    milli: int


def workload(nodes: int, events: int, load: float, seed: int) -> list[Event]:
    """Arrivals and departures whose offered load is ``load`` x the cluster's GPUs."""
    rng = random.Random(seed)
    sizes = [m for m, _ in MIX]
    weights = [w for _, w in MIX]
    mean_size = sum(m * w for m, w in MIX) / MILLI
    lifetime = 100.0
    rate = load * nodes * GPUS_PER_NODE / (mean_size * lifetime)  # Little's law
    out: list[Event] = []
    t = 0.0
    for job in range(events):
        t += rng.expovariate(rate)
        m = rng.choices(sizes, weights)[0]
        out.append(Event(t, "arrive", job, m))
        out.append(Event(t + rng.expovariate(1 / lifetime), "leave", job, m))
    out.sort(key=lambda e: (e.t, e.kind == "arrive"))
    return out


def _requirements(milli: int) -> dict[str, Any]:
    return {"gpus": milli / MILLI if milli < MILLI else milli // MILLI}


@dataclass
class Outcome:
    policy: str
    utilisation: float  # time-averaged share of GPUs held
    accepted: int
    rejected: int
    frag_rejected: int  # rejected although total free capacity was enough


def _replay(events: list[Event], nodes: int, place: Any, release: Any) -> Outcome:
    total = nodes * GPUS_PER_NODE * MILLI
    held = 0
    area = 0.0
    last = events[0].t if events else 0.0
    live: dict[int, Any] = {}
    acc = rej = frag = 0
    for e in events:
        area += held * (e.t - last)
        last = e.t
        if e.kind == "arrive":
            handle = place(e.milli)
            if handle is None:
                rej += 1
                if total - held >= e.milli:
                    frag += 1
            else:
                acc += 1
                live[e.job] = handle
                held += e.milli
        elif e.job in live:
            release(live.pop(e.job))
            held -= e.milli
    span = (events[-1].t - events[0].t) if events else 1.0
    return Outcome("", area / (span * total), acc, rej, frag)


# -- first fit -------------------------------------------------------------------
def first_fit(events: list[Event], nodes: int) -> Outcome:
    used = [[0] * GPUS_PER_NODE for _ in range(nodes)]

    def release(h: Any) -> None:
        n, idx, m = h
        for i in idx:
            used[n][i] -= m

    out = _replay(events, nodes, lambda milli: _ff_place(used, milli), release)
    out.policy = "first-fit"
    return out


# -- the oracle ---------------------------------------------------------------------
def exact_fits(items: tuple[int, ...], nodes: int) -> bool:
    """Whether workers of these sizes (thousandths) can all be placed on ``nodes`` empty 8-GPU nodes.

    Exhaustive: whole-GPU workers go to nodes (every assignment, largest
    first, nodes with equal free counts treated as one), then shares go into
    the GPUs left (every assignment, largest first). Memoised on the sorted
    remaining items and free capacities.
    """
    whole = tuple(sorted((m // MILLI for m in items if m >= MILLI), reverse=True))
    shares = tuple(sorted((m for m in items if m < MILLI), reverse=True))
    return _fit_whole(whole, tuple([GPUS_PER_NODE] * nodes), shares)


@lru_cache(maxsize=200_000)
def _fit_whole(whole: tuple[int, ...], free: tuple[int, ...], shares: tuple[int, ...]) -> bool:
    if not whole:
        gpus = tuple(sorted((MILLI,) * sum(free)))
        return _fit_shares(shares, gpus)
    k, rest = whole[0], whole[1:]
    seen: set[int] = set()
    for n, f in enumerate(free):
        if f >= k and f not in seen:
            seen.add(f)
            nxt = tuple(sorted((*free[:n], f - k, *free[n + 1 :])))
            if _fit_whole(rest, nxt, shares):
                return True
    return False


@lru_cache(maxsize=200_000)
def _fit_shares(shares: tuple[int, ...], gpus: tuple[int, ...]) -> bool:
    if not shares:
        return True
    s, rest = shares[0], shares[1:]
    seen: set[int] = set()
    for i, g in enumerate(gpus):
        if g >= s and g not in seen:
            seen.add(g)
            nxt = tuple(sorted((*gpus[:i], g - s, *gpus[i + 1 :])))
            if _fit_shares(rest, nxt):
                return True
    return False


def optimum(events: list[Event], nodes: int) -> Outcome:
    running: dict[int, int] = {}
    counter = [0]

    def place(milli: int) -> Any:
        items = (*running.values(), milli)
        if not exact_fits(tuple(sorted(items)), nodes):
            return None
        counter[0] += 1
        running[counter[0]] = milli
        return counter[0]

    def release(h: Any) -> None:
        running.pop(h, None)

    out = _replay(events, nodes, place, release)
    out.policy = "optimum (re-packing oracle)"
    return out


# -- ours -----------------------------------------------------------------------------
def ours(events: list[Event], nodes: int) -> Outcome:
    """The public API (default bin-pack) driven through the same replay as the references."""
    loop = asyncio.new_event_loop()
    provider = SimulatedComputeResourceProvider.from_spec(mixed_spec(nodes))
    mgr = ComputeGroupManager(provider, ":memory:")
    loop.run_until_complete(mgr.__aenter__())

    def place(milli: int) -> str | None:
        try:
            return loop.run_until_complete(mgr.allocate_compute_group("serve", _requirements(milli))).id
        except InsufficientResourcesError:
            return None

    def release(gid: Any) -> None:
        loop.run_until_complete(mgr.deallocate_compute_group(gid))

    try:
        out = _replay(events, nodes, place, release)
    finally:
        loop.run_until_complete(mgr.__aexit__(None, None, None))
        loop.close()
    out.policy = "ours (default bin-pack)"
    return out


def run(
    clusters: tuple[int, ...] = (2, 4),
    events: int = 2000,
    loads: tuple[float, ...] = (0.9, 1.1),
    seeds: tuple[int, ...] = (1, 2, 3),
    log: Any = print,
) -> list[dict[str, Any]]:
    """One row per (cluster size, load, policy), summed or averaged over seeds."""
    rows = []
    for nodes in clusters:
        for load in loads:
            agg: dict[str, list[Outcome]] = {}
            for seed in seeds:
                ev = workload(nodes, events, load, seed)
                for fn in (ours, first_fit, optimum):
                    o = fn(ev, nodes)
                    agg.setdefault(o.policy, []).append(o)
            opt_util = sum(o.utilisation for o in agg["optimum (re-packing oracle)"]) / len(seeds)
            for policy, outs in agg.items():
                util = sum(o.utilisation for o in outs) / len(outs)
                row = {
                    "nodes": nodes,
                    "gpus": nodes * GPUS_PER_NODE,
                    "load": load,
                    "policy": policy,
                    "seeds": len(outs),
                    "arrivals": sum(o.accepted + o.rejected for o in outs),
                    "utilisation": util,
                    "vs_optimum": util / opt_util if opt_util else float("nan"),
                    "rejected": sum(o.rejected for o in outs),
                    "frag_rejected": sum(o.frag_rejected for o in outs),
                }
                rows.append(row)
                log(
                    f"packing: {nodes} nodes load {load:.1f} {policy:28s} util {100 * util:5.1f}% "
                    f"({100 * row['vs_optimum']:5.1f}% of optimum)  rejected {row['rejected']:5d}  "
                    f"with enough free {row['frag_rejected']:5d}"
                )
    return rows


def utilisation_curve(nodes: int = 4, events: int = 2000, load: float = 1.1, seed: int = 1) -> dict[str, Any]:
    """Held GPUs over time for ours and first-fit (for the plot)."""
    ev = workload(nodes, events, load, seed)
    curves: dict[str, list[tuple[float, float]]] = {}
    for name, fn in (("first-fit", _trace_first_fit), ("ours", _trace_ours)):
        curves[name] = fn(ev, nodes)
    return {"nodes": nodes, "load": load, "seed": seed, "curves": curves}


def _trace_first_fit(events: list[Event], nodes: int) -> list[tuple[float, float]]:
    return _trace(events, nodes, "first-fit")


def _trace_ours(events: list[Event], nodes: int) -> list[tuple[float, float]]:
    return _trace(events, nodes, "ours")


def _trace(events: list[Event], nodes: int, which: str) -> list[tuple[float, float]]:
    total = nodes * GPUS_PER_NODE * MILLI
    points: list[tuple[float, float]] = []
    held = 0
    if which == "first-fit":
        used = [[0] * GPUS_PER_NODE for _ in range(nodes)]
        live: dict[int, Any] = {}
        for e in events:
            if e.kind == "arrive":
                h = _ff_place(used, e.milli)
                if h is not None:
                    live[e.job] = h
                    held += e.milli
            elif e.job in live:
                n, idx, m = live.pop(e.job)
                for i in idx:
                    used[n][i] -= m
                held -= e.milli
            points.append((e.t, held / total))
        return points

    async def go() -> list[tuple[float, float]]:
        nonlocal held
        provider = SimulatedComputeResourceProvider.from_spec(mixed_spec(nodes))
        async with ComputeGroupManager(provider, ":memory:") as mgr:
            live2: dict[int, str] = {}
            for e in events:
                if e.kind == "arrive":
                    try:
                        g = await mgr.allocate_compute_group("serve", _requirements(e.milli))
                        live2[e.job] = g.id
                        held += e.milli
                    except InsufficientResourcesError:
                        pass
                elif e.job in live2:
                    await mgr.deallocate_compute_group(live2.pop(e.job))
                    held -= e.milli
                points.append((e.t, held / total))
        return points

    return asyncio.run(go())


def _ff_place(used: list[list[int]], milli: int) -> Any:
    for n, gpus in enumerate(used):
        if milli < MILLI:
            for i, u in enumerate(gpus):
                if u + milli <= MILLI:
                    gpus[i] += milli
                    return (n, (i,), milli)
        else:
            k = milli // MILLI
            free = [i for i, u in enumerate(gpus) if u == 0]
            if len(free) >= k:
                for i in free[:k]:
                    gpus[i] = MILLI
                return (n, tuple(free[:k]), MILLI)
    return None
