"""Allocate+release throughput of 1 and 2 managers on the real test control plane (not a test).

``python -m bench.k8s_commits [--seconds 15] [--src DIR ...]``: starts the control plane of
``tests/k8s`` (etcd, kube-apiserver, kube-scheduler, kwok; binaries from scripts/k8s-testenv/build),
one 8-GPU KWOK node per run, and runs managers in separate processes, each a loop of
``allocate_compute_group(gpus=1)`` then ``deallocate_compute_group``. Prints, per run, the cycles
per second of each manager and in all, the API requests per cycle of the state store, and the
ConflictErrors. ``--src DIR`` runs the managers with ``PYTHONPATH=DIR`` (another checkout's
``src``), interleaved with this one, for a before/after in one sitting.
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

REPO = Path(__file__).resolve().parents[1]

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


def run(cp: Any, kubeconfig: Path, namespace: str, managers: int, seconds: float, src: str | None) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:6]
    cp.make_gpu_node(f"bench-{tag}", labels={"computegroups-bench": tag})
    env = dict(os.environ)
    if src:
        env["PYTHONPATH"] = src
    with tempfile.TemporaryDirectory() as sync:
        procs = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    WORKER,
                    str(kubeconfig),
                    namespace,
                    f"computegroups-bench={tag}",
                    w,
                    sync,
                    str(seconds),
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
        (Path(sync) / "go").touch()
        outs = []
        for p in procs:
            out, err = p.communicate(timeout=seconds + 120)
            if p.returncode != 0:
                raise SystemExit(err[-2000:])
            outs.append(json.loads(out.strip().splitlines()[-1]))
    total = sum(o["cycles"] for o in outs)
    per_cycle = {}
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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.k8s_commits")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--src", action="append", default=[], help="also run with PYTHONPATH=SRC (interleaved)")
    args = ap.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from tests.k8s.harness import ControlPlane, find_binaries
    from tests.k8s.test_provider_kubernetes import deploy

    cp = ControlPlane.start(find_binaries(build=False))
    try:
        results = []
        for managers in (1, 2):
            for src in [None, *args.src]:
                ns = f"b-{uuid.uuid4().hex[:6]}"
                cp.ensure_namespace(ns)
                r = run(cp, deploy(cp, ns), ns, managers, args.seconds, src)
                print(json.dumps(r), flush=True)
                results.append(r)
    finally:
        cp.stop(check=False)


if __name__ == "__main__":
    main()
