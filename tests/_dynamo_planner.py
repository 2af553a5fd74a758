"""Dynamo's planner side, for the tests: its real coordinator in a process of its own, and a record writer.

:class:`RealPlanner` runs this file as a program: Dynamo's own ``VirtualConnectorCoordinator``
(package ai-dynamo-runtime, the Rust core of Dynamo's ``VirtualConnector``) on a real
``DistributedRuntime`` over etcd, driven by one JSON command per line on stdin:

* ``decide``: ``update_scaling_decision(prefill, decode)``; answers ``read_state()``;
* ``ready``: ``is_scaling_ready()``, i.e. whether ``scaled_decision_id`` >= ``decision_id``;
* ``counts``: the workers the planner sees, as Dynamo's planner counts them in the virtual
  environment: ``len(client.instance_ids())`` of a client of ``{namespace}.{component}.{endpoint}``;
* ``stop``: ``DistributedRuntime.shutdown()``, which revokes the planner's lease (its keys vanish),
  as when the planner stops.

Answers are lines starting with ``@@ `` on stdout (Dynamo logs on stderr).

:class:`RecordPlanner` writes Dynamo's next decision format, one JSON record at
``v1/{namespace}/planner/scaling_decision`` under a kept-alive lease (Dynamo 1.6.1 has no writer for it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from computegroups.integrations.etcd import EtcdClient, EtcdError

#: Servers of Dynamo's runtime on the loopback interface only.
LOOPBACK = {
    "DYN_TCP_RPC_HOST": "127.0.0.1",
    "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
    "DYN_HTTP_RPC_HOST": "127.0.0.1",
    "DYN_EVENT_PLANE_HOST": "127.0.0.1",
    "DYN_SYSTEM_HOST": "127.0.0.1",
    "DYN_SYSTEM_PORT": "-1",
    "DYN_LOG": "warn",
}


class RealPlanner:
    """Dynamo's real coordinator in a child process (see the module docstring)."""

    def __init__(
        self,
        etcd_url: str,
        namespace: str,
        log: Path,
        *,
        components: tuple[str, str] = ("prefill", "backend"),
        endpoint: str = "generate",
    ) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DYN_")}
        env.update(LOOPBACK)
        env["ETCD_ENDPOINTS"] = etcd_url
        self._log: IO[bytes] = open(log, "ab")  # noqa: SIM115 - closed in stop()/kill()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--namespace", namespace, "--components", *components, "--endpoint", endpoint],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
        )
        started = self._answer(60)
        assert started.get("started"), started

    def _answer(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self._read_line()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        if not box:
            raise AssertionError(f"the planner did not answer within {timeout_s}s")
        if not box[0]:
            raise AssertionError(f"the planner exited ({self.proc.poll()})")
        answer: dict[str, Any] = json.loads(box[0])
        if "error" in answer:
            raise AssertionError(f"planner: {answer['error']}")
        return answer

    def _read_line(self) -> str:
        assert self.proc.stdout is not None
        while True:
            line = self.proc.stdout.readline()
            if not line:
                return ""
            if line.startswith("@@ "):
                return line[3:]

    def call(self, op: str, timeout_s: float = 60, **args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._answer(timeout_s)

    def decide(self, num_prefill: int | None, num_decode: int | None) -> int:
        """One decision; returns its ``decision_id`` (the coordinator drops it while the last is unacknowledged)."""
        return int(self.call("decide", prefill=num_prefill, decode=num_decode)["decision_id"])

    def state(self) -> dict[str, int]:
        return {k: int(v) for k, v in self.call("state").items()}

    def is_ready(self) -> bool:
        return bool(self.call("ready")["ready"])

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll ``is_scaling_ready()`` until it is true."""
        deadline = time.monotonic() + timeout_s
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"is_scaling_ready() still false after {timeout_s}s")
            time.sleep(0.05)

    def counts(self) -> tuple[int, int]:
        """(prefill, decode) workers as the planner's discovery clients see them."""
        answer = self.call("counts")
        return int(answer["prefill"]), int(answer["decode"])

    def stop(self) -> None:
        """Stop as a planner does: the runtime shuts down and its lease (with the decision keys) is revoked."""
        if self.proc.poll() is None:
            with contextlib.suppress(AssertionError, BrokenPipeError, OSError):
                self.call("stop", timeout_s=30)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


class RecordPlanner:
    """Writes decisions as Dynamo's next format does: one JSON record, ``scaling_decision``, under a lease."""

    def __init__(self, etcd: EtcdClient, namespace: str, ttl_s: int = 30) -> None:
        self.etcd = etcd
        self.root = f"v1/{namespace}/planner/"
        self.lease = etcd.lease_grant(ttl_s)
        self.decision_id = -1
        self._stop = threading.Event()
        self._keepalive = threading.Thread(target=self._keep, args=(ttl_s,), daemon=True)
        self._keepalive.start()

    def _keep(self, ttl_s: int) -> None:
        while not self._stop.wait(ttl_s / 3):
            with contextlib.suppress(EtcdError):
                self.etcd.lease_keepalive(self.lease)

    def scaled(self) -> int | None:
        raw = self.etcd.get(self.root + "scaled_decision_id")
        return int(raw) if raw is not None else None

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.decision_id >= 0 and (self.scaled() if self.scaled() is not None else -1) < self.decision_id:
            if time.monotonic() > deadline:
                raise AssertionError(f"decision {self.decision_id} not acknowledged after {timeout_s}s")
            time.sleep(0.05)

    def decide(self, num_prefill: int | None, num_decode: int | None) -> int:
        self.decision_id += 1
        record = {"num_prefill_workers": num_prefill, "num_decode_workers": num_decode, "decision_id": self.decision_id}
        self.put_raw(json.dumps(record))
        return self.decision_id

    def put_raw(self, value: str) -> None:
        self.etcd.put(self.root + "scaling_decision", value, lease=self.lease)

    def stop(self) -> None:
        self._stop.set()
        self.etcd.lease_revoke(self.lease)


# -- the child process ---------------------------------------------------------------------------
async def _serve(namespace: str, components: tuple[str, str], endpoint: str) -> None:
    from dynamo._core import DistributedRuntime, VirtualConnectorCoordinator

    loop = asyncio.get_running_loop()
    runtime = DistributedRuntime(loop, "etcd", "tcp")
    # Dynamo's VirtualConnector passes SCALING_CHECK_INTERVAL, SCALING_MAX_WAIT_TIME and their quotient.
    coordinator = VirtualConnectorCoordinator(runtime, namespace, 1, 1800, 1800)
    await coordinator.async_init()
    clients = {
        role: await runtime.endpoint(f"{namespace}.{component}.{endpoint}").client()
        for role, component in zip(("prefill", "decode"), components, strict=True)
    }

    def say(data: Mapping[str, Any]) -> None:
        sys.stdout.write("@@ " + json.dumps(data) + "\n")
        sys.stdout.flush()

    def state() -> dict[str, int]:
        s = coordinator.read_state()
        return {"prefill": s.num_prefill_workers, "decode": s.num_decode_workers, "decision_id": s.decision_id}

    say({"started": True, **state()})
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        try:
            cmd = json.loads(line)
            op = cmd["op"]
            if op == "decide":
                await coordinator.update_scaling_decision(cmd.get("prefill"), cmd.get("decode"))
                say(state())
            elif op == "state":
                say(state())
            elif op == "ready":
                say({"ready": bool(await coordinator.is_scaling_ready())})
            elif op == "counts":
                say({role: len(client.instance_ids()) for role, client in clients.items()})
            elif op == "stop":
                say({"stopped": True})
                break
            else:
                say({"error": f"unknown op {op!r}"})
        except Exception as exc:  # answer, and keep serving
            say({"error": f"{type(exc).__name__}: {exc}"})
    runtime.shutdown()
    await asyncio.sleep(0.5)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--namespace", required=True)
    parser.add_argument("--components", nargs=2, default=["prefill", "backend"])
    parser.add_argument("--endpoint", default="generate")
    args = parser.parse_args()
    asyncio.run(_serve(args.namespace, tuple(args.components), args.endpoint))


if __name__ == "__main__":
    main()
