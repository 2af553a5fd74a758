"""The Kubernetes provider: nodes and GPUs from the API server, groups as pods and ResourceClaims.

Discovery follows nodes (optionally by label selector), the pods and ResourceClaims that
hold GPUs, and the ``gpu.nvidia.com`` DRA ResourceSlices: each is listed once and then watched
(:mod:`computegroups.kube.informer`), every discovery and health sample is built from those
caches, and each change sets :meth:`KubernetesComputeResourceProvider.changes`, so an open manager
takes it in at once (``monitor.Follower``); the rules are in
:mod:`computegroups.providers.k8s.discovery`. Decisions and state stay with the manager;
pair this provider with :class:`~computegroups.state.kubernetes.KubernetesStateStore`
(``provider.state_store()``) so several managers on one cluster share one state.

Materialisation: an allocated group becomes a pod spec fragment pinned to its node
(node affinity on ``metadata.name``, so the scheduler still admits it) that requests
``nvidia.com/gpu`` - or, on a node with DRA slices, a ResourceClaim selecting the
group's exact devices by UUID. A share of a GPU (``gpus: 0.5``) gets a claim where its device
is shareable (DRA consumable capacity: the claim asks its part of the device's ``shares``,
1000 a GPU, and of its memory), else only its environment.
:meth:`KubernetesComputeResourceProvider.run_pod` creates a pod from it; releasing the group
deletes the pod and the claim.

Identity: a GPU keeps its index and UUID whatever other workloads hold; devices they hold are
reported taken (``Inventory.unavailable`` and, on each health sample, unhealthy with a
``taken: ...`` reason), so nothing new is put there and they are not counted free.

Clean-up is durable: the pods and claims themselves, labelled with the group and the store,
are the record of what was materialised. A deletion that fails is retried in the background
by this provider, and every discovery and health sample (manager open, reconcile, each
monitor round) deletes this store's pods and claims whose group no longer holds capacity,
so a clean-up a manager could not finish is finished by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from computegroups.errors import ProviderError, StateError
from computegroups.kube.client import KubeClient, KubeError, Obj
from computegroups.kube.informer import Informer
from computegroups.kube.names import STORE_LABEL, cr_name
from computegroups.model import MILLI, AllocationState, ComputeGroup, DeviceShare, GroupRecord, group_env
from computegroups.providers.base import ComputeResourceProvider, DeviceHealth, Inventory
from computegroups.providers.k8s.discovery import (
    DRA_DRIVER,
    GPU_RESOURCE,
    MANAGED_BY,
    MANAGER_NAME,
    Discovered,
    build_node_specs,
    device_taint,
    is_ours,
    node_health,
    node_view,
    pod_requests,
    share_capacity,
)
from computegroups.retry import backoff_s
from computegroups.state.kubernetes import KubernetesStateStore
from computegroups.tasks import stop_task

__all__ = ["GROUP_LABEL", "KubernetesComputeResourceProvider", "pod_fragment", "resource_claim"]

log = logging.getLogger("computegroups.k8s")

GROUP_LABEL = "computegroups.dev/group"
GROUP_ANNOTATION = "computegroups.dev/group-id"
COMPONENT_ANNOTATION = "computegroups.dev/component"
RETRY_FIRST_S = 0.5  # first wait before a failed clean-up is tried again (doubling, jittered, capped)
RETRY_MAX_S = 30.0


def _label_value(text: str) -> str:
    """A label value (<= 63 of [A-Za-z0-9._-], alphanumeric at both ends) for an arbitrary id."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:63].strip("._-")
    return cleaned or "x"


def _object_name(group_id: str) -> str:
    return cr_name(group_id).replace(".", "-")[:63].strip("-")


def resource_claim(
    record: GroupRecord,
    namespace: str,
    *,
    device_class: str = DRA_DRIVER,
    labels: Mapping[str, str] | None = None,
    store: str = "default",
    capacity: Mapping[str, str] | None = None,
) -> Obj:
    """A ``resource.k8s.io/v1`` ResourceClaim for exactly the group's devices (by UUID).

    ``capacity``: the ``capacity.requests`` of a share (from
    :func:`~computegroups.providers.k8s.discovery.share_capacity`); without it each device is
    claimed whole.
    """
    uuids = [d.uuid for d in record.devices]
    exactly: dict[str, Any] = {
        "deviceClassName": device_class,
        "allocationMode": "ExactCount",
        "count": len(uuids),
        "selectors": [{"cel": {"expression": f'device.attributes["{DRA_DRIVER}"].uuid in {json.dumps(uuids)}'}}],
    }
    if capacity:
        exactly["capacity"] = {"requests": dict(capacity)}
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {
            "name": _object_name(record.id),
            "namespace": namespace,
            "labels": {
                **(labels or {}),
                MANAGED_BY: MANAGER_NAME,
                GROUP_LABEL: _label_value(record.id),
                STORE_LABEL: store,
            },
            "annotations": {GROUP_ANNOTATION: record.id},
        },
        "spec": {"devices": {"requests": [{"name": "gpus", "exactly": exactly}]}},
    }


def pod_fragment(record: GroupRecord, *, dra: bool, claim_name: str | None = None) -> Obj:
    """The parts of a pod spec that bind it to a group: node affinity, GPU resources or claim, env.

    ``dra``: the group's devices are claimed by a ResourceClaim (:func:`resource_claim`, whole
    GPUs or a share); otherwise whole GPUs are asked of the device plugin and a share gets
    only its environment.
    ``{"affinity": ..., "resourceClaims": [...]?, "container": {"resources": ..., "env": [...]}}``.
    """
    whole = [d for d in record.devices if d.share_milli == MILLI]
    container: dict[str, Any] = {}
    limits: dict[str, str] = {}
    if record.cpus_milli:
        limits["cpu"] = f"{record.cpus_milli}m"
    if record.memory_mib:
        limits["memory"] = f"{record.memory_mib}Mi"
    out: dict[str, Any] = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": [record.node_id]}]}
                    ]
                }
            }
        }
    }
    env = group_env(record)
    if dra and record.devices:
        out["resourceClaims"] = [{"name": "gpus", "resourceClaimName": claim_name or _object_name(record.id)}]
        container["resources"] = {"claims": [{"name": "gpus"}]}
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the DRA driver exposes exactly the claimed devices
    elif whole:
        limits[GPU_RESOURCE] = str(len(whole))
        env.pop("CUDA_VISIBLE_DEVICES", None)  # the device plugin picks and exposes the devices
    if limits:
        container.setdefault("resources", {})["limits"] = limits
        container["resources"]["requests"] = dict(limits)
    container["env"] = [{"name": k, "value": v} for k, v in sorted(env.items())]
    out["container"] = container
    return out


class KubernetesComputeResourceProvider(ComputeResourceProvider):
    """Compute on a Kubernetes cluster (see the module docstring).

    ``kubeconfig`` (path) / ``context``, or in-cluster configuration when running in a pod
    (``in_cluster=None`` chooses). Kubernetes-specific options:
    ``namespace`` (where state objects, pods and claims go), ``node_selector`` (a label
    selector limiting discovery, e.g. ``"nvidia.com/gpu.present=true"``), ``labels`` (added to
    the pods and claims made), ``priority_class``, ``tolerations`` (added to pods; taints they
    tolerate do not cordon a node), ``dra`` (``"auto"``: use ResourceSlices where present;
    ``False``: never), ``device_class``, ``include_cpu_nodes``, ``store_name``.
    """

    name = "kubernetes"

    def __init__(
        self,
        kubeconfig: str | os.PathLike[str] | None = None,
        *,
        context: str | None = None,
        in_cluster: bool | None = None,
        namespace: str = "computegroups",
        node_selector: str | None = None,
        labels: Mapping[str, str] | None = None,
        priority_class: str | None = None,
        tolerations: Sequence[Mapping[str, Any]] = (),
        dra: bool | str = "auto",
        device_class: str = DRA_DRIVER,
        include_cpu_nodes: bool = False,
        store_name: str = "default",
    ) -> None:
        self.kubeconfig = kubeconfig
        self.context = context
        self.in_cluster = in_cluster
        self.namespace = namespace
        self.node_selector = node_selector
        self.labels = dict(labels or {})
        self.priority_class = priority_class
        self.tolerations = [dict(t) for t in tolerations]
        self.dra = dra
        self.device_class = device_class
        self.include_cpu_nodes = include_cpu_nodes
        self.store_name = store_name
        self._client: KubeClient | None = None
        self._informers: tuple[Informer, Informer, Informer, Informer] | None = None
        self._changed = asyncio.Event()
        self._discovered = Discovered()
        self._materialised: dict[str, str] = {}  # group id -> component
        self._made: dict[str, set[str]] = {}  # group id -> API paths of the pods and claims made here
        self._retry: dict[str, set[str] | None] = {}  # group id -> paths left to delete (None: by label)
        self._retry_task: asyncio.Task[None] | None = None
        self._own_store = False  # state_store() was asked for: this provider's store is the manager's
        self._manager_store: KubernetesStateStore | None = None
        self._reader: KubernetesStateStore | None = None  # reads the records, for held slots and clean-up
        self._records: dict[str, GroupRecord] = {}
        self._records_rev = -1
        self._store_key = (namespace, store_name)

    # -- lifecycle --------------------------------------------------------------------
    async def __aenter__(self) -> KubernetesComputeResourceProvider:
        await self._connect()
        return self

    async def _connect(self) -> KubeClient:
        if self._client is None:
            try:
                self._client = await KubeClient.create(self.kubeconfig, self.context, in_cluster=self.in_cluster)
            except KubeError as exc:
                raise ProviderError(f"kubernetes: {exc.one_line()}") from exc
        return self._client

    async def close(self) -> None:
        informers, self._informers = self._informers or (), None
        for informer in informers:
            await informer.close()
        task, self._retry_task = self._retry_task, None
        await stop_task(task)
        if self._reader is not None:
            reader, self._reader = self._reader, None
            await reader.close()
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def cluster_identity(self, inventory: Inventory) -> str:
        """The API server and the namespace (nodes come and go; the cluster stays)."""
        server = self._client.server if self._client is not None else ""
        return f"kubernetes:{server}/{self.namespace}"

    def state_store(self) -> KubernetesStateStore:
        """A state store on the same cluster and namespace (its own connection).

        Asking for it tells the provider that its store holds the manager's records: discovery then
        reads them to keep other pods off our device-plugin GPU slots and to finish clean-ups.
        """
        self._own_store = True
        self._manager_store = self._store()
        return self._manager_store

    def _store(self) -> KubernetesStateStore:
        return KubernetesStateStore(
            self.kubeconfig,
            namespace=self.namespace,
            name=self.store_name,
            context=self.context,
            in_cluster=self.in_cluster,
        )

    async def _live_records(self) -> list[GroupRecord] | None:
        """The records of this provider's store (None: not known, the manager keeps its state elsewhere)."""
        if not self._own_store:
            return None
        try:
            if self._reader is None:
                reader = self._store()
                await reader.open()
                self._reader = reader
            changes = await self._reader.changes_since(self._records_rev)
        except StateError as exc:
            log.warning("kubernetes: cannot read the groups of store %s: %s", self.store_name, exc)
            return None
        if changes.full:
            self._records = {r.id: r for r in changes.upserts}
        else:
            for r in changes.upserts:
                self._records[r.id] = r
            for gid in changes.deletes:
                self._records.pop(gid, None)
        self._records_rev = changes.revision
        return list(self._records.values())

    async def _call(self, coro: Any) -> Obj:
        try:
            result: Obj = await coro
            return result
        except KubeError as exc:
            raise ProviderError(f"kubernetes: {exc.one_line()}") from exc

    async def _follow(self) -> tuple[Informer, Informer, Informer, Informer]:
        """The informers of nodes, pods, ResourceSlices and ResourceClaims, started (listed) on first use.

        Where the server does not serve DRA (``404``), or with ``dra=False``, slices and claims stay empty.
        """
        if self._informers is None:
            client = await self._connect()
            store = self._store_key

            def ours(obj: Obj) -> bool:  # made by this store (any manager of it): held by its records already
                return is_ours(obj, store)

            nodes, pods, slices, claims = (
                Informer(client, path, params=params, changed=self._changed, relevant=relevant, quiet=quiet)
                for path, params, relevant, quiet in (
                    ("/api/v1/nodes", {"labelSelector": self.node_selector}, node_view, None),  # not heartbeats
                    ("/api/v1/pods", {"fieldSelector": "status.phase!=Succeeded,status.phase!=Failed"}, None, ours),
                    (
                        "/apis/resource.k8s.io/v1/resourceslices",
                        {"fieldSelector": f"spec.driver={DRA_DRIVER}"},
                        None,
                        None,
                    ),
                    ("/apis/resource.k8s.io/v1/resourceclaims", {}, None, ours),
                )
            )
            try:
                await nodes.start()
                await pods.start()
                if self.dra not in (False, "false", "off"):
                    try:
                        await slices.start()
                        await claims.start()
                    except KubeError as exc:
                        if exc.status != 404:
                            raise
                        await slices.close()
            except BaseException as exc:
                for informer in (nodes, pods, slices, claims):
                    await informer.close()
                if isinstance(exc, KubeError):
                    raise ProviderError(f"kubernetes: {exc.one_line()}") from exc
                raise
            self._informers = (nodes, pods, slices, claims)
        return self._informers

    def changes(self) -> asyncio.Event:
        """Set whenever a node, pod, ResourceSlice or ResourceClaim changed since it was cleared."""
        return self._changed

    # -- discovery --------------------------------------------------------------------
    async def _discover(self) -> Discovered:
        """List what discovery needs, then read our records, then build; sweeps leftover pods and claims.

        The order matters for the sweep: a pod or claim is made only after its group is committed,
        so every one listed here has its group in the records read after it.
        """
        nodes, pods, slices, claims = (list(i.items.values()) for i in await self._follow())
        store = (self.namespace, self.store_name)
        slots = {n["metadata"]["name"] for n in nodes if (n.get("metadata") or {}).get("name")}
        slots -= {str((s.get("spec") or {}).get("nodeName")) for s in slices}
        needed = any(self._ours(o) for o in [*pods, *claims]) or any(  # clean-up, or GPU slots to choose
            (p.get("spec") or {}).get("nodeName") in slots and not is_ours(p, store) and pod_requests(p)[0]
            for p in pods
        )
        records = await self._live_records() if needed else None
        held: dict[str, set[int]] = {}
        for r in records or ():
            if r.holds_capacity:
                held.setdefault(r.node_id, set()).update(d.index for d in r.devices)
        found = build_node_specs(
            nodes,
            pods,
            slices,
            claims,
            tolerations=self.tolerations,
            include_cpu_nodes=self.include_cpu_nodes,
            held=held,
            previous=self._discovered.taken,
            store=store,
        )
        if records is not None:
            await self._sweep(pods, claims, records)
        return found

    async def discover_resources(self) -> Inventory:
        found = await self._discover()
        self._discovered = found
        notes = list(found.notes)
        notes += [f"{n}: {why}; it takes no new groups" for n, why in sorted(found.cordoned.items())]
        if not found.nodes:
            where = f" matching {self.node_selector!r}" if self.node_selector else ""
            notes.append(f"no GPU nodes{where} (allocatable {GPU_RESOURCE} or {DRA_DRIVER} ResourceSlices)")
        return Inventory(
            tuple(found.nodes),
            source="kubernetes",
            notes=tuple(notes),
            cordoned=frozenset(found.cordoned),
            unavailable=dict(found.taken),
        )

    async def sample_health(self) -> list[DeviceHealth]:
        """Every discovered GPU: unhealthy when its node is not Ready, its DRA device is tainted, or
        another workload holds it (``taken: ...``). Indices are those of discovery, which never move."""
        found = await self._discover()
        tainted = {
            str(g.uuid): device_taint(found.devices[(n.id, g.index)])
            for n in found.nodes
            for g in n.gpus
            if (n.id, g.index) in found.devices
        }
        now = {n.id: n for n in found.nodes}
        out: list[DeviceHealth] = []
        for spec in self._discovered.nodes:
            node = found.raw_nodes.get(spec.id)
            node_reason = node_health(node) if node is not None else "node is gone"
            current = now.get(spec.id)
            for g in spec.gpus:
                reason = node_reason or tainted.get(g.uuid, "")
                same = current is not None and g.index < len(current.gpus) and current.gpus[g.index].uuid == g.uuid
                if not reason and same:
                    reason = found.taken.get((spec.id, g.index), "")
                out.append(DeviceHealth(spec.id, g.index, healthy=not reason, reason=reason))
        self._discovered.taken = {k: v for k, v in found.taken.items() if k[0] in now}
        return out

    # -- clean-up ---------------------------------------------------------------------
    def _ours(self, obj: Obj) -> str | None:
        """The group id of a pod or claim this provider's store materialised (None: not ours to judge)."""
        meta = obj.get("metadata") or {}
        if (meta.get("labels") or {}).get(STORE_LABEL) != self.store_name or not is_ours(obj, self._store_key):
            return None
        gid = (meta.get("annotations") or {}).get(GROUP_ANNOTATION)
        return str(gid) if gid else None

    async def _sweep(self, pods: Sequence[Obj], claims: Sequence[Obj], records: Sequence[GroupRecord]) -> None:
        """Delete our pods and claims whose group holds nothing any more (released, freed, deleted)."""
        live = {r.id for r in records if r.component is not None and r.state is not AllocationState.RELEASED}
        base = {"pods": f"/api/v1/namespaces/{self.namespace}/pods"}
        base["claims"] = f"/apis/resource.k8s.io/v1/namespaces/{self.namespace}/resourceclaims"
        for kind, obj in [*(("pods", p) for p in pods), *(("claims", c) for c in claims)]:
            gid = self._ours(obj)
            meta = obj.get("metadata") or {}
            if gid is None or gid in live or meta.get("deletionTimestamp"):
                continue
            path = f"{base[kind]}/{meta['name']}"
            try:
                await self._delete(path, str(meta.get("uid") or ""))
                log.info("kubernetes: deleted %s of released group %s", path, gid)
            except KubeError as exc:
                log.warning("kubernetes: cannot delete %s of released group %s yet: %s", path, gid, exc.one_line())

    async def _delete(self, path: str, uid: str = "") -> bool:
        """Delete one object; False if it was already gone. KubeError on any other failure."""
        client = await self._connect()
        try:
            await client.delete(path, {"preconditions": {"uid": uid}} if uid else None)
        except KubeError as exc:
            if exc.status in (404, 409):  # gone, or a new object of that name (not ours to delete)
                return False
            raise
        return True

    async def _clean(self, gid: str, paths: set[str] | None) -> bool:
        """Delete what group ``gid`` was materialised as; ``paths`` is left holding what failed."""
        if paths is None:  # made elsewhere: find them by label
            client = await self._connect()
            selector = f"{GROUP_LABEL}={_label_value(gid)}"
            changed = False
            for path in (
                f"/api/v1/namespaces/{self.namespace}/pods",
                f"/apis/resource.k8s.io/v1/namespaces/{self.namespace}/resourceclaims",
            ):
                try:
                    gone = await client.delete_collection(path, labelSelector=selector)
                except KubeError as exc:
                    if exc.status == 404:
                        continue
                    raise
                changed = changed or bool(gone.get("items"))
            return changed
        changed = False
        for path in sorted(paths, key=lambda p: "resourceclaims" in p):  # the pod first, then its claim
            changed = await self._delete(path) or changed
            paths.discard(path)
        return changed

    def _retry_later(self, gid: str, paths: set[str] | None) -> None:
        self._retry[gid] = paths
        if self._retry_task is None or self._retry_task.done():
            self._retry_task = asyncio.get_running_loop().create_task(
                self._retry_loop(), name="computegroups-k8s-clean"
            )

    async def _retry_loop(self) -> None:
        """Try the failed clean-ups again, round after round, backing off from RETRY_FIRST_S to RETRY_MAX_S."""
        rounds = 0
        while self._retry:
            rounds += 1
            await asyncio.sleep(backoff_s(rounds, initial_s=RETRY_FIRST_S, max_s=RETRY_MAX_S, jitter=0.1))
            for gid, paths in list(self._retry.items()):
                try:
                    await self._clean(gid, paths)
                except (KubeError, ProviderError) as exc:
                    log.info("kubernetes: clean-up of group %s failed again: %s", gid, exc)
                    continue
                self._retry.pop(gid, None)
                log.info("kubernetes: clean-up of group %s finished", gid)

    # -- materialisation --------------------------------------------------------------
    def _claim_of(self, record: GroupRecord) -> tuple[bool, dict[str, str] | None]:
        """Whether the group's devices are claimed, and the capacity a share's claim asks for."""
        if record.node_id not in self._discovered.dra_nodes or not record.devices:
            return False, None
        if any(d.share_milli == MILLI for d in record.devices):
            return True, None
        if len(record.devices) != 1:
            return False, None
        share = record.devices[0]
        device = self._discovered.devices.get((record.node_id, share.index))
        capacity = share_capacity(device, share.share_milli, share.memory_mib) if device is not None else None
        return capacity is not None, capacity

    async def allocate_resources(self, component_name: str, resources: dict[str, Any]) -> dict[str, Any]:
        """Make the ResourceClaim of a DRA group; return the env and the pod fragment."""
        gid = str(resources["group_id"])
        record = _record_of(resources)
        out: dict[str, Any] = {"env": dict(resources.get("env", {}))}
        self._made.setdefault(gid, set())
        if record is not None:
            dra, capacity = self._claim_of(record)
            if dra:
                await self._ensure_claim(record, capacity)
                out["resource_claim"] = _object_name(record.id)
            out["pod"] = pod_fragment(record, dra=dra)
        self._materialised[gid] = component_name
        return out

    async def _ensure_claim(self, record: GroupRecord, capacity: Mapping[str, str] | None) -> str:
        client = await self._connect()
        claim = resource_claim(
            record,
            self.namespace,
            device_class=self.device_class,
            labels=self.labels,
            store=self.store_name,
            capacity=capacity,
        )
        path = f"/apis/resource.k8s.io/v1/namespaces/{self.namespace}/resourceclaims"
        try:
            await client.post(path, claim)
        except KubeError as exc:
            if exc.status != 409:
                raise ProviderError(f"kubernetes: {exc.one_line()}") from exc
        name = str(claim["metadata"]["name"])
        self._made.setdefault(record.id, set()).add(f"{path}/{name}")
        return name

    async def deallocate_resources(self, component_name: str, resource_ids: list[str]) -> bool:
        """Delete the pods and ResourceClaims of the groups; False if there were none.

        What this provider made is deleted by name, and nothing is sent for a group it
        materialised without a pod or claim; a group materialised elsewhere is found by label.
        A deletion that fails is retried in the background until done (and swept by any
        manager's next discovery); the failure is raised as ProviderError.
        """
        changed = False
        failed: list[str] = []
        for gid in resource_ids:
            self._materialised.pop(gid, None)
            paths = self._made.pop(gid, None)
            if paths is not None and not paths:
                continue  # materialised here as environment only: nothing to delete
            try:
                changed = await self._clean(gid, paths) or changed
            except KubeError as exc:
                self._retry_later(gid, paths)
                failed.append(f"{gid}: {exc.one_line()}")
        if failed:
            raise ProviderError(f"kubernetes: clean-up will be retried: {'; '.join(failed)}")
        return changed

    async def run_pod(
        self,
        group: ComputeGroup | GroupRecord,
        image: str,
        command: Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        restart_policy: str = "Never",
    ) -> Obj:
        """Create a pod running ``command`` in ``image`` on the group's node and devices; returns it.

        The pod is labelled with the group, so releasing the group deletes it.
        """
        record = group.record if isinstance(group, ComputeGroup) else group
        client = await self._connect()
        dra, capacity = self._claim_of(record)
        if dra:
            await self._ensure_claim(record, capacity)
        frag = pod_fragment(record, dra=dra)
        self._made.setdefault(record.id, set())
        container: dict[str, Any] = {"name": "main", "image": image, "command": list(command), **frag["container"]}
        container["env"] = container["env"] + [{"name": k, "value": v} for k, v in sorted((env or {}).items())]
        spec: dict[str, Any] = {
            "restartPolicy": restart_policy,
            "affinity": frag["affinity"],
            "containers": [container],
        }
        if "resourceClaims" in frag:
            spec["resourceClaims"] = frag["resourceClaims"]
        if self.priority_class:
            spec["priorityClassName"] = self.priority_class
        if self.tolerations:
            spec["tolerations"] = self.tolerations
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name or _object_name(record.id),
                "namespace": self.namespace,
                "labels": {
                    **self.labels,
                    MANAGED_BY: MANAGER_NAME,
                    GROUP_LABEL: _label_value(record.id),
                    STORE_LABEL: self.store_name,
                },
                "annotations": {COMPONENT_ANNOTATION: record.component or "", GROUP_ANNOTATION: record.id},
            },
            "spec": spec,
        }
        made = await self._call(client.post(f"/api/v1/namespaces/{self.namespace}/pods", pod))
        self._made.setdefault(record.id, set()).add(
            f"/api/v1/namespaces/{self.namespace}/pods/{made['metadata']['name']}"
        )
        status = {"pod": made["metadata"]["name"], **({"resourceClaim": _object_name(record.id)} if dra else {})}
        with contextlib.suppress(KubeError, StateError):  # for `kubectl get cg -o wide`; the pod exists anyway
            if self._manager_store is not None:
                await self._manager_store.flush()  # the group object is written after the commit
            await client.request(
                "PATCH",
                f"/apis/computegroups.dev/v1alpha1/namespaces/{self.namespace}/computegroups/"
                f"{cr_name(record.id, self.store_name)}/status",
                {"status": status},
                content_type="application/merge-patch+json",
            )
        return made

    async def get_resource_state(self) -> dict[str, Any]:
        return {
            "provider": self.name,
            "namespace": self.namespace,
            "nodes": [n.id for n in self._discovered.nodes],
            "dra_nodes": sorted(self._discovered.dra_nodes),
            "cordoned": dict(self._discovered.cordoned),
            "materialised": dict(self._materialised),
        }


def _record_of(resources: Mapping[str, Any]) -> GroupRecord | None:
    """The group as the manager describes it to ``allocate_resources`` (its ``resources`` view)."""
    try:
        gpus = float(resources.get("gpus", 0))
        share = MILLI if gpus >= 1 else round(gpus * MILLI)
        devices = tuple(
            DeviceShare(int(i), str(u), share, int(m))
            for i, u, m in zip(
                resources.get("gpu_indices", ()),
                resources.get("gpu_uuids", ()),
                resources.get("gpu_memory_mib", ()),
                strict=True,
            )
        )
        return GroupRecord(
            id=str(resources["group_id"]),
            node_id=str(resources["node_id"]),
            state=AllocationState.ALLOCATED,
            component=None,
            devices=devices,
            cpus_milli=round(float(resources.get("cpus", 0)) * MILLI),
            memory_mib=int(resources.get("memory_mib", 0)),
        )
    except (KeyError, TypeError, ValueError):
        return None
