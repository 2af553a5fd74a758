"""Scale Dynamo workers on compute groups from the decisions Dynamo's planner publishes in etcd.

Dynamo's planner with ``environment: virtual`` does not start workers itself. Its
``VirtualConnectorCoordinator`` (Dynamo 1.6.1) writes the decision under
``v1/{namespace}/planner/`` under the planner's etcd lease (TTL 30 s, kept alive while
the planner runs), in one transaction: ``num_prefill_workers``, ``num_decode_workers``
and ``decision_id`` (plain ASCII decimal integers; ``decision_id`` counts 0, 1, 2, ...;
a role's key, once set, is written again with every decision). Dynamo's next format
puts the same three numbers in one JSON record, ``v1/{namespace}/planner/scaling_decision``,
which is authoritative when present (the three keys are then only a fallback). Either
way the planner waits until ``scaled_decision_id`` (written by whoever scales, here
:class:`DynamoActuator`; a decimal integer for both formats) is at least
``decision_id``, and drops new decisions while it is not. A planner whose lease ended
starts again from ``decision_id`` 0.

The actuator converges on each decision:

* It counts its own workers: groups of component ``dynamo/<namespace>/<role>``
  running under the local runtime (circus), whose registry (``workers.json``) and
  the manager's state survive any crash.
* Scale-down first (frees GPUs): the newest worker of a role is stopped with
  SIGTERM, waited for (SIGKILL after the runtime's graceful timeout), and only
  then is its group released.
* Scale-up: a group of ``gpus`` GPUs per worker is allocated (with the role's
  constraints, e.g. NVLink) and the role's command started on it, pinned by
  ``CUDA_VISIBLE_DEVICES``, with what a Dynamo worker needs to join the planner's
  namespace: ``DYN_NAMESPACE``, ``ETCD_ENDPOINTS`` and the role's Dynamo component
  and endpoint names (``COMPUTEGROUPS_DYNAMO_COMPONENT`` / ``_ENDPOINT``).
* It waits until the workers are ready (:mod:`.readiness`: by default, registered
  in Dynamo's discovery in etcd, where the planner counts them; or healthy over
  HTTP; or running for a settle time), and until workers it stopped have left
  discovery. A worker that exits before it is ready is replaced after a backoff
  (1 s, 2 s, 4 s, ...); after ``max_start_failures`` failures the role counts as
  short.
* It acknowledges (puts ``scaled_decision_id`` under its own lease). A decision
  that cannot be fully met (not enough GPUs, workers that keep failing, workers
  not ready within ``ready_timeout_s``) is acknowledged once everything possible
  is done, so the planner is never blocked; the shortfall is logged and emitted
  as a manager event (``dynamo-shortfall``), and the actuator keeps converging
  toward the target (every ``poll_interval_s``; a failing role is retried with a
  growing backoff, up to ``retry_backoff_max_s``) as capacity frees.
* A ``decision_id`` lower than the last one seen is a planner restart: logged
  (event ``dynamo-planner-restart``), then handled like any decision. When the
  planner's keys vanish because the planner stopped (its lease revoked), the
  actuator deletes its ``scaled_decision_id`` so the next planner waits for a real
  acknowledgement; when they ran out with the lease of a planner that died, it keeps
  it, for a planner restarted meanwhile goes on counting from the old
  ``decision_id``. Either way it keeps the workers it has.

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
import dataclasses
import fcntl
import json
import logging
import os
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from computegroups.errors import ConflictError, InsufficientResourcesError, InvalidRequestError
from computegroups.integrations.dynamo.readiness import (
    DiscoveryReadiness,
    HealthReadiness,
    Readiness,
    SettleReadiness,
    WorkerRef,
    free_port,
)
from computegroups.integrations.etcd import EtcdClient, EtcdError
from computegroups.manager import Event
from computegroups.retry import backoff_s
from computegroups.runtime.local import LocalRuntime
from computegroups.tasks import stop_task

__all__ = [
    "DECODE",
    "DEFAULT_DYNAMO_COMPONENTS",
    "DEFAULT_DYNAMO_ENDPOINT",
    "DYNAMO_NAME",
    "PREFILL",
    "ROLES",
    "SCALING_DECISION_KEY",
    "Decision",
    "DynamoActuator",
    "Outcome",
    "WorkerSpec",
    "check_name",
    "component_name",
    "root_key",
]

log = logging.getLogger("computegroups.dynamo")

PREFILL = "prefill"
DECODE = "decode"
ROLES = (PREFILL, DECODE)
_TARGET_KEYS = {PREFILL: "num_prefill_workers", DECODE: "num_decode_workers"}
#: The JSON record of Dynamo's next decision format, under the planner's root key.
SCALING_DECISION_KEY = "scaling_decision"
#: Dynamo's component names of vLLM's prefill and decode workers (``dynamo.vllm``).
DEFAULT_DYNAMO_COMPONENTS = {PREFILL: "prefill", DECODE: "backend"}
#: The endpoint Dynamo's LLM workers serve.
DEFAULT_DYNAMO_ENDPOINT = "generate"
#: One part of a Dynamo path ``namespace.component.endpoint``.
DYNAMO_NAME = re.compile(r"^[A-Za-z0-9_-]+$")


def root_key(namespace: str) -> str:
    """Where the planner of ``namespace`` writes: ``v1/{namespace}/planner/`` (as Dynamo's ``root_key``)."""
    return f"v1/{namespace}/planner/"


def component_name(namespace: str, role: str) -> str:
    """The compute-group component of a role's workers: ``dynamo/<namespace>/<role>``."""
    return f"dynamo/{namespace}/{role}"


def check_name(what: str, value: str) -> str:
    """``value`` if it can be one part of a Dynamo path ``namespace.component.endpoint``; else InvalidRequestError."""
    if not isinstance(value, str) or not DYNAMO_NAME.match(value):
        raise InvalidRequestError(
            f"{what}: {value!r} is not a Dynamo name (letters, digits, '-' and '_' only)", key=what.replace(" ", "_")
        )
    return value


def _parse_count(key: str, raw: Any) -> int | None:
    if raw is None:
        return None
    if isinstance(raw, (bool, float)):
        log.warning("planner key %s: %r is not a decimal integer; ignored", key, raw)
        return None
    try:
        value = int(raw.strip()) if isinstance(raw, str) else int(raw)
    except (TypeError, ValueError):
        log.warning("planner key %s: %r is not a decimal integer; ignored", key, raw)
        return None
    if value < 0:
        if value != -1:  # -1 is Dynamo's "not set"
            log.warning("planner key %s: %d is negative; ignored", key, value)
        return None
    return value


@dataclass(frozen=True, slots=True)
class Decision:
    """The planner's decision as read at one etcd revision; None where a value is absent or unreadable.

    ``source``: ``"keys"`` (the three keys of Dynamo 1.6.1) or ``"record"`` (the JSON record
    ``scaling_decision``). ``error``: why a record present could not be read (it is then
    not carried out, and the three keys are not read instead). ``lease``: the planner's
    lease the decision was written under (0: none, or not known).
    """

    num_prefill_workers: int | None = None
    num_decode_workers: int | None = None
    decision_id: int | None = None
    scaled_decision_id: int | None = None
    revision: int = 0
    source: str = "keys"
    error: str | None = None
    lease: int = 0

    @classmethod
    def from_values(cls, values: Mapping[str, str], revision: int = 0) -> Decision:
        """From ``{key suffix: value}``, e.g. ``{"num_prefill_workers": "2", "decision_id": "0"}``.

        A ``scaling_decision`` record, when present, is authoritative: the three keys are
        read only without it.
        """
        scaled = _parse_count("scaled_decision_id", values.get("scaled_decision_id"))
        record = values.get(SCALING_DECISION_KEY)
        if record is not None:
            try:
                data = json.loads(record)
            except ValueError:
                data = None
            if not isinstance(data, dict):
                error = f"{SCALING_DECISION_KEY}: {record[:200]!r} is not a JSON object"
                return cls(None, None, None, scaled, revision, "record", error)
            p, d, i = (_parse_count(k, data.get(k)) for k in (*_TARGET_KEYS.values(), "decision_id"))
            return cls(p, d, i, scaled, revision, "record")
        p, d, i = (_parse_count(k, values.get(k)) for k in (*_TARGET_KEYS.values(), "decision_id"))
        return cls(p, d, i, scaled, revision)

    def target(self, role: str) -> int | None:
        """The number of workers of ``role`` the planner wants (None: it has not said)."""
        return self.num_prefill_workers if role == PREFILL else self.num_decode_workers


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """How to run one worker of a role: GPUs per worker, the command, and placement constraints.

    ``gpus``: the planner's ``prefill_engine_num_gpu`` / ``decode_engine_num_gpu``
    (the tensor-parallel size). ``requirements`` and ``constraints`` are added to the
    allocation request (``{"gpu_model": "a6000"}``, ``{"nvlink": True}``).
    ``dynamo_component`` / ``dynamo_endpoint``: where the worker registers in Dynamo's
    discovery (default: vLLM's names, ``prefill`` / ``backend`` and ``generate``); the
    worker is told them, and readiness and the planner look there.
    """

    gpus: int
    command: tuple[str, ...]
    requirements: Mapping[str, Any] = field(default_factory=dict)
    constraints: Mapping[str, Any] = field(default_factory=dict)
    dynamo_component: str | None = None
    dynamo_endpoint: str = DEFAULT_DYNAMO_ENDPOINT

    def __post_init__(self) -> None:
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise InvalidRequestError(f"gpus: {self.gpus!r} is not a whole number of GPUs >= 0", key="gpus")
        if not self.command or not all(isinstance(c, str) for c in self.command):
            raise InvalidRequestError(f"command: {self.command!r} is not a non-empty list of strings", key="command")
        if self.dynamo_component is not None:
            check_name("dynamo component", self.dynamo_component)
        check_name("dynamo endpoint", self.dynamo_endpoint)


@dataclass(slots=True)
class Outcome:
    """What one convergence did: targets, workers running and ready after it, and what could not be met (and why)."""

    decision_id: int | None
    targets: dict[str, int | None]
    running: dict[str, int]
    started: int = 0
    stopped: int = 0
    shortfall: dict[str, int] = field(default_factory=dict)
    reasons: dict[str, str] = field(default_factory=dict)
    ready: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    superseded: bool = False

    @property
    def met(self) -> bool:
        """Every target the planner gave is running and ready."""
        return not self.shortfall


def _last_line(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 4096))
            lines = [ln for ln in fh.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1].strip()[:300] if lines else ""


class DynamoActuator:
    """Converges the workers of one Dynamo namespace on the planner's decision (see the module docstring).

    ``runtime``: a :class:`LocalRuntime` whose manager is open. ``specs``: the
    :class:`WorkerSpec` of ``"prefill"`` and ``"decode"`` (a role without a spec is
    never scaled). ``env``: the workers' base environment (default: this process's).
    ``readiness``: when a worker counts as ready (default: registered in Dynamo's
    discovery when there is an etcd, else running for ``settle_s``).
    ``etcd_endpoints``: what the workers get as ``ETCD_ENDPOINTS`` (default: the
    client's URL).
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
        readiness: Readiness | None = None,
        ready_timeout_s: float = 900.0,
        max_start_failures: int = 3,
        retry_backoff_s: float = 1.0,
        retry_backoff_max_s: float = 60.0,
        deregister_timeout_s: float = 40.0,
        ready_poll_s: float = 0.25,
        etcd_endpoints: str | None = None,
    ) -> None:
        unknown = sorted(set(specs) - set(ROLES))
        if unknown:
            raise InvalidRequestError(f"specs: {unknown[0]!r} is not one of prefill, decode", key="specs")
        check_name("namespace", namespace)
        if max_start_failures < 1:
            raise InvalidRequestError(f"max start failures: {max_start_failures} is less than 1", key="max_failures")
        for what, value in (("ready timeout", ready_timeout_s), ("retry backoff", retry_backoff_s)):
            if value < 0:
                raise InvalidRequestError(f"{what}: {value} is negative", key=what.replace(" ", "_"))
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
        self.readiness: Readiness = readiness or (
            DiscoveryReadiness(etcd) if etcd is not None else SettleReadiness(settle_s)
        )
        self.ready_timeout_s = ready_timeout_s
        self.max_start_failures = max_start_failures
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.deregister_timeout_s = deregister_timeout_s
        self.ready_poll_s = ready_poll_s
        self.etcd_endpoints = etcd_endpoints or (etcd.url if etcd is not None else None)
        self.last_outcome: Outcome | None = None
        #: the last outcome not superseded by a newer decision: what the metrics show
        self.last_settled: Outcome | None = None
        #: decisions by outcome: ``met`` or ``short`` when acknowledged, ``superseded`` when a newer one came
        self.decisions: Counter[str] = Counter()
        self._lease = 0
        self._reported: tuple[Any, ...] | None = None
        self._lock_fd: int | None = None
        self._failures: dict[str, int] = {role: 0 for role in ROLES}
        self._next_start: dict[str, float] = {role: 0.0 for role in ROLES}
        self._failure_reason: dict[str, str] = {}
        # (lease, seconds left, when seen) of the planner's decision; whether its keys have gone since.
        self._planner_lease: tuple[int, int, float] | None = None
        self._state_file = runtime.dir / f"dynamo-{namespace}.json"
        self._last_seen: int | None = self._load_state().get("decision_id")
        self._keys_gone = bool(self._load_state().get("keys_gone", False))

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
        path = self.runtime.dir / f"dynamo-{self.namespace}.lock"
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

    # -- names -----------------------------------------------------------------------------
    def component(self, role: str) -> str:
        """The compute-group component of ``role``'s workers."""
        return component_name(self.namespace, role)

    def dynamo_component(self, role: str) -> str:
        """The Dynamo component ``role``'s workers register under (vLLM's by default)."""
        spec = self.specs.get(role)
        return (spec.dynamo_component if spec is not None else None) or DEFAULT_DYNAMO_COMPONENTS[role]

    def dynamo_endpoint(self, role: str) -> str:
        """The Dynamo endpoint ``role``'s workers serve."""
        spec = self.specs.get(role)
        return spec.dynamo_endpoint if spec is not None else DEFAULT_DYNAMO_ENDPOINT

    def endpoint_path(self, role: str) -> str:
        """``namespace.component.endpoint``: what Dynamo's planner counts ``role``'s workers by."""
        return f"{self.namespace}.{self.dynamo_component(role)}.{self.dynamo_endpoint(role)}"

    # -- reading ---------------------------------------------------------------------------
    async def read_decision(self) -> Decision:
        """The planner's keys, read in one range request (so a decision_id comes with its counts)."""
        assert self.etcd is not None
        kvs, revision = await self.etcd.aget_prefix(self.root)
        values = {k.removeprefix(self.root): kv.value for k, kv in kvs.items()}
        decision = Decision.from_values(values, revision)
        holder = kvs.get(self.root + (SCALING_DECISION_KEY if decision.source == "record" else "decision_id"))
        return dataclasses.replace(decision, lease=holder.lease) if holder is not None else decision

    async def _observe_lease(self, decision: Decision) -> None:
        """Note how long the planner's lease has left, to tell later whether it was revoked or ran out."""
        if self.etcd is None or not decision.lease:
            return
        try:
            ttl = await self.etcd.alease_ttl(decision.lease)
        except EtcdError:
            return
        if ttl >= 0:
            self._planner_lease = (decision.lease, ttl, time.monotonic())

    def _lease_was_revoked(self) -> bool:
        """Whether the planner's keys went with a revoked lease (the planner stopped) rather than an expired one.

        A planner that stops revokes its lease: its keys go while the lease had time left. A
        planner that dies leaves them until the lease runs out, and a planner restarted
        meanwhile goes on counting from the old ``decision_id`` (it read it back), so its
        acknowledgement must stay. Unknown (never observed): revoked.
        """
        if self._planner_lease is None:
            return True
        _, ttl, seen = self._planner_lease
        return ttl - (time.monotonic() - seen) > 3.0

    async def _rows(self) -> list[dict[str, Any]]:
        return [r for r in await self.runtime.ps() if r["state"] == "running"]

    def _of(self, rows: Sequence[Mapping[str, Any]], role: str) -> list[dict[str, Any]]:
        comp = self.component(role)
        return sorted((dict(r) for r in rows if r["component"] == comp), key=lambda r: (r["started_at"], r["group_id"]))

    async def workers(self, role: str) -> list[dict[str, Any]]:
        """The running workers of ``role``, oldest first (``LocalRuntime.ps`` rows; exits noticed first)."""
        return self._of(await self._rows(), role)

    async def counts(self) -> dict[str, int]:
        """Running workers per role."""
        rows = await self._rows()
        return {role: len(self._of(rows, role)) for role in ROLES}

    def _refs(self, rows: Sequence[Mapping[str, Any]], role: str) -> list[WorkerRef]:
        ports = self._load_state().get("health_ports", {})
        return [
            WorkerRef(
                r["group_id"],
                role,
                tuple(r.get("pids") or ()),
                float(r["started_at"]),
                self.dynamo_component(role),
                self.dynamo_endpoint(role),
                {"port": ports.get(r["group_id"], 0)},
            )
            for r in self._of(rows, role)
        ]

    async def ready_counts(self) -> dict[str, int]:
        """Running workers per role that are ready (registered in discovery, by default)."""
        rows = await self._rows()
        out: dict[str, int] = {}
        for role in ROLES:
            refs = self._refs(rows, role)
            out[role] = len(await self.readiness.ready(self.namespace, refs)) if refs else 0
        return out

    # -- converging ------------------------------------------------------------------------
    def _backoff(self, failures: int) -> float:
        return backoff_s(failures, initial_s=self.retry_backoff_s, max_s=self.retry_backoff_max_s, jitter=0.1)

    async def converge(
        self,
        targets: Mapping[str, int | None],
        decision_id: int | None = None,
        *,
        superseded: Callable[[], Awaitable[bool]] | None = None,
    ) -> Outcome:
        """Start or stop workers until each role has its target of ready workers (None: leave the role alone).

        Scale-down first, newest worker first; then scale-up until the targets are met or
        no more groups can be allocated; then wait until the workers are ready and the
        stopped ones have left discovery, replacing workers that exit before they are
        ready (with backoff, up to ``max_start_failures`` per role). ``superseded``: polled
        while waiting; when it answers True (a newer decision) the wait ends early.
        Returns what was done and any shortfall.
        """
        outcome = Outcome(decision_id, dict(targets), {})
        roles = [r for r in ROLES if targets.get(r) is not None and r in self.specs]
        now = time.monotonic()
        deadline = now + self.ready_timeout_s
        # Per role, how many failures this convergence may see: a role with no failures gets the
        # whole budget; one that used it up gets one retry, once its backoff has passed.
        budget = {r: self.max_start_failures if self._failures[r] < self.max_start_failures else 1 for r in roles}
        failed_here = {r: 0 for r in roles}
        capacity: dict[str, str] = {}
        pending: dict[str, str] = {}  # group id -> role: started here, not yet seen ready
        leaving: list[str] = []  # discovery keys of stopped workers, until they go
        leave_deadline = now + self.deregister_timeout_s

        rows = await self._rows()
        for role in roles:
            target = targets[role] or 0
            running = self._of(rows, role)
            extra = list(reversed(running[target:]))
            if not extra:
                continue
            stopping = [ref for ref in self._refs(rows, role) if ref.group_id in {r["group_id"] for r in extra}]
            leaving += await self.readiness.keys_of(self.namespace, stopping)
            for row in extra:
                log.info(
                    "%s: stopping worker %s (%d running, %d wanted)",
                    self.component(role),
                    row["group_id"],
                    len(running),
                    target,
                )
                await self.runtime.stop(row["group_id"])
                outcome.stopped += 1

        ready: set[str] = set()
        checked_superseded = 0.0
        while True:
            rows = await self._rows()
            running_ids = {r["group_id"] for r in rows}
            ready = set()
            for role in roles:
                refs = self._refs(rows, role)
                if refs:
                    ready |= await self.readiness.ready(self.namespace, refs)
            for gid, role in list(pending.items()):
                if gid in ready:
                    del pending[gid]
                    self._failures[role] = 0
                    self._next_start[role] = 0.0
                    self._failure_reason.pop(role, None)
                elif gid not in running_ids:
                    del pending[gid]
                    failed_here[role] += 1
                    self._failures[role] += 1
                    wait = self._backoff(self._failures[role])
                    self._next_start[role] = time.monotonic() + wait
                    last = _last_line(
                        next((r["log_file"] for r in await self.runtime.ps() if r["group_id"] == gid), "")
                    )
                    outcome.reasons[role] = self._failure_reason[role] = (
                        f"a worker exited before it was {self.readiness.description} "
                        f"({self._failures[role]} time(s) in a row{'; last output: ' + last if last else ''})"
                    )
                    log.warning(
                        "%s: worker %s exited before it was ready (%d time(s) in a row); next try in %.1fs",
                        self.component(role),
                        gid,
                        self._failures[role],
                        wait,
                    )
            waiting = False
            for role in roles:
                target = targets[role] or 0
                have = len(self._of(rows, role))
                given_up = failed_here[role] >= budget[role]
                while (
                    have < target
                    and not given_up
                    and role not in capacity
                    and time.monotonic() >= self._next_start[role]
                ):
                    try:
                        gid = await self._start(role)
                    except InsufficientResourcesError as exc:
                        capacity[role] = str(exc)
                        break
                    pending[gid] = role
                    have += 1
                    outcome.started += 1
                n_ready = sum(1 for r in self._of(rows, role) if r["group_id"] in ready)
                if n_ready >= target:
                    continue
                if any(p == role for p in pending.values()):
                    waiting = True  # a new worker may still become ready
                elif have > n_ready and not given_up:
                    waiting = True  # running workers (started earlier) may still become ready
                elif have < target and not given_up and role not in capacity:
                    # Waiting out a backoff before the next try; a role past its budget is not waited for.
                    waiting = waiting or self._failures[role] < self.max_start_failures
            if leaving and not await self.readiness.gone(leaving):
                if time.monotonic() < leave_deadline:
                    waiting = True
                else:
                    log.warning(
                        "dynamo %s: stopped workers still registered after %.0fs",
                        self.namespace,
                        self.deregister_timeout_s,
                    )
                    leaving = []
            else:
                leaving = []
            if not waiting:
                break
            if time.monotonic() >= deadline:
                for role in roles:
                    if any(p == role for p in pending.values()) or role not in outcome.reasons:
                        outcome.reasons.setdefault(
                            role, f"workers not {self.readiness.description} after {self.ready_timeout_s:g}s"
                        )
                break
            if superseded is not None and time.monotonic() - checked_superseded >= 1.0:
                checked_superseded = time.monotonic()
                if await superseded():
                    outcome.superseded = True
                    break
            pause = self.ready_poll_s
            starts = [self._next_start[r] - time.monotonic() for r in roles if self._next_start[r] > time.monotonic()]
            if starts:
                pause = max(0.05, min(pause, *starts))
            await asyncio.sleep(pause)

        rows = await self._rows()  # with the workers started last, if any
        outcome.running = {role: len(self._of(rows, role)) for role in ROLES}
        outcome.failures = {r: n for r, n in failed_here.items() if n}
        for role in ROLES:
            outcome.ready[role] = sum(1 for r in self._of(rows, role) if r["group_id"] in ready)
        for role in roles:
            target = targets[role] or 0
            if outcome.ready[role] < target:
                outcome.shortfall[role] = target - outcome.ready[role]
                if role in capacity:
                    outcome.reasons[role] = capacity[role]
                elif role in self._failure_reason:
                    outcome.reasons.setdefault(role, self._failure_reason[role])
                outcome.reasons.setdefault(role, f"workers not {self.readiness.description}")
            else:
                outcome.reasons.pop(role, None)
        if not outcome.superseded:
            self._report(outcome)
            self.last_settled = outcome
        self.last_outcome = outcome
        return outcome

    async def _start(self, role: str) -> str:
        spec = self.specs[role]
        req: dict[str, Any] = {"gpus": spec.gpus, **spec.requirements}
        cons: dict[str, Any] = {**spec.constraints, "request_id": f"{self.component(role)}/{uuid.uuid4().hex[:12]}"}
        env = {
            **self.env,
            "COMPUTEGROUPS_DYNAMO_NAMESPACE": self.namespace,
            "COMPUTEGROUPS_DYNAMO_ROLE": role,
            "COMPUTEGROUPS_DYNAMO_COMPONENT": self.dynamo_component(role),
            "COMPUTEGROUPS_DYNAMO_ENDPOINT": self.dynamo_endpoint(role),
            "COMPUTEGROUPS_DYNAMO_ENDPOINT_PATH": f"dyn://{self.endpoint_path(role)}",
            # What a Dynamo worker reads to join the planner's namespace and discovery:
            "DYN_NAMESPACE": self.namespace,
        }
        if self.etcd_endpoints:
            env["ETCD_ENDPOINTS"] = self.etcd_endpoints
            env.setdefault("DYN_DISCOVERY_BACKEND", "etcd")
        if self.etcd is not None:
            env.update(self.etcd.dynamo_env())  # the same etcd's CA, client certificate and user
        port = 0
        if isinstance(self.readiness, HealthReadiness) and self.readiness.wants_port:
            port = free_port()
            env["DYN_SYSTEM_PORT"] = str(port)
            env.setdefault("DYN_SYSTEM_HOST", "127.0.0.1")
        group, worker = await self.runtime.run(self.component(role), req, list(spec.command), cons, env=env)
        if port:
            ports = {gid: p for gid, p in self._load_state().get("health_ports", {}).items() if gid != group.id}
            self._save_state(health_ports={**ports, group.id: port})
        log.info(
            "%s: started worker on %s (GPUs %s), pids %s",
            self.component(role),
            group.id,
            group.resources["gpu_indices"],
            worker.pids,
        )
        return group.id

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
                f"worker(s) of {self.specs[role].gpus} GPU(s); {outcome.running[role]} running, "
                f"{outcome.ready.get(role, 0)} {self.readiness.description}, {missing} short: "
                f"{outcome.reasons.get(role, '')}; will keep trying"
            )
            log.warning("shortfall: %s", detail)
            self.manager.emit(Event("dynamo-shortfall", None, None, self.component(role), detail))

    # -- one round: read, converge, acknowledge --------------------------------------------------
    async def step(self) -> Outcome | None:
        """Read the decision, converge on it and acknowledge it; None when the planner has not decided yet."""
        assert self.etcd is not None
        decision = await self.read_decision()
        if decision.error is not None:
            log.warning("dynamo %s: %s; not carried out", self.namespace, decision.error)
            return None
        if decision.decision_id is None:
            if decision.scaled_decision_id is not None and not self._keys_gone:
                if self._lease_was_revoked():
                    # The planner stopped and its keys went with its lease: let the next planner
                    # (from decision_id 0) wait for a real acknowledgement.
                    log.info("dynamo %s: planner keys are gone; withdrawing scaled_decision_id", self.namespace)
                    await self.etcd.adelete(self.root + "scaled_decision_id")
                else:
                    log.info(
                        "dynamo %s: planner keys ran out with its lease; keeping scaled_decision_id for a planner "
                        "that goes on counting",
                        self.namespace,
                    )
                self._keys_gone = True
                self._save_state(keys_gone=True)  # an actuator restarted meanwhile decides nothing again
            # No decision yet.
            return None
        decision_id = decision.decision_id
        if self._keys_gone:
            self._keys_gone = False
            self._save_state(keys_gone=False)
        await self._observe_lease(decision)
        if self._last_seen is not None and decision_id < self._last_seen:
            detail = f"namespace {self.namespace}: decision_id went from {self._last_seen} to {decision_id}"
            log.warning("planner restart: %s", detail)
            self.manager.emit(Event("dynamo-planner-restart", None, None, None, detail))
            if decision.scaled_decision_id is not None and decision.scaled_decision_id > decision_id:
                # A stale acknowledgement from before the restart would pass for this decision.
                await self.etcd.adelete(self.root + "scaled_decision_id")
                decision = dataclasses.replace(decision, scaled_decision_id=None)
        if decision_id != self._last_seen:
            self._last_seen = decision_id
            self._save_state(decision_id=decision_id)
        targets = {role: decision.target(role) for role in ROLES}

        async def superseded() -> bool:
            try:
                now = await self.read_decision()
            except EtcdError:
                return False
            if now.decision_id is not None:
                await self._observe_lease(now)
            return (now.decision_id, now.source) != (decision.decision_id, decision.source)

        outcome = await self.converge(targets, decision_id, superseded=superseded)
        if outcome.superseded:
            log.info("dynamo %s: decision %s superseded while converging", self.namespace, decision_id)
            self.decisions["superseded"] += 1
            return outcome
        if decision.scaled_decision_id != decision_id:
            await self._acknowledge(decision_id)
            self._save_state(acknowledged=decision_id)
            self.decisions["met" if outcome.met else "short"] += 1
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
            await stop_task(keepalive)
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
        failures = 0
        while not self._stop.is_set():
            try:
                _, revision = self._etcd.get_prefix(self._prefix)
                self._watch = self._etcd.watch_prefix(self._prefix, revision + 1)
                self._notify()  # something may have changed while no watch was open
                failures = 0
                for _event in self._watch:
                    self._notify()
            except EtcdError as exc:
                failures += 1
                log.debug("watch %s: %s", self._prefix, exc)
            # Reopened at once after a stream that ended well, later and later while etcd is away.
            self._stop.wait(backoff_s(failures, initial_s=0.5, max_s=30.0, jitter=0.5) if failures else 0.1)


def parse_specs(
    prefill_gpus: int,
    prefill_cmd: Sequence[str] | None,
    decode_gpus: int,
    decode_cmd: Sequence[str] | None,
    requirements: Mapping[str, Any] | None = None,
    constraints: Mapping[str, Any] | None = None,
    *,
    components: Mapping[str, str | None] | None = None,
    endpoints: Mapping[str, str | None] | None = None,
) -> dict[str, WorkerSpec]:
    """The worker specs of the roles that have a command (``components`` / ``endpoints``: Dynamo names per role)."""
    specs: dict[str, WorkerSpec] = {}
    for role, gpus, cmd in ((PREFILL, prefill_gpus, prefill_cmd), (DECODE, decode_gpus, decode_cmd)):
        if cmd:
            specs[role] = WorkerSpec(
                gpus,
                tuple(cmd),
                dict(requirements or {}),
                dict(constraints or {}),
                (components or {}).get(role) or None,
                (endpoints or {}).get(role) or DEFAULT_DYNAMO_ENDPOINT,
            )
    return specs
