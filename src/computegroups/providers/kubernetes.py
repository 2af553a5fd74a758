"""The Kubernetes provider: nodes and GPUs from the API server, groups as pods and ResourceClaims.

Discovery lists nodes (optionally by label selector), the pods and ResourceClaims that
already hold GPUs, and the ``gpu.nvidia.com`` DRA ResourceSlices; the rules are in
:mod:`computegroups.providers.k8s.discovery`. Decisions and state stay with the manager;
pair this provider with :class:`~computegroups.state.kubernetes.KubernetesStateStore`
(``provider.state_store()``) so several managers on one cluster share one state.

Materialisation: an allocated group becomes a pod spec fragment pinned to its node
(node affinity on ``metadata.name``, so the scheduler still admits it) that requests
``nvidia.com/gpu`` - or, on a node with DRA slices, a ResourceClaim selecting the
group's exact devices by UUID. :meth:`KubernetesComputeResourceProvider.run_pod` creates a
pod from it; releasing the group deletes the pod and the claim.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from computegroups.errors import ProviderError
from computegroups.kube.client import KubeClient, KubeError, Obj
from computegroups.kube.names import cr_name
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
    node_health,
)
from computegroups.state.kubernetes import KubernetesStateStore

__all__ = ["GROUP_LABEL", "KubernetesComputeResourceProvider", "pod_fragment", "resource_claim"]

GROUP_LABEL = "computegroups.dev/group"
COMPONENT_ANNOTATION = "computegroups.dev/component"


def _label_value(text: str) -> str:
    """A label value (<= 63 of [A-Za-z0-9._-], alphanumeric at both ends) for an arbitrary id."""
    cleaned = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)[:63].strip("._-")
    return cleaned or "x"


def _object_name(group_id: str) -> str:
    return cr_name(group_id).replace(".", "-")[:63].strip("-")


def resource_claim(
    record: GroupRecord, namespace: str, *, device_class: str = DRA_DRIVER, labels: Mapping[str, str] | None = None
) -> Obj:
    """A ``resource.k8s.io/v1`` ResourceClaim for exactly the group's devices (by UUID)."""
    uuids = [d.uuid for d in record.devices]
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceClaim",
        "metadata": {
            "name": _object_name(record.id),
            "namespace": namespace,
            "labels": {**(labels or {}), MANAGED_BY: MANAGER_NAME, GROUP_LABEL: _label_value(record.id)},
        },
        "spec": {
            "devices": {
                "requests": [
                    {
                        "name": "gpus",
                        "exactly": {
                            "deviceClassName": device_class,
                            "allocationMode": "ExactCount",
                            "count": len(uuids),
                            "selectors": [
                                {
                                    "cel": {
                                        "expression": f'device.attributes["{DRA_DRIVER}"].uuid in {json.dumps(uuids)}'
                                    }
                                }
                            ],
                        },
                    }
                ]
            }
        },
    }


def pod_fragment(record: GroupRecord, *, dra: bool, claim_name: str | None = None) -> Obj:
    """The parts of a pod spec that bind it to a group: node affinity, GPU resources or claim, env.

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
    if dra and whole:
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
        self._discovered = Discovered()
        self._materialised: dict[str, str] = {}  # group id -> component

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
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    def cluster_identity(self, inventory: Inventory) -> str:
        """The API server and the namespace (nodes come and go; the cluster stays)."""
        server = self._client.server if self._client is not None else ""
        return f"kubernetes:{server}/{self.namespace}"

    def state_store(self) -> KubernetesStateStore:
        """A state store on the same cluster and namespace (its own connection)."""
        return KubernetesStateStore(
            self.kubeconfig,
            namespace=self.namespace,
            name=self.store_name,
            context=self.context,
            in_cluster=self.in_cluster,
        )

    async def _call(self, coro: Any) -> Obj:
        try:
            result: Obj = await coro
            return result
        except KubeError as exc:
            raise ProviderError(f"kubernetes: {exc.one_line()}") from exc

    async def _list_optional(self, path: str, **params: Any) -> list[Obj]:
        """List a DRA collection; an API the server does not serve gives nothing."""
        client = await self._connect()
        try:
            return list((await client.list(path, **params))["items"])
        except KubeError as exc:
            if exc.status == 404:
                return []
            raise ProviderError(f"kubernetes: {exc.one_line()}") from exc

    # -- discovery --------------------------------------------------------------------
    async def _discover(self) -> Discovered:
        client = await self._connect()
        nodes = (await self._call(client.list("/api/v1/nodes", labelSelector=self.node_selector)))["items"]
        pods = (
            await self._call(client.list("/api/v1/pods", fieldSelector="status.phase!=Succeeded,status.phase!=Failed"))
        )["items"]
        slices: list[Obj] = []
        claims: list[Obj] = []
        if self.dra not in (False, "false", "off"):
            slices = await self._list_optional(
                "/apis/resource.k8s.io/v1/resourceslices", fieldSelector=f"spec.driver={DRA_DRIVER}"
            )
            if slices:
                claims = await self._list_optional("/apis/resource.k8s.io/v1/resourceclaims")
        return build_node_specs(
            nodes,
            pods,
            slices,
            claims,
            tolerations=self.tolerations,
            include_cpu_nodes=self.include_cpu_nodes,
        )

    async def discover_resources(self) -> Inventory:
        found = await self._discover()
        self._discovered = found
        notes = list(found.notes)
        notes += [f"{n}: {why}; it takes no new groups" for n, why in sorted(found.cordoned.items())]
        if not found.nodes:
            where = f" matching {self.node_selector!r}" if self.node_selector else ""
            notes.append(f"no GPU nodes{where} (allocatable {GPU_RESOURCE} or {DRA_DRIVER} ResourceSlices)")
        return Inventory(
            tuple(found.nodes), source="kubernetes", notes=tuple(notes), cordoned=frozenset(found.cordoned)
        )

    async def sample_health(self) -> list[DeviceHealth]:
        """Every discovered GPU: unhealthy when its node is not Ready or its DRA device is tainted."""
        found = await self._discover()
        tainted = {
            str(g.uuid): device_taint(found.devices[(n.id, g.index)])
            for n in found.nodes
            for g in n.gpus
            if (n.id, g.index) in found.devices
        }
        out: list[DeviceHealth] = []
        for spec in self._discovered.nodes:
            node = found.raw_nodes.get(spec.id)
            node_reason = node_health(node) if node is not None else "node is gone"
            for g in spec.gpus:
                reason = node_reason or tainted.get(g.uuid, "")
                out.append(DeviceHealth(spec.id, g.index, healthy=not reason, reason=reason))
        return out

    # -- materialisation --------------------------------------------------------------
    def _is_dra(self, node_id: str) -> bool:
        return node_id in self._discovered.dra_nodes

    async def allocate_resources(self, component_name: str, resources: dict[str, Any]) -> dict[str, Any]:
        """Make the ResourceClaim of a DRA group; return the env and the pod fragment."""
        gid = str(resources["group_id"])
        record = _record_of(resources)
        out: dict[str, Any] = {"env": dict(resources.get("env", {}))}
        if record is not None:
            dra = self._is_dra(record.node_id) and any(d.share_milli == MILLI for d in record.devices)
            if dra:
                await self._ensure_claim(record)
                out["resource_claim"] = _object_name(record.id)
            out["pod"] = pod_fragment(record, dra=dra)
        self._materialised[gid] = component_name
        return out

    async def _ensure_claim(self, record: GroupRecord) -> str:
        client = await self._connect()
        claim = resource_claim(record, self.namespace, device_class=self.device_class, labels=self.labels)
        try:
            await client.post(f"/apis/resource.k8s.io/v1/namespaces/{self.namespace}/resourceclaims", claim)
        except KubeError as exc:
            if exc.status != 409:
                raise ProviderError(f"kubernetes: {exc.one_line()}") from exc
        return str(claim["metadata"]["name"])

    async def deallocate_resources(self, component_name: str, resource_ids: list[str]) -> bool:
        """Delete the pods and ResourceClaims of the groups; False if there were none."""
        client = await self._connect()
        changed = False
        for gid in resource_ids:
            self._materialised.pop(gid, None)
            selector = f"{GROUP_LABEL}={_label_value(gid)}"
            for path in (
                f"/api/v1/namespaces/{self.namespace}/pods",
                f"/apis/resource.k8s.io/v1/namespaces/{self.namespace}/resourceclaims",
            ):
                try:
                    gone = await client.delete_collection(path, labelSelector=selector)
                except KubeError as exc:
                    if exc.status == 404:
                        continue
                    raise ProviderError(f"kubernetes: {exc.one_line()}") from exc
                changed = changed or bool(gone.get("items"))
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
        dra = self._is_dra(record.node_id) and any(d.share_milli == MILLI for d in record.devices)
        if dra:
            await self._ensure_claim(record)
        frag = pod_fragment(record, dra=dra)
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
                "labels": {**self.labels, MANAGED_BY: MANAGER_NAME, GROUP_LABEL: _label_value(record.id)},
                "annotations": {COMPONENT_ANNOTATION: record.component or "", "computegroups.dev/group-id": record.id},
            },
            "spec": spec,
        }
        made = await self._call(client.post(f"/api/v1/namespaces/{self.namespace}/pods", pod))
        status = {"pod": made["metadata"]["name"], **({"resourceClaim": _object_name(record.id)} if dra else {})}
        with contextlib.suppress(KubeError):  # for `kubectl get computegroups -o wide`; the pod exists anyway
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
