"""Allocate+release throughput of 1 and 2 managers on the real test control plane (not a test).

``python -m bench.k8s_commits [--seconds 15] [--src DIR ...]``: starts the control plane of
``tests/k8s`` (etcd, kube-apiserver, kube-scheduler, kwok; binaries from scripts/k8s-testenv/build),
one 8-GPU KWOK node per run, and runs managers in separate processes, each a loop of
``allocate_compute_group(gpus=1)`` then ``deallocate_compute_group``. Prints, per run, the cycles
per second of each manager and in all, the API requests per cycle of the state store, and the
ConflictErrors. ``--src DIR`` runs the managers with ``PYTHONPATH=DIR`` (another checkout's
``src``), interleaved with this one (in every part), for a before/after in one sitting.

Then, for 1 and 2 managers, an allocate-only run on ``--alloc-nodes`` nodes (default 25, 200 GPUs):
each manager allocates 1-GPU groups until the nodes are full or ``--seconds`` pass, reports its
allocations per second and the GPU UUIDs it holds, and releases them only once every manager has
finished allocating; a UUID held by two groups at that moment is a double allocation (counted,
must be 0), and the CPU seconds each process used while they allocated (the managers and every
control-plane process); the nodes are deleted after each run. Last, on the same control plane,
kube-scheduler binding ``--scheduler-pods`` one-GPU pods (default 200) onto as many 8-GPU nodes of
their own (``bench.k8s_common``), beside the managers' rates.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import machine
from bench.k8s_common import (
    REPO,
    cpu_seconds,
    delete_nodes,
    deploy_namespace,
    load_average,
    make_nodes,
    scheduler_binding_rate,
    start_control_plane,
)

WORKER = """
import asyncio, json, os, sys, time
from computegroups import ComputeGroupManager, ConflictError, KubernetesComputeResourceProvider

async def main(kubeconfig, ns, selector, who, sync, seconds):
    p = KubernetesComputeResourceProvider(kubeconfig, namespace=ns, node_selector=selector)
    cycles, conflicts = 0, 0
    async with ComputeGroupManager(p, p.state_store()) as mgr:
        open(os.path.join(sync, who), "w").close()
        while not os.path.exists(os.path.join(sync, "go")):
            await asyncio.sleep(0.005)
        client = getattr(mgr.store, "client", None)
        before = dict(getattr(client, "requests", {}))
        start = time.monotonic()
        end = start + float(seconds)
        while time.monotonic() < end:
            try:
                g = await mgr.allocate_compute_group(f"{who}-{cycles}", {"gpus": 1})
                await mgr.deallocate_compute_group(g.id)
                cycles += 1
            except ConflictError:
                conflicts += 1
        took = time.monotonic() - start
        after = dict(getattr(client, "requests", {}))
    reqs = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
    print(json.dumps({"cycles": cycles, "seconds": took, "conflicts": conflicts, "requests": reqs}))

asyncio.run(main(*sys.argv[1:]))
"""

ALLOC_WORKER = """
import asyncio, json, os, sys, time
from computegroups import ComputeGroupManager, ConflictError, InsufficientResourcesError
from computegroups import KubernetesComputeResourceProvider

async def main(kubeconfig, ns, selector, who, sync, seconds, managers, concurrency):
    p = KubernetesComputeResourceProvider(kubeconfig, namespace=ns, node_selector=selector)
    groups, uuids, conflicts = [], [], 0
    async with ComputeGroupManager(p, p.state_store()) as mgr:
        open(os.path.join(sync, who), "w").close()
        while not os.path.exists(os.path.join(sync, "go")):
            await asyncio.sleep(0.005)
        start = time.monotonic()
        cpu0 = time.process_time()
        end = start + float(seconds)

        async def loop():  # one caller allocating in turn; ``concurrency`` of them at once
            nonlocal conflicts
            while time.monotonic() < end:
                try:
                    g = await mgr.allocate_compute_group(f"{who}-{len(groups)}", {"gpus": 1})
                except ConflictError:
                    conflicts += 1
                    continue
                except InsufficientResourcesError:
                    return
                groups.append(g.id)
                uuids.extend(g.resources["gpu_uuids"])

        await asyncio.gather(*(loop() for _ in range(int(concurrency))))
        took = time.monotonic() - start
        cpu = time.process_time() - cpu0
        open(os.path.join(sync, "done-" + who), "w").close()
        while not all(os.path.exists(os.path.join(sync, "done-" + w)) for w in "ab"[: int(managers)]):
            await asyncio.sleep(0.01)
        async def release(mine):  # as many callers releasing at once as allocated
            for gid in mine:
                await mgr.deallocate_compute_group(gid)

        n = int(concurrency)
        await asyncio.gather(*(release(groups[i::n]) for i in range(n)))
    out = {"allocations": len(groups), "seconds": took, "conflicts": conflicts, "uuids": uuids, "cpu_s": cpu}
    print(json.dumps(out))

asyncio.run(main(*sys.argv[1:]))
"""


def spawn(
    worker: str,
    kubeconfig: Path,
    namespace: str,
    tag: str,
    managers: int,
    seconds: float,
    src: str | None,
    *extra: str,
    cp: Any = None,
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Run ``managers`` worker processes on the nodes labelled ``tag``, start them together; return their
    JSON and, with ``cp``, the CPU seconds each control-plane process used from the start until every
    worker wrote its ``done-`` file (the allocate-only worker does, when it stops allocating)."""
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    with tempfile.TemporaryDirectory() as sync:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    worker,
                    str(kubeconfig),
                    namespace,
                    f"computegroups-bench={tag}",
                    w,
                    sync,
                    str(seconds),
                    *extra,
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO if not src else sync,
                env=env,
            )
            for w in "ab"[:managers]
        ]
        while not all((Path(sync) / w).exists() for w in "ab"[:managers]):
            if any(p.poll() is not None for p in procs):
                raise SystemExit(procs[0].communicate()[1][-2000:])
            time.sleep(0.02)
        before = cpu_seconds(cp) if cp is not None else {}
        (Path(sync) / "go").touch()
        used: dict[str, float] = {}
        if cp is not None:
            while not all((Path(sync) / f"done-{w}").exists() for w in "ab"[:managers]):
                if any(p.poll() is not None for p in procs):
                    break
                time.sleep(0.05)
            used = {k: round(v - before.get(k, 0.0), 1) for k, v in cpu_seconds(cp).items()}
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=2 * seconds + 300)  # allocating, then releasing
            if p.returncode != 0:
                raise SystemExit(err[-2000:])
            outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs, used


def run(cp: Any, kubeconfig: Path, namespace: str, managers: int, seconds: float, src: str | None) -> dict[str, Any]:
    """Allocate+release cycles of ``managers`` managers on one 8-GPU node for ``seconds``."""
    tag = uuid.uuid4().hex[:6]
    cp.make_gpu_node(f"bench-{tag}", labels={"computegroups-bench": tag})
    outs, _ = spawn(WORKER, kubeconfig, namespace, tag, managers, seconds, src)
    total = sum(o["cycles"] for o in outs)
    per_cycle: dict[str, int] = {}
    for o in outs:
        for k, v in o["requests"].items():
            per_cycle[k] = per_cycle.get(k, 0) + v
    return {
        "managers": managers,
        "src": src or "this checkout",
        "cycles_per_s": [round(o["cycles"] / o["seconds"], 1) for o in outs],
        "total_per_s": round(sum(o["cycles"] / o["seconds"] for o in outs), 1),
        "share_min": round(min(o["cycles"] for o in outs) / total, 2) if total else 0.0,
        "conflict_errors": sum(o["conflicts"] for o in outs),
        "store_requests_per_cycle": {k: round(v / total, 2) for k, v in sorted(per_cycle.items())} if total else {},
    }


def allocate_only(
    cp: Any,
    kubeconfig: Path,
    namespace: str,
    managers: int,
    nodes: int,
    seconds: float,
    concurrency: int = 1,
    src: str | None = None,
) -> dict[str, Any]:
    """Managers allocating 1-GPU groups on ``nodes`` 8-GPU nodes until full, each from ``concurrency``
    callers at once; double allocations counted. The nodes are deleted afterwards, so every run has a
    cluster of the same size (KWOK nodes left behind would add their heartbeats to the next run's
    API server load)."""
    tag = uuid.uuid4().hex[:6]
    labels = {"computegroups-bench": tag}
    make_nodes(cp, nodes, labels)
    try:
        outs, used = spawn(
            ALLOC_WORKER, kubeconfig, namespace, tag, managers, seconds, src, str(managers), str(concurrency), cp=cp
        )
    finally:
        delete_nodes(cp, labels)
    uuids = [u for o in outs for u in o["uuids"]]
    total = sum(o["allocations"] for o in outs)
    took = max(o["seconds"] for o in outs)
    return {
        "managers": managers,
        "src": src or "this checkout",
        "concurrency": concurrency,
        "gpus": nodes * 8,
        "allocations": [o["allocations"] for o in outs],
        "allocations_per_s": [round(o["allocations"] / o["seconds"], 1) for o in outs],
        "total_per_s": round(total / took, 1),
        "seconds": round(took, 2),
        "share_min": round(min(o["allocations"] for o in outs) / total, 2) if total else 0.0,
        "conflict_errors": sum(o["conflicts"] for o in outs),
        "double_allocations": len(uuids) - len(set(uuids)),
        "cpu_s": {**{f"manager-{w}": round(o["cpu_s"], 1) for w, o in zip("ab", outs, strict=False)}, **used},
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.k8s_commits")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--src", action="append", default=[], help="also run with PYTHONPATH=SRC (interleaved)")
    ap.add_argument("--alloc-nodes", type=int, default=25, help="8-GPU nodes of the allocate-only run (0: none)")
    ap.add_argument("--scheduler-pods", type=int, default=200, help="GPU pods for kube-scheduler to bind (0: none)")
    ap.add_argument(
        "--concurrency",
        type=int,
        action="append",
        default=[],
        help="callers allocating at once in each manager of the allocate-only run (repeatable; default 1)",
    )
    ap.add_argument("--no-cycles", action="store_true", help="skip the allocate+release cycle runs")
    args = ap.parse_args(argv)
    if any(c < 1 or c > 1024 for c in args.concurrency):
        ap.error("--concurrency must be in 1..1024")
    for flag, value in (("--seconds", args.seconds), ("--alloc-nodes", args.alloc_nodes)):
        if value < 0 or (flag == "--seconds" and value == 0):
            ap.error(f"{flag} must be positive")
    if args.scheduler_pods < 0:
        ap.error("--scheduler-pods must be 0 or more")
    cp = start_control_plane()
    try:
        print(json.dumps({"machine": machine()}), flush=True)
        for managers in (1, 2) if not args.no_cycles else ():
            for src in [None, *args.src]:
                ns, kubeconfig = deploy_namespace(cp)
                r = run(cp, kubeconfig, ns, managers, args.seconds, src)
                print(json.dumps(r), flush=True)
        for concurrency in args.concurrency or [1]:
            for managers in (1, 2) if args.alloc_nodes else ():
                for src in [None, *args.src]:
                    ns, kubeconfig = deploy_namespace(cp)
                    r = allocate_only(cp, kubeconfig, ns, managers, args.alloc_nodes, args.seconds, concurrency, src)
                    print(json.dumps({"allocate_only": r}), flush=True)
        if args.scheduler_pods:
            ns, _ = deploy_namespace(cp)
            labels = {"computegroups-bench-sched": uuid.uuid4().hex[:6]}
            make_nodes(cp, -(-args.scheduler_pods // 8), labels)
            r = scheduler_binding_rate(cp, ns, args.scheduler_pods, labels)
            print(json.dumps({"kube_scheduler": r, "load_average": load_average()}), flush=True)
    finally:
        cp.stop(check=False)


if __name__ == "__main__":
    main()
