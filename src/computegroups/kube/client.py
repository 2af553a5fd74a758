"""A small JSON client for the Kubernetes API over ``kubernetes_asyncio``.

``kubernetes_asyncio`` supplies what is hard to get right: kubeconfig parsing
(certificates, tokens, exec credential plugins, contexts), in-cluster
configuration and an aiohttp transport. Requests go through its ``ApiClient``
with ``_preload_content=False`` and plain dicts, so no generated model classes
are built or needed (the ComputeGroup custom resource has none anyway).

Errors are translated here, once: :class:`KubeError` carries the HTTP status,
the verb and resource, and the API server's one-line message. Requests that may
pass if sent again are retried here too, with :mod:`computegroups.retry`.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from computegroups.retry import retry_after_s, retrying

__all__ = ["KubeClient", "KubeError", "Obj", "env_proxy"]

Obj = dict[str, Any]

_VERBS = {"GET": "get", "POST": "create", "PUT": "update", "PATCH": "patch", "DELETE": "delete"}

#: How requests are retried (429s, and 5xx answers to reads): attempts, the backoff's first and longest
#: wait, and a bound on the whole (a ``Retry-After`` replaces the backoff for that attempt).
RETRY_ATTEMPTS = 12
RETRY_FIRST_S = 0.05
RETRY_MAX_S = 1.0
RETRY_TIMEOUT_S = 30.0


class KubeError(Exception):
    """An API request failed. ``status`` is the HTTP status (0: no answer), ``reason`` the API reason.

    ``transient``: sending the same request again may succeed (a 429, or a 5xx answer to a read);
    ``retry_after_s``: the wait the server asked for (its ``Retry-After``), if it did. The client
    retries those itself (:meth:`KubeClient.request`); they are raised once its retries are spent.
    """

    def __init__(
        self,
        status: int,
        verb: str,
        resource: str,
        message: str,
        reason: str = "",
        *,
        transient: bool = False,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{verb} {resource}: {message}" if message else f"{verb} {resource}: HTTP {status}")
        self.status = status
        self.verb = verb
        self.resource = resource
        self.message = message
        self.reason = reason
        self.transient = transient
        self.retry_after_s = retry_after_s

    @property
    def forbidden(self) -> bool:
        return self.status in (401, 403)

    def one_line(self) -> str:
        """``forbidden: list nodes (...)`` - the verb and resource first, for people."""
        if self.status == 403:
            return f"forbidden: cannot {self.verb} {self.resource}: {self.message}"
        if self.status == 401:
            return f"unauthorized: cannot {self.verb} {self.resource}: the credentials were refused"
        return str(self)


def _resource_of(path: str) -> str:
    """``/apis/g/v1/namespaces/ns/things/x/status`` -> ``things/status``; for messages only."""
    parts = [p for p in path.split("?")[0].split("/") if p]
    if parts and parts[0] == "api":
        parts = parts[2:]
    elif parts and parts[0] == "apis":
        group = parts[1]
        parts = parts[3:]
        if parts and parts[0] == "namespaces" and len(parts) > 2:
            parts = parts[2:]
        if parts:
            parts[0] = f"{parts[0]}.{group}"
        return parts[0] + ("/" + parts[2] if len(parts) > 2 else "") if parts else group
    if parts and parts[0] == "namespaces" and len(parts) > 2:
        parts = parts[2:]
    if not parts:
        return "namespaces"
    return parts[0] + ("/" + parts[2] if len(parts) > 2 else "")


def env_proxy(server: str) -> str | None:
    """The proxy the environment names for ``server`` (``HTTPS_PROXY``, ``HTTP_PROXY``, ``NO_PROXY``, either
    case), or None: what aiohttp would read for each request (urllib's ``getproxies``, ``proxy_bypass``)."""
    parts = urlsplit(server)
    if not parts.hostname or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme or "https")


class KubeClient:
    """JSON requests against one API server. Use ``await KubeClient.create(...)``; close with ``close()``."""

    def __init__(self, api_client: Any) -> None:
        self._api = api_client
        #: requests sent, by verb (``get``, ``list``, ``create``, ``update``, ``patch``, ``delete``...);
        #: a retried request counts each time it is sent
        self.requests: Counter[str] = Counter()

    @classmethod
    async def create(
        cls,
        kubeconfig: str | os.PathLike[str] | None = None,
        context: str | None = None,
        *,
        in_cluster: bool | None = None,
    ) -> KubeClient:
        """Configure from ``kubeconfig`` (a path), else in-cluster when running in a pod, else ``$KUBECONFIG``
        / ``~/.kube/config``. ``in_cluster=True`` forces in-cluster configuration."""
        try:
            from kubernetes_asyncio import client, config
        except ImportError as exc:  # the optional dependency is missing
            raise KubeError(
                0,
                "import",
                "kubernetes_asyncio",
                "the Kubernetes provider needs kubernetes_asyncio; pip install 'computegroups[kubernetes]'",
            ) from exc
        cfg = client.Configuration()
        try:
            if in_cluster or (in_cluster is None and kubeconfig is None and "KUBERNETES_SERVICE_HOST" in os.environ):
                config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            else:
                await config.load_kube_config(
                    config_file=os.fspath(kubeconfig) if kubeconfig is not None else None,
                    context=context,
                    client_configuration=cfg,
                )
        except Exception as exc:  # kubernetes_asyncio raises ConfigException, OSError, ValueError...
            where = os.fspath(kubeconfig) if kubeconfig is not None else "the default kubeconfig"
            raise KubeError(0, "load", "configuration", f"{where}: {exc}") from exc
        if not cfg.proxy:  # a kubeconfig's proxy-url comes first, as in client-go
            cfg.proxy = env_proxy(str(cfg.host or ""))
        api = client.ApiClient(configuration=cfg)
        # kubernetes_asyncio's session trusts the environment, so aiohttp reads the proxy variables and
        # ~/.netrc again on every request, each in a worker thread: a sixth of a busy manager's CPU. The
        # proxy is read once above instead; netrc has no place beside the kubeconfig's credentials.
        session = getattr(getattr(api, "rest_client", None), "pool_manager", None)
        if session is not None and hasattr(session, "_trust_env"):
            session._trust_env = False
        return cls(api)

    @property
    def server(self) -> str:
        """The API server's address."""
        return str(getattr(getattr(self._api, "configuration", None), "host", "") or "")

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        params: Mapping[str, Any] | None = None,
        content_type: str = "application/json",
        verb: str | None = None,
    ) -> Obj:
        """Send one request; return the decoded JSON object; raise :class:`KubeError` unless 2xx.

        429 (too many requests, storage initializing) is retried for a few seconds, as client-go
        does; so are 5xx answers to reads (``KubeError.transient``). The server's ``Retry-After``
        is honoured; otherwise the waits back off from :data:`RETRY_FIRST_S` to :data:`RETRY_MAX_S`.
        """
        async for attempt in retrying(
            attempts=RETRY_ATTEMPTS,
            timeout_s=RETRY_TIMEOUT_S,
            wait_initial_s=RETRY_FIRST_S,
            wait_max_s=RETRY_MAX_S,
            wait_jitter_s=RETRY_FIRST_S,
        ):
            with attempt:
                resp = await self._send(method, path, body, params, content_type, verb, timeout=60)
                return await self._decode(resp, method, path, verb)
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def _send(
        self,
        method: str,
        path: str,
        body: Any,
        params: Mapping[str, Any] | None,
        content_type: str,
        verb: str | None,
        *,
        timeout: float | tuple[float, float],
    ) -> Any:
        """Send one request; the aiohttp response, its body unread (the caller releases it)."""
        from kubernetes_asyncio.client.exceptions import ApiException

        if self._api is None:
            raise KubeError(0, _VERBS.get(method, method), _resource_of(path), "the client is closed")
        verb = verb or _VERBS.get(method, method.lower())
        self.requests[verb] += 1
        headers = {"Accept": "application/json", "Content-Type": content_type}
        try:
            return await self._api.call_api(
                path,
                method,
                query_params=[(k, v) for k, v in (params or {}).items() if v is not None],
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=timeout,
            )
        except ApiException as exc:
            raise KubeError(int(exc.status or 0), verb, _resource_of(path), str(exc.reason or exc)) from exc
        except Exception as exc:  # aiohttp.ClientError, OSError, timeouts
            raise KubeError(0, verb, _resource_of(path), f"{type(exc).__name__}: {exc}") from exc

    async def _decode(self, resp: Any, method: str, path: str, verb: str | None) -> Obj:
        """Read and release a response; its JSON object, or :class:`KubeError` unless 2xx."""
        verb = verb or _VERBS.get(method, method.lower())
        try:
            status = int(resp.status)
            raw = await resp.read()
        except Exception as exc:  # the connection dropped while the answer was read
            raise KubeError(0, verb, _resource_of(path), f"{type(exc).__name__}: {exc}") from exc
        finally:
            resp.release()
        try:
            data = json.loads(raw) if raw else {}
        except ValueError:
            data = {"message": raw[:200].decode(errors="replace")}
        if not 200 <= status <= 299:
            message = data.get("message", "") if isinstance(data, dict) else ""
            reason = data.get("reason", "") if isinstance(data, dict) else ""
            raise KubeError(
                status,
                verb,
                _resource_of(path),
                str(message),
                str(reason),
                transient=status == 429 or (status >= 500 and method == "GET"),
                retry_after_s=retry_after_s(resp.headers.get("Retry-After")),
            )
        return data if isinstance(data, dict) else {"items": data}

    async def get(self, path: str, **params: Any) -> Obj:
        return await self.request("GET", path, params=params)

    async def list(self, path: str, **params: Any) -> Obj:
        """GET a collection (paged with ``limit``/``continue`` so big clusters come back whole)."""
        items: list[Obj] = []
        async for page in self.pages(path, **params):
            items.extend(page["items"])
        page["items"] = items
        return page

    async def pages(self, path: str, *, page_size: int = 500, **params: Any) -> AsyncIterator[Obj]:
        """GET a collection one page (``limit``) at a time, following ``continue``; all pages are of one
        snapshot, whose ``resourceVersion`` is in each page's ``metadata``."""
        cont: str | None = None
        while True:
            page = await self.request("GET", path, params={**params, "limit": page_size, "continue": cont}, verb="list")
            page["items"] = page.get("items") or []
            yield page
            cont = (page.get("metadata") or {}).get("continue")
            if not cont:
                return

    async def watch(self, path: str, *, timeout_s: int = 300, **params: Any) -> AsyncIterator[Obj]:
        """The changes to a collection as the server sends them (``{"type": ..., "object": ...}``), until it
        ends the watch (after ``timeout_s``) or the connection drops. Not retried: the caller watches
        again from the last ``resourceVersion`` it saw (a 410 ``Gone``: list again first)."""
        query = {**params, "watch": "true", "timeoutSeconds": timeout_s}
        resp = await self._send("GET", path, None, query, "application/json", "watch", timeout=(10, timeout_s + 30))
        if not 200 <= int(resp.status) <= 299:
            await self._decode(resp, "GET", path, "watch")  # raises
        try:
            while True:
                try:
                    line = await resp.content.readline()
                except Exception as exc:  # aiohttp.ClientError, timeouts
                    raise KubeError(0, "watch", _resource_of(path), f"{type(exc).__name__}: {exc}") from exc
                if not line:
                    return
                if line.strip():
                    yield json.loads(line)
        finally:
            resp.close()  # the stream may be unread: drop the connection rather than reuse it

    async def post(self, path: str, body: Obj) -> Obj:
        return await self.request("POST", path, body)

    async def put(self, path: str, body: Obj) -> Obj:
        return await self.request("PUT", path, body)

    async def patch(self, path: str, body: Obj) -> Obj:
        """A JSON merge patch (RFC 7386)."""
        return await self.request("PATCH", path, body, content_type="application/merge-patch+json")

    async def delete(self, path: str, body: Obj | None = None, **params: Any) -> Obj:
        return await self.request("DELETE", path, body, params=params)

    async def delete_collection(self, path: str, **params: Any) -> Obj:
        return await self.request("DELETE", path, params=params, verb="deletecollection")


def name_path(*segments: str) -> str:
    """Join path segments, quoting each."""
    return "/".join(quote(s, safe="") for s in segments)
