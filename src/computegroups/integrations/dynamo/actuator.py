"""Scale Dynamo workers on compute groups from the decisions Dynamo's planner publishes in etcd.

Dynamo's planner with ``environment: virtual`` (its ``VirtualConnector``) does not
start workers itself. It writes its decision under ``v1/{namespace}/planner/``, as
three separate puts under the planner's etcd lease, in this order:
``num_prefill_workers``, ``num_decode_workers``, ``decision_id`` (plain ASCII
decimal integers; ``decision_id`` counts 0, 1, 2, ...). It then waits until
``scaled_decision_id`` (written by whoever scales, here :class:`DynamoActuator`)
is at least ``decision_id``, and drops new decisions while it is not. A restarted
planner whose keys expired with its lease starts again from ``decision_id`` 0.

The actuator converges on each decision:

* It counts its own workers: groups of component ``dynamo/<namespace>/<role>``
  running under the local runtime (circus), whose registry (``workers.json``) and
  the manager's state survive any crash.
* Scale-down first (frees GPUs): the newest worker of a role is stopped with
  SIGTERM, waited for (SIGKILL after the runtime's graceful timeout), and only
  then is its group released.
* Scale-up: a group of ``gpus`` GPUs per worker is allocated (with the role's
  constraints, e.g. NVLink) and the role's command started on it, pinned by
  ``CUDA_VISIBLE_DEVICES``.
* It acknowledges (puts ``scaled_decision_id`` under its own lease) once the
  workers run. A decision that cannot be fully met (not enough GPUs) is
  acknowledged once everything possible is done, so the planner is never
  blocked; the shortfall is logged and emitted as a manager event
  (``dynamo-shortfall``), and the actuator keeps converging toward the target
  (every ``poll_interval_s``) as capacity frees.
* A ``decision_id`` lower than the last one seen is a planner restart: logged
  (event ``dynamo-planner-restart``), then handled like any decision. When the
  planner's keys vanish (its lease ended), the actuator deletes its
  ``scaled_decision_id`` so the next planner waits for a real acknowledgement,
  and keeps the workers it has.

Changes are noticed by an etcd watch and, because a watch can miss events (a
reconnect, a compaction), by reading the keys on a timer too.

Crash safety: the runtime allocates before it starts a worker and stops a worker
before it releases its group; a manager that opens repairs what a killed process
left (see ``docs/local-runtime.md``). A restarted actuator therefore finds its
running workers, reads the current decision and converges again. It remembers the
last ``decision_id`` it saw in ``dynamo-<namespace>.json`` in the runtime folder,
and holds ``dynamo-<namespace>.lock`` there so two actuators never act on one
namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from computegroups.errors import ConflictError, InsufficientResourcesError, InvalidRequestError
from computegroups.integrations.etcd import EtcdClient, EtcdError
from computegroups.manager import Event
from computegroups.runtime.local import LocalRuntime

__all__ = [
    "DECODE",
    "PREFILL",
    "ROLES",
    "Decision",
    "DynamoActuator",
    "Outcome",
    "WorkerSpec",
    "component_name",
    "root_key",
]

log = logging.getLogger("computegroups.dynamo")

PREFILL = "prefill"
DECODE = "decode"
ROLES = (PREFILL, DECODE)
_TARGET_KEYS = {PREFILL: "num_prefill_workers", DECODE: "num_decode_workers"}


def root_key(namespace: str) -> str:
    """Where the planner of ``namespace`` writes: ``v1/{namespace}/planner/`` (as Dynamo's ``root_key``)."""
    return f"v1/{namespace}/planner/"


def component_name(namespace: str, role: str) -> str:
    """The compute-group component of a role's workers: ``dynamo/<namespace>/<role>``."""
    return f"dynamo/{namespace}/{role}"


def _parse_count(key: str, raw: str | None) -> int | None:
    if raw is None:
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        log.warning("planner key %s: %r is not a decimal integer; ignored", key, raw)
        return None
    if value < 0:
        log.warning("planner key %s: %d is negative; ignored", key, value)
        return None
    return value


@dataclass(frozen=True, slots=True)
class Decision:
    """The planner's keys as read at one etcd revision; None where a key is absent or unreadable."""

    num_prefill_workers: int | None = None
    num_decode_workers: int | None = None
    decision_id: int | None = None
    scaled_decision_id: int | None = None
    revision: int = 0

    @classmethod
    def from_values(cls, values: Mapping[str, str], revision: int = 0) -> Decision:
        """From ``{key suffix: value}``, e.g. ``{"num_prefill_workers": "2", "decision_id": "0"}``."""
        p, d, i, s = (
            _parse_count(k, values.get(k)) for k in (*_TARGET_KEYS.values(), "decision_id", "scaled_decision_id")
        )
        return cls(p, d, i, s, revision)

    def target(self, role: str) -> int | None:
        """The number of workers of ``role`` the planner wants (None: it has not said)."""
        return self.num_prefill_workers if role == PREFILL else self.num_decode_workers


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """How to run one worker of a role: GPUs per worker, the command, and placement constraints.

    ``gpus``: the planner's ``prefill_engine_num_gpu`` / ``decode_engine_num_gpu``
    (the tensor-parallel size). ``requirements`` and ``constraints`` are added to the
    allocation request (``{"gpu_model": "a6000"}``, ``{"nvlink": True}``).
    """

    gpus: int
    command: tuple[str, ...]
    requirements: Mapping[str, Any] = field(default_factory=dict)
    constraints: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise InvalidRequestError(f"gpus: {self.gpus!r} is not a whole number of GPUs >= 0", key="gpus")
        if not self.command or not all(isinstance(c, str) for c in self.command):
            raise InvalidRequestError(f"command: {self.command!r} is not a non-empty list of strings", key="command")


@dataclass(slots=True)
class Outcome:
    """What one convergence did: targets, workers running after it, and what could not be met (and why)."""

    decision_id: int | None
    targets: dict[str, int | None]
    running: dict[str, int]
    started: int = 0
    stopped: int = 0
    shortfall: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def met(self) -> bool:
        """Every target the planner gave is running."""
        return not self.shortfall


class DynamoActuator:
    """Converges the workers of one Dynamo namespace on the planner's decision (see the module docstring).

    ``runtime``: a :class:`LocalRuntime` whose manager is open. ``specs``: the
    :class:`WorkerSpec` of ``"prefill"`` and ``"decode"`` (a role without a spec is
    never scaled). ``env``: the workers' base environment (default: this process's).
    """

    def __init__(
        self,
        runtime: LocalRuntime,
        etcd: EtcdClient | None,
        namespace: str,
        specs: Mapping[str, WorkerSpec],
        *,
        poll_interval_s: float = 5.0,
        lease_ttl_s: int = 10,
        settle_s: float = 0.3,
        env: Mapping[str, str] | None = None,
    ) -> None:
        unknown = sorted(set(specs) - set(ROLES))
        if unknown:
            raise InvalidRequestError(f"specs: {unknown[0]!r} is not one of prefill, decode", key="specs")
        self.runtime = runtime
        self.manager = runtime.manager
        self.etcd = etcd
        self.namespace = namespace
        self.specs = dict(specs)
        self.root = root_key(namespace)
        self.poll_interval_s = poll_interval_s
        self.lease_ttl_s = lease_ttl_s
        self.settle_s = settle_s
        self.env = dict(os.environ if env is None else env)
        self.last_outcome: Outcome | None = None
        self._lease = 0
        self._reported: tuple[Any, ...] | None = None
        self._lock_fd: int | None = None
        self._state_file = runtime.dir / f"dynamo-{namespace.replace('/', '_')}.json"
        self._last_seen: int | None = self._load_state().get("decision_id")

    # -- persisted memory ------------------------------------------------------------------
    def _load_state(self) -> dict[str, Any]:
        try:
            data = json.loads(self._state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save_state(self, **values: Any) -> None:
        data = {**self._load_state(), **values, "updated_at": time.time()}
        self._state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._state_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, sort_keys=True))
        os.replace(tmp, self._state_file)

    def acquire(self) -> None:
        """Hold this namespace's actuator lock (ConflictError if another actuator holds it)."""
        if self._lock_fd is not None:
            return
        self.runtime.daemon._prepare_dir()
        path = self.runtime.dir / f"dynamo-{self.namespace.replace('/', '_')}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConflictError(f"namespace {self.namespace!r}: another actuator holds {path}; stop it first") from None
        self._lock_fd = fd

    def release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- reading ---------------------------------------------------------------------------
    def component(self, role: str) -> str:
        return component_name(self.namespace, role)

    async def read_decision(self) -> Decision:
        """The planner's keys, read in one range request (so a decision_id comes with its counts)."""
        assert self.etcd is not None
        kvs, revision = await self.etcd.aget_prefix(self.root)
        values = {k.removeprefix(self.root): kv.value for k, kv in kvs.items()}
        return Decision.from_values(values, revision)

    async def workers(self, role: str) -> list[dict[str, Any]]:
        """The running workers of ``role``, oldest first (``LocalRuntime.ps`` rows; exits noticed first)."""
        comp = self.component(role)
        rows = [r for r in await self.runtime.ps() if r["component"] == comp and r["state"] == "running"]
        return sorted(rows, key=lambda r: (r["started_at"], r["group_id"]))

    async def counts(self) -> dict[str, int]:
        """Running workers per role."""
        rows = await self.runtime.ps()
        return {
            role: sum(1 for r in rows if r["component"] == self.component(role) and r["state"] == "running")
            for role in ROLES
        }

    # -- converging ------------------------------------------------------------------------
    async def converge(self, targets: Mapping[str, int | None], decision_id: int | None = None) -> Outcome:
        """Start or stop workers until each role's count is its target (None: leave the role alone).

        Scale-down first, newest worker first; then scale-up until the targets are met or
        no more groups can be allocated. Returns what was done and any shortfall.
        """
        outcome = Outcome(decision_id, dict(targets), {})
        for _round in range(3):
            for role in ROLES:
                target = targets.get(role)
                if target is None or role not in self.specs:
                    continue
                running = await self.workers(role)
                for row in reversed(running[target:]):
                    log.info(
                        "%s: stopping worker %s (%d running, %d wanted)",
                        self.component(role),
                        row["group_id"],
                        len(running),
                        target,
                    )
                    await self.runtime.stop(row["group_id"])
                    outcome.stopped += 1
            outcome.shortfall.clear()
            outcome.reasons.clear()
            for role in ROLES:
                target = targets.get(role)
                if target is None or role not in self.specs:
                    continue
                have = len(await self.workers(role))
                while have < target:
                    try:
                        await self._start(role)
                    except InsufficientResourcesError as exc:
                        outcome.shortfall[role] = target - have
                        outcome.reasons[role] = str(exc)
                        break
                    have += 1
                    outcome.started += 1
            if outcome.started and self.settle_s > 0:
                await asyncio.sleep(self.settle_s)  # a worker that dies at once is noticed before the ack
            counts = await self.counts()
            if all(
                targets.get(r) is None
                or r not in self.specs
                or counts[r] >= (targets[r] or 0) - outcome.shortfall.get(r, 0)
                for r in ROLES
            ):
                break
        outcome.running = await self.counts()
        for role in ROLES:
            target = targets.get(role)
            if target is not None and role in self.specs and outcome.running[role] < target:
                outcome.shortfall[role] = target - outcome.running[role]
                outcome.reasons.setdefault(role, "workers exited right after they started")
        self._report(outcome)
        self.last_outcome = outcome
        return outcome

    async def _start(self, role: str) -> None:
        spec = self.specs[role]
        req: dict[str, Any] = {"gpus": spec.gpus, **spec.requirements}
        cons: dict[str, Any] = {**spec.constraints, "request_id": f"{self.component(role)}/{uuid.uuid4().hex[:12]}"}
        env = {**self.env, "COMPUTEGROUPS_DYNAMO_NAMESPACE": self.namespace, "COMPUTEGROUPS_DYNAMO_ROLE": role}
        group, worker = await self.runtime.run(self.component(role), req, list(spec.command), cons, env=env)
        log.info(
            "%s: started worker on %s (GPUs %s), pids %s",
            self.component(role),
            group.id,
            group.resources["gpu_indices"],
            worker.pids,
        )

    def _report(self, outcome: Outcome) -> None:
        key = (outcome.decision_id, tuple(sorted(outcome.shortfall.items())))
        if not outcome.shortfall:
            if self._reported is not None and self._reported[1]:
                log.info(
                    "dynamo %s: decision %s now fully met: %s", self.namespace, outcome.decision_id, outcome.running
                )
                self.manager.emit(
                    Event(
                        "dynamo-converged",
                        None,
                        None,
                        None,
                        f"namespace {self.namespace}: decision {outcome.decision_id} met",
                    )
                )
            self._reported = key
            return
        if key == self._reported:
            return
        self._reported = key
        for role, missing in sorted(outcome.shortfall.items()):
            detail = (
                f"namespace {self.namespace}: decision {outcome.decision_id} wants {outcome.targets[role]} {role} "
                f"worker(s) of {self.specs[role].gpus} GPU(s); {outcome.running[role]} running, {missing} short: "
                f"{outcome.reasons.get(role, '')}; will keep trying as capacity frees"
            )
            log.warning("shortfall: %s", detail)
            self.manager.emit(Event("dynamo-shortfall", None, None, self.component(role), detail))

    # -- one round: read, converge, acknowledge --------------------------------------------------
    async def step(self) -> Outcome | None:
        """Read the decision, converge on it and acknowledge it; None when the planner has not decided yet."""
        assert self.etcd is not None
        decision = await self.read_decision()
        if decision.decision_id is None:
            if decision.scaled_decision_id is not None:
                # The planner's keys ended with its lease: let the next planner wait for a real ack.
                log.info("dynamo %s: planner keys are gone; withdrawing scaled_decision_id", self.namespace)
                await self.etcd.adelete(self.root + "scaled_decision_id")
            # No decision yet, or the planner's first one is being written (decision_id comes last).
            return None
        elif self._last_seen is not None and decision.decision_id < self._last_seen:
            detail = f"namespace {self.namespace}: decision_id went from {self._last_seen} to {decision.decision_id}"
            log.warning("planner restart: %s", detail)
            self.manager.emit(Event("dynamo-planner-restart", None, None, None, detail))
        if decision.decision_id is not None and decision.decision_id != self._last_seen:
            self._last_seen = decision.decision_id
            self._save_state(decision_id=decision.decision_id)
        targets = {role: decision.target(role) for role in ROLES}
        outcome = await self.converge(targets, decision.decision_id)
        if decision.decision_id is not None and decision.scaled_decision_id != decision.decision_id:
            await self._acknowledge(decision.decision_id)
            self._save_state(acknowledged=decision.decision_id)
        return outcome

    async def _acknowledge(self, decision_id: int) -> None:
        assert self.etcd is not None
        if not self._lease:
            self._lease = await self.etcd.alease_grant(self.lease_ttl_s)
        await self.etcd.aput(self.root + "scaled_decision_id", str(decision_id), lease=self._lease)
        log.info("dynamo %s: acknowledged decision %d", self.namespace, decision_id)

    # -- running -----------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Converge until ``stop`` is set: on every change under the planner's keys, and every poll interval."""
        assert self.etcd is not None
        self.acquire()
        stop = stop or asyncio.Event()
        wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        watcher = _Watcher(self.etcd, self.root, lambda: loop.call_soon_threadsafe(wake.set))
        keepalive = loop.create_task(self._keepalive(stop))
        watcher.start()
        log.info("dynamo %s: watching %s on %s", self.namespace, self.root, self.etcd.url)
        try:
            while not stop.is_set():
                wake.clear()
                try:
                    await self.step()
                except EtcdError as exc:
                    log.warning("dynamo %s: %s; retrying", self.namespace, exc)
                waiter = loop.create_task(wake.wait())
                stopper = loop.create_task(stop.wait())
                await asyncio.wait({waiter, stopper}, timeout=self.poll_interval_s, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                stopper.cancel()
        finally:
            watcher.stop()
            keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keepalive
            # The lease is left to expire (not revoked): an actuator restarted within its TTL
            # finds its acknowledgement still there, and the planner is not held up meanwhile.
            self.release_lock()

    async def _keepalive(self, stop: asyncio.Event) -> None:
        assert self.etcd is not None
        while not stop.is_set():
            await asyncio.sleep(max(0.5, self.lease_ttl_s / 3))
            if not self._lease:
                continue
            try:
                ttl = await self.etcd.alease_keepalive(self._lease)
            except EtcdError as exc:
                log.warning("dynamo %s: lease keepalive: %s", self.namespace, exc)
                continue
            if ttl <= 0:
                log.warning(
                    "dynamo %s: lease %x expired; the next round acknowledges again", self.namespace, self._lease
                )
                self._lease = 0


class _Watcher:
    """A thread that holds an etcd watch on the planner's keys and calls ``notify`` on each change."""

    def __init__(self, etcd: EtcdClient, prefix: str, notify: Any) -> None:
        self._etcd = etcd
        self._prefix = prefix
        self._notify = notify
        self._stop = threading.Event()
        self._watch: Any = None
        self._thread = threading.Thread(target=self._run, name="dynamo-etcd-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watch is not None:
            self._watch.close()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        revision = 0
        while not self._stop.is_set():
            try:
                _, revision = self._etcd.get_prefix(self._prefix)
                self._watch = self._etcd.watch_prefix(self._prefix, revision + 1)
                self._notify()  # something may have changed while no watch was open
                for _event in self._watch:
                    self._notify()
            except EtcdError as exc:
                log.debug("watch %s: %s", self._prefix, exc)
            self._stop.wait(1.0)


def parse_specs(
    prefill_gpus: int,
    prefill_cmd: Sequence[str] | None,
    decode_gpus: int,
    decode_cmd: Sequence[str] | None,
    requirements: Mapping[str, Any] | None = None,
    constraints: Mapping[str, Any] | None = None,
) -> dict[str, WorkerSpec]:
    """The worker specs of the roles that have a command."""
    specs: dict[str, WorkerSpec] = {}
    for role, gpus, cmd in ((PREFILL, prefill_gpus, prefill_cmd), (DECODE, decode_gpus, decode_cmd)):
        if cmd:
            specs[role] = WorkerSpec(gpus, tuple(cmd), dict(requirements or {}), dict(constraints or {}))
    return specs
