"""``ComputeGroupsConnector``: Dynamo's ``PlannerConnector`` shape, scaling workers on compute groups in process.

Dynamo's planner talks to its environment through a connector (``async_init``,
``validate_deployment``, ``wait_for_deployment_ready``, ``get_model_name``,
``get_gpu_counts``, ``get_gpu_shapes``, ``get_actual_worker_counts``,
``set_component_replicas``, ``get_worker_info``). This one runs the planner's
targets as workers under the local runtime, exactly as the etcd actuator does
(:class:`~computegroups.integrations.dynamo.actuator.DynamoActuator`, without
etcd); GPU counts, shapes and worker counts come from the compute groups.

Dynamo is not imported unless present: ``get_worker_info`` and ``get_gpu_shapes``
return Dynamo's ``WorkerInfo`` / ``ComponentGPUShape`` when it is installed, and
look-alike dataclasses otherwise. See ``docs/dynamo.md`` for a wrapper script.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from computegroups.errors import InvalidRequestError
from computegroups.integrations.dynamo.actuator import (
    DECODE,
    PREFILL,
    ROLES,
    DynamoActuator,
    Outcome,
    WorkerSpec,
)
from computegroups.integrations.dynamo.readiness import Readiness
from computegroups.integrations.etcd import EtcdClient
from computegroups.runtime.local import LocalRuntime

__all__ = ["ComputeGroupsConnector", "GpuShape", "WorkerInfo"]

log = logging.getLogger("computegroups.dynamo")


@dataclass(frozen=True, slots=True)
class GpuShape:
    """Like Dynamo's ``ComponentGPUShape``: GPUs of one engine, and GPUs one replica holds."""

    gpus_per_engine: int
    gpus_per_replica: int


@dataclass(slots=True)
class WorkerInfo:
    """Like Dynamo's ``WorkerInfo`` (the fields a planner reads when it cannot query the workers)."""

    k8s_name: str | None = None
    component_name: str | None = None
    endpoint: str | None = None
    model_name: str | None = None
    total_kv_blocks: int | None = None
    kv_cache_block_size: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    context_length: int | None = None


def _role(sub_component_type: Any) -> str:
    value = str(getattr(sub_component_type, "value", sub_component_type)).lower()
    if value not in ROLES:
        raise InvalidRequestError(
            f"sub_component_type: {sub_component_type!r} is not one of prefill, decode", key="sub_component_type"
        )
    return value


class ComputeGroupsConnector:
    """A ``PlannerConnector`` for Dynamo's planner that scales workers on compute groups.

    ``runtime``: a :class:`LocalRuntime` whose manager is open. ``specs``: the
    :class:`WorkerSpec` per role (``"prefill"``, ``"decode"``). ``model_name``: what
    ``get_model_name`` answers (Dynamo lower-cases it, so do we). ``etcd``: Dynamo's
    etcd; with it a worker is ready once registered in Dynamo's discovery (and the
    workers get ``ETCD_ENDPOINTS``), without it once it has run ``settle_s`` seconds
    (``readiness`` chooses otherwise).
    """

    def __init__(
        self,
        runtime: LocalRuntime,
        namespace: str,
        specs: Mapping[str, WorkerSpec],
        model_name: str,
        *,
        ready_timeout_s: float = 1800.0,
        settle_s: float = 0.3,
        env: Mapping[str, str] | None = None,
        etcd: EtcdClient | None = None,
        readiness: Readiness | None = None,
        max_start_failures: int = 3,
        retry_backoff_s: float = 1.0,
    ) -> None:
        self.actuator = DynamoActuator(
            runtime,
            etcd,
            namespace,
            specs,
            settle_s=settle_s,
            env=env,
            readiness=readiness,
            ready_timeout_s=ready_timeout_s,
            max_start_failures=max_start_failures,
            retry_backoff_s=retry_backoff_s,
        )
        self.model_name = model_name.lower()
        self.ready_timeout_s = ready_timeout_s
        self.targets: dict[str, int | None] = {role: None for role in ROLES}
        self._task: asyncio.Task[Outcome] | None = None
        self._guard = asyncio.Lock()

    @property
    def specs(self) -> dict[str, WorkerSpec]:
        return self.actuator.specs

    async def async_init(self) -> None:
        """Take the namespace's actuator lock; the current workers become the targets."""
        self.actuator.acquire()
        counts = await self.actuator.counts()
        self.targets = {role: counts[role] if role in self.specs else None for role in ROLES}

    async def validate_deployment(
        self,
        prefill_component_name: str | None = None,
        decode_component_name: str | None = None,
        require_prefill: bool = True,
        require_decode: bool = True,
    ) -> None:
        """Raise InvalidRequestError if a required role has no spec, or no node could ever hold one of its workers."""
        del prefill_component_name, decode_component_name
        largest = max((len(n.gpus) for n in self.actuator.manager.node_specs()), default=0)
        for role, required in ((PREFILL, require_prefill), (DECODE, require_decode)):
            if not required:
                continue
            spec = self.specs.get(role)
            if spec is None:
                raise InvalidRequestError(f"{role}: the planner requires {role} workers but no command was given")
            if spec.gpus > largest:
                raise InvalidRequestError(
                    f"{role}: a worker needs {spec.gpus} GPU(s) but the largest node has {largest}", key="gpus"
                )

    async def wait_for_deployment_ready(self, include_planner: bool = True) -> None:
        """Wait until the last ``set_component_replicas`` has converged (or ``ready_timeout_s`` passes)."""
        del include_planner
        task = self._task
        if task is not None:
            with_timeout = asyncio.wait_for(asyncio.shield(task), self.ready_timeout_s)
            try:
                await with_timeout
            except TimeoutError:
                log.warning("dynamo %s: not ready after %ss", self.actuator.namespace, self.ready_timeout_s)

    def get_model_name(self, require_prefill: bool = True, require_decode: bool = True) -> str:
        del require_prefill, require_decode
        return self.model_name

    def _held_gpus(self, role: str) -> int | None:
        held = [
            g for g in self.actuator.manager.held_by(self.actuator.component(role)) if g.allocation_state == "allocated"
        ]
        if held:
            return len(held[-1].record.devices)
        spec = self.specs.get(role)
        return spec.gpus if spec is not None else None

    def get_gpu_counts(
        self, require_prefill: bool = True, require_decode: bool = True
    ) -> tuple[int | None, int | None]:
        """GPUs per prefill and per decode worker: what a running worker's group holds, else the spec."""
        return (
            self._held_gpus(PREFILL) if require_prefill else None,
            self._held_gpus(DECODE) if require_decode else None,
        )

    def get_gpu_shapes(self, require_prefill: bool = True, require_decode: bool = True) -> tuple[Any, Any]:
        """``(prefill, decode)`` shapes: Dynamo's ``ComponentGPUShape`` if installed, else :class:`GpuShape`."""
        try:
            from dynamo.planner.monitoring.dgd_services import (  # type: ignore[import-not-found]
                ComponentGPUShape as shape,
            )
        except ImportError:
            shape = GpuShape
        p, d = self.get_gpu_counts(require_prefill, require_decode)
        return (shape(p, p) if p is not None else None, shape(d, d) if d is not None else None)

    async def get_actual_worker_counts(
        self, prefill_component_name: str | None = None, decode_component_name: str | None = None
    ) -> tuple[int, int, bool]:
        """Ready prefill and decode workers, and whether the deployment is stable.

        Ready as the actuator's readiness says (registered in Dynamo's discovery, where
        Dynamo's planner counts them, when there is an etcd). Stable, as Dynamo's
        Kubernetes connector reports it: no scaling under way, and every running worker
        ready and matching its target. A role whose name argument is None counts 0, and
        not against stability (as in Dynamo's connectors), when both are None all count.
        """
        wanted = {PREFILL: prefill_component_name is not None, DECODE: decode_component_name is not None}
        if not any(wanted.values()):
            wanted = {PREFILL: True, DECODE: True}
        counts = await self.actuator.counts()
        ready = await self.actuator.ready_counts()
        stable = (self._task is None or self._task.done()) and all(
            ready[r] == counts[r] and (t is None or ready[r] == t) for r, t in self.targets.items() if wanted[r]
        )
        return (ready[PREFILL] if wanted[PREFILL] else 0), (ready[DECODE] if wanted[DECODE] else 0), stable

    async def set_component_replicas(self, target_replicas: Sequence[Any], blocking: bool = True) -> None:
        """Set targets from Dynamo ``TargetReplica``s (``sub_component_type``, ``desired_replicas``) and converge.

        A target that cannot be met is converged as far as possible and reported (event
        ``dynamo-shortfall``); later calls keep converging toward it.
        """
        if not target_replicas:
            raise InvalidRequestError("target_replicas: empty", key="target_replicas")
        for t in target_replicas:
            role = _role(t.sub_component_type)
            desired = int(t.desired_replicas)
            if desired < 0:
                raise InvalidRequestError(f"desired_replicas: {desired} is negative", key="desired_replicas")
            self.targets[role] = desired
        async with self._guard:
            if self._task is not None and not self._task.done():
                await asyncio.shield(self._task)  # one convergence at a time; then converge on the new targets
            self._task = asyncio.get_running_loop().create_task(self.actuator.converge(dict(self.targets)))
        if blocking:
            await asyncio.shield(self._task)

    async def add_component(self, sub_component_type: Any, blocking: bool = True) -> None:
        """One more worker of a role (Dynamo's older connector API)."""
        role = _role(sub_component_type)
        counts = await self.actuator.counts()
        current = self.targets[role]
        await self._set(role, (counts[role] if current is None else current) + 1, blocking)

    async def remove_component(self, sub_component_type: Any, blocking: bool = True) -> None:
        """One worker fewer of a role (Dynamo's older connector API)."""
        role = _role(sub_component_type)
        counts = await self.actuator.counts()
        current = self.targets[role] if self.targets[role] is not None else counts[role]
        await self._set(role, max(0, (current or 0) - 1), blocking)

    async def _set(self, role: str, n: int, blocking: bool) -> None:
        @dataclass
        class _Target:
            sub_component_type: str
            desired_replicas: int

        await self.set_component_replicas([_Target(role, n)], blocking)

    def get_worker_info(self, sub_component_type: Any, backend: str = "vllm") -> Any:
        """Dynamo's ``WorkerInfo`` (or :class:`WorkerInfo`) for a role: its Dynamo component, endpoint and the model.

        ``component_name`` and ``endpoint`` are where the role's workers register in
        Dynamo's discovery: the planner finds them as
        ``{namespace}.{component_name}.{endpoint}``.
        """
        del backend
        role = _role(sub_component_type)
        try:
            from dynamo.planner.monitoring.worker_info import (  # type: ignore[import-not-found]
                WorkerInfo as info,
            )
        except ImportError:
            info = WorkerInfo
        return info(
            component_name=self.actuator.dynamo_component(role),
            endpoint=self.actuator.dynamo_endpoint(role),
            model_name=self.model_name,
        )

    async def close(self) -> None:
        """Wait for a running convergence and drop the namespace lock (workers keep running)."""
        if self._task is not None:
            with_exc = await asyncio.gather(self._task, return_exceptions=True)
            del with_exc
        self.actuator.release_lock()
