"""An asyncio client of ``computegroups serve`` with the manager's own method names and errors.

::

    async with ComputeGroupsClient("http://127.0.0.1:8470") as cg:
        group = await cg.allocate_compute_group("decode", {"gpus": 2})
        await cg.deallocate_compute_group(group.id)

Each method sends one request and returns what the manager's method returns (groups as
:class:`~computegroups.service.wire.RemoteComputeGroup`, with the same properties), or raises the
same typed error. A connection failure is a :class:`~computegroups.errors.ProviderError`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp

from computegroups.errors import InvalidRequestError, ProviderError
from computegroups.model import check_text
from computegroups.service.wire import RemoteComputeGroup, error_from_body, group_from_json

__all__ = ["ComputeGroupsClient"]


def _path_part(name: str, value: object) -> str:
    return quote(check_text(name, value, what="a name or id"), safe="")


class ComputeGroupsClient:
    """The HTTP API of one ``computegroups serve``, as the manager's async methods."""

    def __init__(self, base_url: str, *, timeout_s: float = 30.0) -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InvalidRequestError("base_url: an http:// or https:// URL", key="base_url")
        self.base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ComputeGroupsClient:
        self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, path: str, body: Mapping[str, Any] | None = None, headers: Mapping[str, str] | None = None
    ) -> Any:
        if self._session is None:
            raise ProviderError("ComputeGroupsClient is not open; use 'async with'")
        try:
            async with self._session.request(method, self.base_url + path, json=body, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
        except aiohttp.ClientError as exc:
            raise ProviderError(f"{method} {self.base_url}{path}: {exc}") from exc
        try:
            data = json.loads(text) if text else None
        except ValueError:
            raise ProviderError(f"{method} {path}: HTTP {status}, not JSON") from None
        if status >= 400:
            raise error_from_body(status, data if isinstance(data, dict) else {})
        return data

    # -- the manager's methods ------------------------------------------------------------------
    async def list_compute_nodes(self) -> list[dict[str, Any]]:
        """Each node's ``to_dict()``."""
        return list(await self._call("GET", "/v1/nodes"))

    async def list_compute_groups(self, filters: Mapping[str, Any] | None = None) -> list[RemoteComputeGroup]:
        if filters is not None and not isinstance(filters, Mapping):
            raise InvalidRequestError("filters: a mapping", key="filters")
        query = "&".join(
            f"{quote(str(k), safe='')}={quote(str(v).lower() if isinstance(v, bool) else str(v), safe='')}"
            for k, v in (filters or {}).items()
        )
        return [group_from_json(g) for g in await self._call("GET", "/v1/groups" + (f"?{query}" if query else ""))]

    async def get_compute_group(self, group_id: object) -> RemoteComputeGroup:
        return group_from_json(await self._call("GET", f"/v1/groups/{_path_part('group_id', group_id)}"))

    async def allocate_compute_group(
        self, component_name: object, resource_requirements: Any, constraints: Any = None
    ) -> RemoteComputeGroup:
        body: dict[str, Any] = {"component": component_name, "requirements": _plain(resource_requirements)}
        if constraints is not None:
            body["constraints"] = _plain(constraints)
        return group_from_json(await self._call("POST", "/v1/groups", body))

    async def reserve_compute_group(
        self, component_name: object, resource_requirements: Any, constraints: Any = None, ttl_seconds: object = 300.0
    ) -> RemoteComputeGroup:
        body: dict[str, Any] = {
            "component": component_name,
            "requirements": _plain(resource_requirements),
            "ttl_seconds": ttl_seconds,
        }
        if constraints is not None:
            body["constraints"] = _plain(constraints)
        return group_from_json(await self._call("POST", "/v1/reservations", body))

    async def create_compute_group(self, resources: Any, node_id: object = None) -> RemoteComputeGroup:
        body: dict[str, Any] = {"resources": _plain(resources)}
        if node_id is not None:
            body["node_id"] = node_id
        return group_from_json(await self._call("POST", "/v1/carved", body))

    async def delete_compute_group(self, group_id: object) -> bool:
        return bool((await self._call("DELETE", f"/v1/carved/{_path_part('group_id', group_id)}"))["deleted"])

    async def deallocate_compute_group(self, group_id: object) -> bool:
        return bool((await self._call("DELETE", f"/v1/groups/{_path_part('group_id', group_id)}"))["released"])

    async def drain_compute_group(self, group_id: object) -> bool:
        return bool((await self._call("POST", f"/v1/groups/{_path_part('group_id', group_id)}/drain"))["drained"])

    async def cordon_node(self, node_id: object, reason: object = None) -> bool:
        body = {} if reason is None else {"reason": reason}
        return bool((await self._call("POST", f"/v1/nodes/{_path_part('node_id', node_id)}/cordon", body))["changed"])

    async def uncordon_node(self, node_id: object) -> bool:
        return bool((await self._call("POST", f"/v1/nodes/{_path_part('node_id', node_id)}/uncordon"))["changed"])

    async def drain_node(self, node_id: object, reason: object = None) -> list[RemoteComputeGroup]:
        body = {} if reason is None else {"reason": reason}
        answer = await self._call("POST", f"/v1/nodes/{_path_part('node_id', node_id)}/drain", body)
        return [group_from_json(g) for g in answer["drained"]]

    async def get_allocation_summary(self) -> dict[str, Any]:
        return dict(await self._call("GET", "/v1/summary"))

    async def get_component_allocations(self, component_name: object) -> list[RemoteComputeGroup]:
        path = f"/v1/components/{_path_part('component_name', component_name)}/groups"
        return [group_from_json(g) for g in await self._call("GET", path)]

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The server's events as they happen (server-sent events), each as a dict."""
        if self._session is None:
            raise ProviderError("ComputeGroupsClient is not open; use 'async with'")
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        try:
            async with self._session.get(self.base_url + "/v1/events", timeout=timeout) as resp:
                async for line in resp.content:
                    if line.startswith(b"data: "):
                        yield json.loads(line[6:])
        except aiohttp.ClientError as exc:
            raise ProviderError(f"GET {self.base_url}/v1/events: {exc}") from exc


def _plain(value: Any) -> Any:
    """Requirements or constraints as JSON: a mapping as is, a model object by its ``to_dict``."""
    to_dict = getattr(value, "to_dict", None)
    return to_dict() if callable(to_dict) else value
