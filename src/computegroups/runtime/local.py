"""Components run as circus watchers on the devices of their compute group.

``run`` allocates a group and starts the component's command as its own circus
watcher, with the group's environment (``CUDA_VISIBLE_DEVICES`` as GPU UUIDs,
``CUDA_DEVICE_ORDER=PCI_BUS_ID``, sharing hints for a fraction of a GPU).
``stop`` stops the watcher gracefully (its stop signal, then SIGKILL after
``graceful_timeout_s``) and releases the group. ``ps`` lists workers.

A worker that exits is noticed by :meth:`LocalRuntime.check_workers` (a monitor
hook, and run before ``run``/``stop``/``ps``): under the ``release`` policy its
group is released; under ``restart`` circus restarts it and the restarts are
counted. The worker registry (``workers.json`` in the runtime folder) says which.

Crash safety. The allocation is committed before the watcher is added, and the
watcher is removed before the group is released, so a worker never runs on
devices its group does not hold. Groups the runtime allocates carry a request id
starting with ``circus/``. Each multi-step operation holds ``runtime.lock``
(``flock``, dropped by the kernel if the process dies), and
:meth:`LocalRuntime.reconcile` (a reconcile hook: it runs when a manager opens)
takes it too, so it sees only what a dead process left behind and repairs it:

* a ``circus/`` group without a watcher is released (the process died between
  allocation and launch, or its worker is gone);
* a watcher whose group is no longer held is stopped and removed (the process
  died between stopping and releasing, or the group was released elsewhere).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import json
import os
import shutil
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from computegroups.errors import InvalidRequestError, NotFoundError, ProviderError, one_of
from computegroups.manager import ComputeGroupManager, Event
from computegroups.model import MILLI, AllocationState, ComputeGroup, Constraints, GroupRecord, Requirements
from computegroups.runtime.circus import CircusDaemon, CircusError

__all__ = ["REQUEST_PREFIX", "LocalRuntime", "RestartPolicy", "Worker", "sharing_env"]

#: Request ids of groups the runtime allocates start with this.
REQUEST_PREFIX = "circus/"
_ARGV_VAR = "COMPUTEGROUPS_WORKER_ARGV"  # the worker's argv, JSON in base64 (nothing circus would rewrite)
_EXIT_VAR = "COMPUTEGROUPS_WORKER_EXIT"  # where the launcher records how the worker ended
# What circus runs: it starts the worker with exactly its argv, passes signals on, and records the
# worker's exit code and time when it ends (circus itself keeps neither), then exits the same way.
_LAUNCHER = f"""
import base64, json, os, signal, sys, time
argv = json.loads(base64.b64decode(os.environ.pop({_ARGV_VAR!r})))
record = os.environ.pop({_EXIT_VAR!r})
child = os.fork()
if child == 0:
    try:
        os.execvp(argv[0], argv)
    except OSError as exc:
        os.write(2, (argv[0] + ": " + str(exc) + "\\n").encode())
        os._exit(127)
def forward(signum, frame):
    try:
        os.kill(child, signum)
    except ProcessLookupError:
        pass
for name in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT", "SIGUSR1", "SIGUSR2"):
    signal.signal(getattr(signal, name), forward)
status = os.waitpid(child, 0)[1]
code = os.waitstatus_to_exitcode(status)
with open(record + ".tmp", "w") as f:
    f.write(json.dumps({{"code": code, "at": time.time()}}))
os.replace(record + ".tmp", record)
sys.exit(code if code >= 0 else 128 - code)
"""
WATCHER_PREFIX = "w-"
_HELD = (AllocationState.ALLOCATED, AllocationState.DRAINING, AllocationState.RESERVED)
_ENDED_KEPT = 1000


class RestartPolicy(StrEnum):
    """What happens when a worker exits: release its group, or restart it on the same group."""

    RELEASE = "release"
    RESTART = "restart"


@dataclass(slots=True)
class Worker:
    """One component process and the group it runs on, as the registry keeps it.

    ``state``: ``starting``, ``running``, ``exited`` (ended by itself; group released),
    ``failed`` (kept crashing under ``restart``; group released), ``stopped`` (by ``stop`` or a
    release; group released) or ``lost`` (found gone by reconcile).
    """

    group_id: str
    component: str
    watcher: str
    command: list[str]
    policy: str = RestartPolicy.RELEASE.value
    state: str = "starting"
    pids: list[int] = field(default_factory=list)
    restarts: int = 0
    restart_times: list[float] = field(default_factory=list)  # when it was restarted, newest last
    last_exit_code: int | None = None  # how the worker last ended (negative: killed by that signal)
    last_exit_at: float | None = None
    started_at: float = 0.0
    updated_at: float = 0.0
    note: str = ""
    log_file: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Worker:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    @property
    def ended(self) -> bool:
        return self.state in ("exited", "failed", "stopped", "lost")


def sharing_env(group: ComputeGroup, gpu_memory_mib: int, *, mps: bool = False) -> dict[str, str]:
    """Hints for a workload on a share of one GPU (empty for whole GPUs).

    ``COMPUTEGROUPS_GPU_MEMORY_FRACTION``: the share's memory over the GPU's, for a
    serving engine's memory-utilization setting (vLLM ``--gpu-memory-utilization``,
    SGLang ``--mem-fraction-static``). With ``mps``: ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``
    (the share, in percent of SMs) and ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (the
    share's memory on device 0, the only one visible).
    """
    devices = group.record.devices
    if len(devices) != 1 or devices[0].share_milli >= MILLI:
        return {}
    d = devices[0]
    env: dict[str, str] = {}
    if gpu_memory_mib > 0 and d.memory_mib > 0:
        env["COMPUTEGROUPS_GPU_MEMORY_FRACTION"] = f"{min(1.0, d.memory_mib / gpu_memory_mib):.3f}"
    if mps:
        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(max(1, round(d.share_milli / 10)))
        if d.memory_mib > 0:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"0={d.memory_mib}M"
    return env


class LocalRuntime:
    """Runs components under a private circus daemon on groups of ``manager``.

    Construct before entering the manager (``async with``) so its reconcile hook
    runs when the manager opens; constructing it later works too, then call
    :meth:`reconcile` yourself.
    """

    def __init__(
        self,
        manager: ComputeGroupManager,
        daemon: CircusDaemon | None = None,
        *,
        graceful_timeout_s: float = 10.0,
        restart_backoff_s: float = 1.0,
        restart_backoff_max_s: float = 60.0,
        max_restarts: int = 5,
        restart_window_s: float = 600.0,
    ) -> None:
        for key, value in (
            ("graceful_timeout_s", graceful_timeout_s),
            ("restart_backoff_s", restart_backoff_s),
            ("restart_backoff_max_s", restart_backoff_max_s),
            ("restart_window_s", restart_window_s),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1e9:
                raise InvalidRequestError(f"{key}: {value!r} is not a number of seconds >= 0", key=key)
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or not 0 <= max_restarts <= 10_000:
            raise InvalidRequestError(f"max_restarts: {max_restarts!r} is not in 0..10000", key="max_restarts")
        self.manager = manager
        self.daemon = daemon or CircusDaemon()
        self.graceful_timeout_s = graceful_timeout_s
        #: ``restart`` policy: the n-th restart in a row waits ``restart_backoff_s * 2**(n-1)`` (at most
        #: ``restart_backoff_max_s``) after the exit; after ``max_restarts`` restarts within
        #: ``restart_window_s`` the next exit releases the group and marks the worker failed.
        self.restart_backoff_s = restart_backoff_s
        self.restart_backoff_max_s = restart_backoff_max_s
        self.max_restarts = max_restarts
        self.restart_window_s = restart_window_s
        self._lock = asyncio.Lock()
        self._holder: asyncio.Task[Any] | None = None  # the task holding the runtime lock
        manager.reconcile_hooks.append(self._reconcile_hook)
        manager.monitor_hooks.append(self._check_hook)
        manager.release_hooks.append(self._before_release)

    # -- plumbing -----------------------------------------------------------------------
    @property
    def dir(self) -> Path:
        return self.daemon.dir

    @contextlib.asynccontextmanager
    async def _locked(self) -> AsyncIterator[None]:
        async with self._lock:
            await asyncio.to_thread(self.daemon._prepare_dir)
            fd = os.open(self.dir / "runtime.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                await asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX)
                self._holder = asyncio.current_task()
                yield
            finally:
                self._holder = None
                os.close(fd)

    async def _circus(self, method: str, *args: Any) -> Any:
        return await asyncio.to_thread(getattr(self.daemon, method), *args)

    def _load(self) -> dict[str, Worker]:
        path = self.dir / "workers.json"
        try:
            data = json.loads(path.read_text())
            return {str(gid): Worker.from_dict(w) for gid, w in data.items()}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError, AttributeError) as exc:
            # Writes are atomic (a finished file replaces the old one), so this is damage, not a torn
            # write: trusting it as empty would forget running workers and hand out their GPUs.
            raise ProviderError(f"worker registry {path}: damaged ({exc}); move it aside after checking 'ps'") from exc

    def _save(self, workers: Mapping[str, Worker]) -> None:
        ended = sorted((w for w in workers.values() if w.ended), key=lambda w: w.updated_at)
        drop = {w.group_id for w in ended[: max(0, len(ended) - _ENDED_KEPT)]}
        data = {gid: w.to_dict() for gid, w in workers.items() if gid not in drop}
        tmp = self.dir / f"workers.json.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, self.dir / "workers.json")

    async def _worker_pids(self, watcher: str) -> list[int]:
        """The pids of a watcher's workers: the children of the launchers circus runs."""
        launchers = await self._circus("pids", watcher)
        return await asyncio.to_thread(_children_of, launchers)

    def _exit_record(self, group_id: str) -> Path:
        folder = self.dir / "exits"
        folder.mkdir(mode=0o700, exist_ok=True)
        return folder / f"{group_id}.json"

    def _read_exit(self, w: Worker) -> None:
        """Take the launcher's record of how the worker last ended, if there is one."""
        try:
            data = json.loads(self._exit_record(w.group_id).read_text())
            code, at = int(data["code"]), float(data["at"])
        except (OSError, ValueError, KeyError, TypeError):
            return
        w.last_exit_code, w.last_exit_at = code, at

    def _emit(self, kind: str, w: Worker, detail: str) -> Event:
        node = next((n.id for n in self.manager.node_specs()), None)
        e = Event(kind, w.group_id, node, w.component, detail)
        self.manager.emit(e)
        return e

    # -- run / stop / ps ----------------------------------------------------------------
    async def run(
        self,
        component: str,
        requirements: Mapping[str, Any] | Requirements,
        command: Sequence[str],
        constraints: Mapping[str, Any] | Constraints | None = None,
        *,
        policy: RestartPolicy | str = RestartPolicy.RELEASE,
        mps: bool = False,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> tuple[ComputeGroup, Worker]:
        """Allocate a group for ``component`` and start ``command`` on it; returns the group and its worker.

        ``env``: the base environment (default: this process's), to which the group's is added.
        Raises what ``allocate_compute_group`` raises, InvalidRequestError for a bad command or
        policy, and ProviderError (nothing kept) if circus cannot start the worker.
        """
        if isinstance(command, str) or not command or not all(isinstance(c, str) for c in command):
            raise InvalidRequestError(f"command: {command!r} is not a non-empty list of strings", key="command")
        if policy not in [p.value for p in RestartPolicy]:
            raise InvalidRequestError(
                f"policy: {policy!r} is not one of {one_of([p.value for p in RestartPolicy])}", key="policy"
            )
        policy = RestartPolicy(policy)
        executable = shutil.which(command[0], path=(env or os.environ).get("PATH"))
        if executable is None:
            raise InvalidRequestError(
                f"command: {command[0]!r} is not an executable file or a program on PATH", key="command"
            )
        cons: dict[str, Any] = (
            Constraints.parse(constraints).to_dict()
            if isinstance(constraints, Constraints)
            else dict(constraints or {})
        )
        cons.setdefault("request_id", f"{REQUEST_PREFIX}{uuid.uuid4().hex}")
        if not str(cons["request_id"]).startswith(REQUEST_PREFIX):
            cons["request_id"] = REQUEST_PREFIX + str(cons["request_id"])
        await asyncio.to_thread(self.daemon.ensure_started)
        async with self._locked():
            await self._check_workers_locked()
            group = await self.manager.allocate_compute_group(component, requirements, cons)
            try:
                worker = await self._launch(group, [executable, *command[1:]], policy, mps, env, cwd)
            except BaseException:
                await self.manager.deallocate_compute_group(group.id)
                raise
        return group, worker

    async def _launch(
        self,
        group: ComputeGroup,
        command: list[str],
        policy: RestartPolicy,
        mps: bool,
        env: Mapping[str, str] | None,
        cwd: str | os.PathLike[str] | None,
    ) -> Worker:
        spec = next((n for n in self.manager.node_specs() if n.id == group.node_id), None)
        total = 0
        if spec is not None and group.record.devices:
            total = spec.gpus[group.record.devices[0].index].memory_mib
        full_env = dict(os.environ if env is None else env)
        full_env.update(group.env)
        full_env.update(sharing_env(group, total, mps=mps))
        full_env["COMPUTEGROUPS_COMPONENT"] = group.component or ""
        full_env[_ARGV_VAR] = base64.b64encode(json.dumps(command).encode()).decode()
        full_env[_EXIT_VAR] = str(self._exit_record(group.id))
        now = time.time()
        logs = self.dir / "logs"
        logs.mkdir(exist_ok=True)
        log_file = logs / f"{group.id}.log"
        w = Worker(
            group_id=group.id,
            component=group.component or "",
            watcher=WATCHER_PREFIX + group.id,
            command=command,
            policy=policy.value,
            started_at=now,
            updated_at=now,
            log_file=str(log_file),
        )
        workers = self._load()
        workers[group.id] = w
        self._save(workers)
        stream = {"class": "FileStream", "filename": str(log_file)}
        options = {
            "env": full_env,
            "copy_env": False,
            "working_dir": str(cwd or os.getcwd()),
            "respawn": False,  # restarts are decided here, with a backoff and a budget
            "graceful_timeout": self.graceful_timeout_s,
            "stop_children": True,
            "stdout_stream": stream,
            "stderr_stream": stream,
        }
        try:
            # circus splits its command line and rewrites $(circus.*) in it; the worker must get
            # exactly its argv, so circus runs a tiny launcher that execs the argv it is handed.
            self._exit_record(group.id).unlink(missing_ok=True)
            await self._circus("add_watcher", w.watcher, sys.executable, ["-c", _LAUNCHER], options)
            w.pids = await self._worker_pids(w.watcher)
        except CircusError as exc:
            with contextlib.suppress(CircusError):
                await self._circus("remove_watcher", w.watcher)
            w.state, w.note, w.updated_at = "lost", f"could not start: {exc}", time.time()
            workers[group.id] = w
            self._save(workers)
            raise ProviderError(f"circus: could not start {command[0]} for group {group.id}: {exc}") from exc
        w.state, w.updated_at = "running", time.time()
        workers[group.id] = w
        self._save(workers)
        self._emit("worker-started", w, f"pids {w.pids}: {' '.join(command)}")
        return w

    async def stop(self, group_id: str) -> bool:
        """Stop a group's worker gracefully, then release the group. False if there was nothing to stop."""
        await self.manager.get_compute_group(group_id)  # NotFoundError for an unknown id
        async with self._locked():
            stopped = await self._stop_workers([group_id], "stopped; group released")
        released = await self.manager.deallocate_compute_group(group_id)
        return stopped or released

    async def _before_release(self, records: Sequence[GroupRecord]) -> None:
        """The manager's release hook: a group's worker stops, and none of its processes is left,
        before the group is released (from the API, the CLI or the Dynamo actuator alike)."""
        if not any((r.request_id or "").startswith(REQUEST_PREFIX) for r in records):
            return  # not started by a runtime: no worker to stop
        gids = sorted({r.gang_id or r.id for r in records})
        if self._holder is asyncio.current_task():  # released by this runtime's own bookkeeping
            await self._stop_workers(gids, "stopped: its group was released")
            return
        async with self._locked():
            await self._stop_workers(gids, "stopped: its group was released")

    async def _stop_workers(self, gids: Sequence[str], note: str) -> bool:
        """Stop the workers of ``gids`` (the runtime lock held) and wait until no process of theirs is left."""
        workers = self._load()
        running = await asyncio.to_thread(self.daemon.is_running)
        watchers = set(await self._circus("watchers")) if running else set()
        stopped = False
        for gid in gids:
            if WATCHER_PREFIX + gid in watchers:
                await self._circus("remove_watcher", WATCHER_PREFIX + gid)  # stop signal, grace, then SIGKILL
                stopped = True
            w = workers.get(gid)
            if w is None or w.ended:
                continue
            if w.pids:  # whatever outlived its watcher (or a daemon that died) ends too
                await asyncio.to_thread(_end_worker_processes, w, self.graceful_timeout_s)
            w.state, w.pids, w.updated_at, w.note = "stopped", [], time.time(), note
            workers[gid] = w
            self._save(workers)
            self._emit("worker-stopped", w, note)
            stopped = True
        return stopped

    async def ps(self) -> list[dict[str, Any]]:
        """Workers, newest first: component, group, state, pids, restarts, policy, command, devices."""
        await self.check_workers()
        workers = self._load()
        rows: list[dict[str, Any]] = []
        for w in sorted(workers.values(), key=lambda w: w.started_at, reverse=True):
            try:
                g = await self.manager.get_compute_group(w.group_id)
                group_state, devices = g.allocation_state, g.resources["gpu_indices"]
            except NotFoundError:
                group_state, devices = "gone", []
            rows.append({**w.to_dict(), "group_state": group_state, "gpu_indices": devices})
        return rows

    # -- noticing exits; repairing after a crash ---------------------------------------
    async def _check_hook(self, manager: ComputeGroupManager) -> list[Event]:
        return await self.check_workers()

    async def _reconcile_hook(self, manager: ComputeGroupManager) -> list[Event]:
        return await self.reconcile()

    async def check_workers(self) -> list[Event]:
        """Notice workers that exited (release their group, or count restarts); returns the events."""
        if not await asyncio.to_thread(self.daemon.is_running):
            return await self.reconcile()
        async with self._locked():
            return await self._check_workers_locked()

    async def _check_workers_locked(self) -> list[Event]:
        workers = self._load()
        events: list[Event] = []
        changed = False
        if not await asyncio.to_thread(self.daemon.is_running):
            return events
        now = time.time()
        for gid, w in list(workers.items()):
            if w.state != "running":
                continue
            try:
                status = await self._circus("status", w.watcher)
                pids = await self._worker_pids(w.watcher) if status != "stopped" else []
            except CircusError:
                status, pids = "missing", []
            if pids:
                if sorted(pids) != sorted(w.pids):
                    w.pids, w.updated_at, changed = pids, now, True
                continue
            self._read_exit(w)
            how = f"exit code {w.last_exit_code}" if w.last_exit_code is not None else "exit code unknown"
            recent = [at for at in w.restart_times if now - at <= self.restart_window_s]
            if w.policy == RestartPolicy.RESTART.value and status != "missing" and len(recent) < self.max_restarts:
                wait = min(self.restart_backoff_s * 2 ** len(recent), self.restart_backoff_max_s)
                if now - (w.last_exit_at or 0.0) < wait:
                    continue  # backing off; a later round restarts it
                try:
                    await self._circus("restart_watcher", w.watcher)
                    w.pids = await self._worker_pids(w.watcher)
                except CircusError:
                    w.pids = []
                w.restarts += 1
                w.restart_times = [*recent, now]
                w.updated_at = now
                w.note = f"restarted {w.restarts} times ({how}); group kept"
                events.append(self._emit("worker-restarted", w, w.note))
                changed = True
                continue
            with contextlib.suppress(CircusError):
                await self._circus("remove_watcher", w.watcher)
            with contextlib.suppress(NotFoundError):
                await self.manager.deallocate_compute_group(gid)
            w.pids, w.updated_at = [], now
            if w.policy == RestartPolicy.RESTART.value and status != "missing":
                w.state = "failed"
                w.note = f"failed: {len(recent)} restarts within {self.restart_window_s:g} s ({how}); group released"
                events.append(self._emit("worker-failed", w, w.note))
            else:
                w.state = "exited"
                after = f" (after {w.restarts} restarts)" if w.restarts else ""
                w.note = f"worker exited ({how}); group released{after}"
                events.append(self._emit("worker-exited", w, w.note))
            changed = True
        if changed:
            self._save(workers)
        return events

    async def reconcile(self) -> list[Event]:
        """Repair what a crashed process left: allocations without a worker, workers without a group."""
        async with self._locked():
            events = await self._check_workers_locked()
            workers = self._load()
            running = await asyncio.to_thread(self.daemon.is_running)
            watchers = {n for n in await self._circus("watchers") if n.startswith(WATCHER_PREFIX)} if running else set()
            if not running:
                # The daemon is gone (killed?): its workers may still run, unsupervised. End them
                # before their groups are released, so no device ends up with two users.
                for w in workers.values():
                    if not w.ended and w.pids:
                        await asyncio.to_thread(_end_worker_processes, w, self.graceful_timeout_s)
            held = {
                g.id: g
                for g in await self.manager.list_compute_groups()
                if g.record.state in _HELD and (g.request_id or "").startswith(REQUEST_PREFIX)
            }
            changed = False
            for gid, g in held.items():
                if WATCHER_PREFIX + gid in watchers:
                    known = workers.get(gid)
                    if known is None or known.state == "starting":
                        # died between asking circus to start the worker and recording that it did
                        adopted = known or Worker(gid, g.component or "", WATCHER_PREFIX + gid, [])
                        adopted.state, adopted.updated_at = "running", time.time()
                        adopted.pids = await self._worker_pids(adopted.watcher)
                        workers[gid] = adopted
                        changed = True
                    continue
                await self.manager.deallocate_compute_group(gid)
                w = workers.get(gid) or Worker(gid, g.component or "", WATCHER_PREFIX + gid, [])
                w.state, w.pids, w.updated_at = "lost", [], time.time()
                w.note = "reconcile: allocation without a worker; group released"
                workers[gid] = w
                changed = True
                events.append(self._emit("reconcile-released", w, w.note))
            all_groups = {g.id: g for g in await self.manager.list_compute_groups({"include_released": True})}
            for name in sorted(watchers):
                gid = name.removeprefix(WATCHER_PREFIX)
                owner = all_groups.get(gid)
                if owner is not None and owner.record.state in _HELD:
                    continue
                await self._circus("remove_watcher", name)
                w = workers.get(gid) or Worker(gid, "", name, [])
                w.state, w.pids, w.updated_at = "stopped", [], time.time()
                w.note = "reconcile: worker without a held group; stopped"
                workers[gid] = w
                changed = True
                events.append(self._emit("reconcile-stopped", w, w.note))
            for gid, w in workers.items():
                if not w.ended and WATCHER_PREFIX + gid not in watchers and gid not in held:
                    w.state, w.updated_at = "lost", time.time()
                    w.note = w.note or "reconcile: worker gone"
                    changed = True
            if changed:
                self._save(workers)
            return events


def _children_of(launchers: Sequence[int], wait_s: float = 2.0) -> list[int]:
    """The worker each launcher forked (waiting briefly for the fork); a launcher without one stands for it."""
    import psutil

    out: list[int] = []
    for pid in launchers:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                children = psutil.Process(pid).children()
            except psutil.Error:
                children = []
                break
            if children or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        if children:
            out.extend(c.pid for c in children)
        else:
            out.append(pid)
    return out


def _end_worker_processes(w: Worker, timeout_s: float) -> None:
    """Terminate, then kill, the recorded processes of a worker that lost its daemon.

    A pid is only touched if its environment names the worker's group (pids get reused).
    """
    import psutil

    procs = []
    for pid in w.pids:
        try:
            p = psutil.Process(pid)
            if p.environ().get("COMPUTEGROUPS_GROUP_ID") == w.group_id:
                procs.append(p)
        except (psutil.Error, OSError):
            continue
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
