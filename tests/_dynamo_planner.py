"""A stand-in for Dynamo's planner with ``environment: virtual``: writes its decisions to etcd as Dynamo does.

As ``VirtualConnectorCoordinator.update_scaling_decision`` (dynamo ``lib/bindings/python/rust/planner.rs``):
three separate puts under the planner's own lease (TTL 10 s, kept alive), in the order
``num_prefill_workers``, ``num_decode_workers``, ``decision_id`` (0, 1, 2, ...), plain decimal
ASCII under ``v1/{namespace}/planner/``; a decision counts as done when ``scaled_decision_id``
is at least ``decision_id``. Dynamo drops a new decision while the last is unacknowledged; this
stand-in waits for the acknowledgement instead, so a test's decisions all reach the actuator.
``stop()`` revokes the lease (its keys vanish), so a new instance starts from ``decision_id`` 0.
"""

from __future__ import annotations

import contextlib
import threading
import time

from computegroups.integrations.etcd import EtcdClient, EtcdError


class StandInPlanner:
    def __init__(self, etcd: EtcdClient, namespace: str, ttl_s: int = 10) -> None:
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

    def is_ready(self) -> bool:
        scaled = self.scaled()
        return self.decision_id < 0 or (scaled is not None and scaled >= self.decision_id)

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Wait until the last decision is acknowledged; returns the seconds it took."""
        t0 = time.monotonic()
        while not self.is_ready():
            if time.monotonic() - t0 > timeout_s:
                raise AssertionError(f"decision {self.decision_id} not acknowledged after {timeout_s}s")
            time.sleep(0.05)
        return time.monotonic() - t0

    def decide(self, num_prefill: int, num_decode: int, *, wait: bool = True) -> int:
        self.wait_ready()
        self.etcd.put(self.root + "num_prefill_workers", str(num_prefill), lease=self.lease)
        self.etcd.put(self.root + "num_decode_workers", str(num_decode), lease=self.lease)
        self.decision_id += 1
        self.etcd.put(self.root + "decision_id", str(self.decision_id), lease=self.lease)
        if wait:
            self.wait_ready()
        return self.decision_id

    def stop(self) -> None:
        self._stop.set()
        self.etcd.lease_revoke(self.lease)
