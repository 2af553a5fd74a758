"""What one write costs the API server and etcd, by kind of object (not a test).

``python -m bench.k8s_write_cost [--writes 300]``: starts the control plane of ``tests/k8s``, has a
manager allocate a few groups on DRA nodes so that real objects exist, reads one of each back (a
``ComputeGroup``, its ``ResourceClaim``, its ``Allocated`` Event, the ledger's record), then sends
``--writes`` writes of each kind through the project's client (kept-alive connections, 8 at once;
the ledger's updates one after another, each on the version the last returned) and prints the CPU
seconds (user + system, from ``/proc``) each control-plane process used per write:

* ``POST`` of a ComputeGroup, a ResourceClaim, an Event (each a copy under a new name);
* ``PUT`` of the ledger with an empty log, and with 8 entries of 4 and of 16 records, the change
  sets as objects (the older format: ``upserts`` as a list of records) and as one JSON string each
  (``changes``, the format written now).

The rates are the client's, from one process; what matters is the CPU per write.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from bench.common import machine
from bench.k8s_common import cpu_seconds, deploy_namespace, make_nodes, start_control_plane


def _fresh(obj: dict[str, Any], name: str) -> dict[str, Any]:
    """A copy of ``obj`` to create under ``name`` (what the server set removed)."""
    out = copy.deepcopy(obj)
    meta = out["metadata"]
    for key in ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation", "ownerReferences"):
        meta.pop(key, None)
    meta["name"] = name
    out.pop("status", None)
    return out


async def _measure(cp: Any, n: int, concurrency: int, write: Callable[[int], Awaitable[Any]]) -> dict[str, Any]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> None:
        async with sem:
            await write(i)

    before = cpu_seconds(cp)
    start = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    took = time.monotonic() - start
    after = cpu_seconds(cp)
    per = {k: round((after[k] - before.get(k, 0.0)) / n * 1000, 2) for k in after}
    return {"writes_per_s": round(n / took), "cpu_ms_per_write": {k: v for k, v in per.items() if v >= 0.05}}


async def _run(cp: Any, writes: int) -> None:
    from computegroups import ComputeGroupManager, KubernetesComputeResourceProvider
    from computegroups.kube.client import KubeClient

    ns, kubeconfig = deploy_namespace(cp, prefix="w")
    make_nodes(cp, 4, {"computegroups-bench-w": ns})
    provider = KubernetesComputeResourceProvider(kubeconfig, namespace=ns, node_selector=f"computegroups-bench-w={ns}")
    async with ComputeGroupManager(provider, provider.state_store()) as mgr:
        for i in range(8):
            await mgr.allocate_compute_group(f"c{i}", {"gpus": 1})
        await mgr.store.flush()  # type: ignore[attr-defined]
        await asyncio.sleep(1.0)  # the events are written after the group objects
    client = await KubeClient.create(kubeconfig, None, in_cluster=False)
    try:
        groups = f"/apis/computegroups.dev/v1alpha1/namespaces/{ns}"
        cg = (await client.get(f"{groups}/computegroups"))["items"][0]
        claims = f"/apis/resource.k8s.io/v1/namespaces/{ns}/resourceclaims"
        claim = (await client.get(claims))["items"][0]
        events = f"/api/v1/namespaces/{ns}/events"
        event = next(e for e in (await client.get(events))["items"] if e.get("reason") == "Allocated")
        ledger_path = f"{groups}/computegroupledgers/default"
        record = cg["spec"]["record"]
        tag = uuid.uuid4().hex[:4]

        def poster(path: str, obj: dict[str, Any]) -> Callable[[int], Awaitable[Any]]:
            return lambda i: client.post(path, _fresh(obj, f"w{tag}-{i}"))

        rows: list[tuple[str, dict[str, Any]]] = [
            ("POST ComputeGroup", await _measure(cp, writes, 8, poster(f"{groups}/computegroups", cg))),
            ("POST ResourceClaim", await _measure(cp, writes, 8, poster(claims, claim))),
            ("POST Event", await _measure(cp, writes, 8, poster(events, event))),
        ]
        for entries, per, as_string in [(0, 0, False), (8, 4, False), (8, 4, True), (8, 16, False), (8, 16, True)]:
            current = await client.get(ledger_path)
            changes = {"upserts": [record] * per, "deletes": []}
            log = [
                {"revision": 10**6 + j, "changes": json.dumps(changes, separators=(",", ":"))}
                if as_string
                else {"revision": 10**6 + j, **changes}
                for j in range(entries)
            ]
            body = copy.deepcopy(current)
            body["spec"]["log"] = log
            size = len(json.dumps(body, separators=(",", ":")))

            async def put(i: int, body: dict[str, Any] = body) -> None:
                nonlocal current
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                body["spec"]["gcBefore"] = i
                current = await client.put(ledger_path, body)

            form = "strings" if as_string else "objects"
            label = f"PUT ledger, {entries} entries x {per} records as {form} ({size} B)"
            rows.append((label, await _measure(cp, writes, 1, put)))
        for label, row in rows:
            print(json.dumps({"write": label, **row}), flush=True)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.k8s_write_cost")
    ap.add_argument("--writes", type=int, default=300, help="writes of each kind (1..100000)")
    args = ap.parse_args(argv)
    if not 1 <= args.writes <= 100_000:
        ap.error("--writes must be in 1..100000")
    cp = start_control_plane()
    try:
        print(json.dumps({"machine": machine()}), flush=True)
        asyncio.run(_run(cp, args.writes))
    finally:
        cp.stop(check=False)


if __name__ == "__main__":
    main()
