"""A test Dynamo worker: records what it was given; with --register it serves a real Dynamo endpoint.

    python tests/_dynamo_worker.py --record-dir DIR --model M --disaggregation-mode prefill \
        --tensor-parallel-size 2 [--register] [--crash]

Writes DIR/<pid>.json (CUDA_VISIBLE_DEVICES, its arguments, its group, the Dynamo namespace,
component, endpoint and etcd it was told) and, on SIGTERM, DIR/<pid>.term before exiting 0, as
a real ``python3 -m dynamo.vllm`` drains and exits.

--register: starts Dynamo's own ``DistributedRuntime`` (package ai-dynamo-runtime; etcd discovery,
TCP request plane) and serves the endpoint ``{DYN_NAMESPACE}.{component}.{endpoint}`` with the
names the actuator gave it (COMPUTEGROUPS_DYNAMO_COMPONENT / _ENDPOINT); like ``dynamo.vllm``
it takes its namespace from DYN_NAMESPACE (default ``dynamo``) and etcd from ETCD_ENDPOINTS, with
nothing about them on its command line. It sets its health status to ready once it serves (for
Dynamo's system status server, when DYN_SYSTEM_PORT is given). On SIGTERM it shuts the runtime
down, which revokes its lease and so removes its registration.

--load-time S: waits S seconds before it starts its runtime and registers (as a real worker loads
its model first), so that an actuator acknowledging a worker merely for running would be caught.

--crash: exits with status 3 right after recording, before registering anything.
--crash-first N: the same for the first N starts of this command (counted in DIR/starts-<mode>),
then works normally.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any


def record(record_dir: Path, argv: list[str]) -> None:
    pid = os.getpid()
    data = {
        "pid": pid,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
        "group_id": os.environ.get("COMPUTEGROUPS_GROUP_ID", ""),
        "component": os.environ.get("COMPUTEGROUPS_COMPONENT", ""),
        "namespace": os.environ.get("DYN_NAMESPACE", "dynamo"),
        "dynamo_component": os.environ.get("COMPUTEGROUPS_DYNAMO_COMPONENT", ""),
        "dynamo_endpoint": os.environ.get("COMPUTEGROUPS_DYNAMO_ENDPOINT", ""),
        "etcd_endpoints": os.environ.get("ETCD_ENDPOINTS", ""),
        "mode": argv[argv.index("--disaggregation-mode") + 1],
        "tp": int(argv[argv.index("--tensor-parallel-size") + 1]),
        "argv": argv,
    }
    tmp = record_dir / f"{pid}.json.tmp"
    tmp.write_text(json.dumps(data))
    os.replace(tmp, record_dir / f"{pid}.json")


async def serve(record_dir: Path) -> None:
    from dynamo._core import DistributedRuntime

    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, "etcd", "tcp")
    namespace = os.environ.get("DYN_NAMESPACE", "dynamo")
    path = f"{namespace}.{os.environ['COMPUTEGROUPS_DYNAMO_COMPONENT']}.{os.environ['COMPUTEGROUPS_DYNAMO_ENDPOINT']}"
    pid = os.getpid()

    def on_term() -> None:
        (record_dir / f"{pid}.term").write_text("SIGTERM")
        runtime.shutdown()

    loop.add_signal_handler(signal.SIGTERM, on_term)

    async def generate(request: Any, context: Any = None) -> Any:
        yield {"pid": pid, "echo": request}

    endpoint = runtime.endpoint(path)
    serving = asyncio.ensure_future(endpoint.serve_endpoint(generate))
    await asyncio.sleep(0.2)
    if not serving.done():
        runtime.set_health_status(True)
    await serving


def main(argv: list[str]) -> None:
    record_dir = Path(argv[argv.index("--record-dir") + 1])
    pid = os.getpid()

    def on_term(signum: int, frame: FrameType | None) -> None:
        (record_dir / f"{pid}.term").write_text("SIGTERM")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    record(record_dir, argv)
    crash = "--crash" in argv
    if "--crash-first" in argv:
        counter = record_dir / f"starts-{argv[argv.index('--disaggregation-mode') + 1]}"
        starts = int(counter.read_text()) if counter.exists() else 0
        counter.write_text(str(starts + 1))
        crash = starts < int(argv[argv.index("--crash-first") + 1])
    if crash:
        print("worker: crashing at start-up, as asked", flush=True)
        sys.exit(3)
    if "--register" in argv:
        if "--load-time" in argv:
            time.sleep(float(argv[argv.index("--load-time") + 1]))
        asyncio.run(serve(record_dir))
        return
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    main(sys.argv[1:])
