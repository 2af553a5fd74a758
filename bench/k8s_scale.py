"""Managers on a Kubernetes control plane with many nodes and live groups, beside kube-scheduler (not a test).

``python -m bench.k8s_scale [--nodes 100,1000] [--live 1000] [--seconds 10] [--scheduler-pods 200]``:
starts the control plane of ``tests/k8s`` and, for each node count in turn, creates that many
8-GPU KWOK nodes (from a thread pool, device-plugin GPUs: no ResourceSlices), has one manager
allocate ``--live`` groups of half a GPU (they stay allocated during the run), then measures, each
manager in a process of its own:

* open: the seconds a fresh process spends entering ``async with ComputeGroupManager(...)``
  (discovery of every node, the ledger, the group objects), and its VmRSS right after;
* cycles: ``allocate_compute_group(gpus=1)`` + ``deallocate_compute_group`` for ``--seconds``, 1 and
  then 2 managers at once: p50/p99 of a cycle, cycles per second, ConflictErrors;
* visibility: a second, open manager polls ``list_compute_groups`` every 5 ms while the first
  allocates a group every 0.3 s; the delay from the first's ``allocate_compute_group`` returning
  until the second lists the group (and from the call's start);
* kube-scheduler binding ``--scheduler-pods`` one-GPU pods onto the same nodes, on the same
  control plane (``bench.k8s_common.scheduler_binding_rate``).

The nodes are deleted before the next node count. One JSON line per node count.
"""

from __future__ import annotations

import argparse
import json
import statistics
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

def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])

async def wait(sync, name):
    while not os.path.exists(os.path.join(sync, name)):
        await asyncio.sleep(0.005)

async def main(mode, kubeconfig, ns, selector, who, sync, arg):
    p = KubernetesComputeResourceProvider(kubeconfig, namespace=ns, node_selector=selector)
    out = {}
    start = time.monotonic()
    async with ComputeGroupManager(p, p.state_store()) as mgr:
        out["open_s"] = time.monotonic() - start
        out["rss_kib"] = rss_kib()
        open(os.path.join(sync, who), "w").close()
        await wait(sync, "go")
        if mode == "fill":
            t = time.monotonic()
            for i in range(int(arg)):
                await mgr.allocate_compute_group(f"live-{i % 50}", {"gpus": 0.5})
            out["seconds"] = time.monotonic() - t
        elif mode == "cycle":
            lat, conflicts = [], 0
            t = time.monotonic()
            end = t + float(arg)
            while time.monotonic() < end:
                c = time.monotonic()
                try:
                    g = await mgr.allocate_compute_group(f"{who}-{len(lat)}", {"gpus": 1})
                    await mgr.deallocate_compute_group(g.id)
                except ConflictError:
                    conflicts += 1
                    continue
                lat.append(time.monotonic() - c)
            out.update(seconds=time.monotonic() - t, latencies=lat, conflicts=conflicts)
        elif mode == "write":
            made = []
            for i in range(int(arg)):
                c = time.monotonic()
                g = await mgr.allocate_compute_group("vis", {"gpus": 1})
                made.append([g.id, c, time.monotonic()])
                await asyncio.sleep(0.3)
            await asyncio.sleep(1.0)
            for gid, _, _ in made:
                await mgr.deallocate_compute_group(gid)
            out["made"] = made
        elif mode == "watch":
            seen = {}
            while not os.path.exists(os.path.join(sync, "stop")):
                for g in await mgr.list_compute_groups({"component": "vis"}):
                    seen.setdefault(g.id, time.monotonic())
                await asyncio.sleep(0.005)
            out["seen"] = seen
    print(json.dumps(out))

asyncio.run(main(*sys.argv[1:]))
"""


def spawn(
    modes: list[tuple[str, str]], kubeconfig: Path, namespace: str, selector: str, arg: str, stop_after: int = -1
) -> list[dict[str, Any]]:
    """Run one worker process per ``(mode, name)``, start them together once all are open, return their JSON.

    ``stop_after``: the index of the worker whose exit tells the others (watchers) to stop.
    """
    with tempfile.TemporaryDirectory() as sync:
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", WORKER, mode, str(kubeconfig), namespace, selector, who, sync, arg],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            for mode, who in modes
        ]
        try:
            while not all((Path(sync) / who).exists() for _, who in modes):
                if any(p.poll() is not None for p in procs):
                    raise SystemExit(next(p for p in procs if p.poll() is not None).communicate()[1][-2000:])
                time.sleep(0.02)
            (Path(sync) / "go").touch()
            outs: list[dict[str, Any] | None] = [None] * len(procs)
            order = [stop_after, *(i for i in range(len(procs)) if i != stop_after)] if stop_after >= 0 else []
            for i in order or range(len(procs)):
                out, err = procs[i].communicate(timeout=900)
                if procs[i].returncode != 0:
                    raise SystemExit(err[-2000:])
                outs[i] = json.loads(out.strip().splitlines()[-1])
                if i == stop_after:
                    (Path(sync) / "stop").touch()
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    return [o for o in outs if o is not None]


def pct(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` in ms (nearest rank)."""
    if not values:
        return float("nan")
    s = sorted(values)
    return round(1000 * s[min(len(s) - 1, int(q * len(s)))], 1)


def cycles(outs: list[dict[str, Any]]) -> dict[str, Any]:
    """Cycle latency and rates of managers that ran together."""
    lat = [x for o in outs for x in o["latencies"]]
    return {
        "managers": len(outs),
        "p50_ms": pct(lat, 0.5),
        "p99_ms": pct(lat, 0.99),
        "cycles_per_s": [round(len(o["latencies"]) / o["seconds"], 1) for o in outs],
        "total_per_s": round(sum(len(o["latencies"]) / o["seconds"] for o in outs), 1),
        "conflict_errors": sum(o["conflicts"] for o in outs),
        "open_s": [round(o["open_s"], 2) for o in outs],
        "rss_mib": [round(o["rss_kib"] / 1024, 1) for o in outs],
    }


def one_size(cp: Any, nodes: int, live: int, seconds: float, pods: int) -> dict[str, Any]:
    """Every measurement at ``nodes`` nodes with ``live`` live groups."""
    labels = {"computegroups-bench": uuid.uuid4().hex[:6]}
    selector = ",".join(f"{k}={v}" for k, v in labels.items())
    r: dict[str, Any] = {"nodes": nodes, "gpus": nodes * 8, "live_groups": live, "load_before": load_average()}
    r["nodes_ready_s"] = round(make_nodes(cp, nodes, labels, dra=False), 1)
    ns, kubeconfig = deploy_namespace(cp)
    fill = spawn([("fill", "f")], kubeconfig, ns, selector, str(live))[0]
    r["fill"] = {"open_s": round(fill["open_s"], 2), "seconds": round(fill["seconds"], 1)}
    r["fill"]["groups_per_s"] = round(live / fill["seconds"], 1) if live else None
    opens = [spawn([("cycle", "o")], kubeconfig, ns, selector, "0")[0] for _ in range(3)]
    r["open"] = {
        "open_s": [round(o["open_s"], 2) for o in opens],
        "open_median_s": round(statistics.median(o["open_s"] for o in opens), 2),
        "rss_mib": round(statistics.median(o["rss_kib"] for o in opens) / 1024, 1),
    }
    r["cycles"] = [
        cycles(spawn([("cycle", w) for w in "ab"[:managers]], kubeconfig, ns, selector, str(seconds)))
        for managers in (1, 2)
    ]
    write, watch = spawn([("write", "w"), ("watch", "v")], kubeconfig, ns, selector, "20", stop_after=0)
    after = [1000 * (watch["seen"][gid] - done) for gid, _, done in write["made"] if gid in watch["seen"]]
    since_call = [1000 * (watch["seen"][gid] - call) for gid, call, _ in write["made"] if gid in watch["seen"]]
    r["visibility_ms"] = {
        "samples": len(write["made"]),
        "seen": len(after),
        "after_return_p50": round(statistics.median(after), 1) if after else None,
        "after_return_max": round(max(after), 1) if after else None,
        "after_call_p50": round(statistics.median(since_call), 1) if since_call else None,
    }
    if pods:
        r["kube_scheduler"] = scheduler_binding_rate(cp, ns, pods, labels)
    r["load_after"] = load_average()
    delete_nodes(cp, labels)
    return r


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.k8s_scale")
    ap.add_argument("--nodes", default="100,1000", help="comma-separated node counts, run in turn")
    ap.add_argument("--live", type=int, default=1000, help="half-GPU groups allocated before measuring")
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each allocate+release window")
    ap.add_argument("--scheduler-pods", type=int, default=200, help="GPU pods for kube-scheduler (0: none)")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in args.nodes.split(",")]
    except ValueError:
        ap.error(f"--nodes must be comma-separated whole numbers, not {args.nodes!r}")
    if not sizes or min(sizes) < 1:
        ap.error("--nodes must be positive")
    if args.live < 0 or args.seconds <= 0 or args.scheduler_pods < 0:
        ap.error("--live and --scheduler-pods must be 0 or more, --seconds positive")
    for n in sizes:
        if args.live * 0.5 > n * 8 - 8:
            ap.error(f"--live {args.live} half-GPU groups leave no free 1-GPU slot on {n} nodes")
        if args.scheduler_pods > n * 8:
            ap.error(f"--scheduler-pods {args.scheduler_pods} exceeds the {n * 8} GPUs of {n} nodes")
    cp = start_control_plane()
    try:
        print(json.dumps({"machine": machine()}), flush=True)
        for n in sizes:
            print(json.dumps(one_size(cp, n, args.live, args.seconds, args.scheduler_pods)), flush=True)
    finally:
        cp.stop(check=False)


if __name__ == "__main__":
    main()
