"""``computegroups serve``: one manager behind an HTTP API, with metrics and a live dashboard.

The API mirrors :class:`~computegroups.manager.ComputeGroupManager` method for method (see
:data:`ROUTES` and ``GET /openapi.json``). Bodies are JSON objects; errors are the typed errors of
the Python API as an HTTP status and a JSON body (:mod:`computegroups.service.wire`). An
``Idempotency-Key`` header is the manager's ``request_id``: a retried allocation returns the group
the first one made. ``GET /v1/events`` streams the manager's events as server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from computegroups import __version__
from computegroups.errors import ComputeGroupsError, InvalidRequestError
from computegroups.events import Event
from computegroups.service.metrics import CONTENT_TYPE, Metrics
from computegroups.service.wire import ERRORS, error_body, group_json

if TYPE_CHECKING:
    from computegroups.manager import ComputeGroupManager

__all__ = ["MAX_BODY_BYTES", "ROUTES", "build_app", "build_metrics_app", "openapi"]

log = logging.getLogger("computegroups.service")

MAX_BODY_BYTES = 64 * 1024
MANAGER: web.AppKey[ComputeGroupManager] = web.AppKey("manager")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
STREAMS: web.AppKey[set[asyncio.Task[Any]]] = web.AppKey("streams")
HEARTBEAT_S = 15.0
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, separators=(",", ":")))


async def _body(request: web.Request, allowed: tuple[str, ...], required: tuple[str, ...]) -> dict[str, Any]:
    """The request's JSON object, with only ``allowed`` keys and every ``required`` one."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise InvalidRequestError(f"body: larger than {MAX_BODY_BYTES} bytes", key="body")
    raw = await request.content.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidRequestError(f"body: larger than {MAX_BODY_BYTES} bytes", key="body")
    try:
        data = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequestError(f"body: not JSON ({exc})", key="body") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("body: not a JSON object", key="body")
    unknown = sorted(set(data) - set(allowed))
    if unknown:
        raise InvalidRequestError(f"body: unknown key {unknown[0]!r} (allowed: {', '.join(allowed)})", key=unknown[0])
    missing = [k for k in required if k not in data]
    if missing:
        raise InvalidRequestError(f"body: {missing[0]!r} is required", key=missing[0])
    return data


def _constraints(request: web.Request, body: Mapping[str, Any]) -> Any:
    """The body's constraints, with the ``Idempotency-Key`` header as ``request_id`` when given."""
    cons = body.get("constraints")
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return cons
    if cons is None:
        cons = {}
    if not isinstance(cons, dict):
        return cons  # the manager rejects it with its own message
    if "request_id" in cons and cons["request_id"] != key:
        raise InvalidRequestError("Idempotency-Key differs from constraints.request_id", key="Idempotency-Key")
    return {**cons, "request_id": key}


def _flag(request: web.Request, name: str) -> bool:
    value = request.query.get(name, "false").lower()
    if value not in ("true", "false", "1", "0"):
        raise InvalidRequestError(f"query: {name} must be true or false", key=name)
    return value in ("true", "1")


# -- handlers ---------------------------------------------------------------------------------
async def list_nodes(request: web.Request) -> web.Response:
    return _json([n.to_dict() for n in await request.app[MANAGER].list_compute_nodes()])


async def list_groups(request: web.Request) -> web.Response:
    q = request.query  # the manager checks the filters (unknown ones included), as for the Python API
    filters: dict[str, Any] = {k: v for k, v in q.items() if k != "include_released"}
    if "include_released" in q:
        filters["include_released"] = _flag(request, "include_released")
    return _json([group_json(g) for g in await request.app[MANAGER].list_compute_groups(filters)])


async def get_group(request: web.Request) -> web.Response:
    return _json(group_json(await request.app[MANAGER].get_compute_group(request.match_info["group_id"])))


async def allocate(request: web.Request) -> web.Response:
    body = await _body(request, ("component", "requirements", "constraints"), ("component", "requirements"))
    with request.app[METRICS].observe("allocate"):
        g = await request.app[MANAGER].allocate_compute_group(
            body["component"], body["requirements"], _constraints(request, body)
        )
    return _json(group_json(g), 201)


async def reserve(request: web.Request) -> web.Response:
    body = await _body(
        request, ("component", "requirements", "constraints", "ttl_seconds"), ("component", "requirements")
    )
    with request.app[METRICS].observe("reserve"):
        g = await request.app[MANAGER].reserve_compute_group(
            body["component"], body["requirements"], _constraints(request, body), body.get("ttl_seconds", 300.0)
        )
    return _json(group_json(g), 201)


async def create(request: web.Request) -> web.Response:
    body = await _body(request, ("resources", "node_id"), ("resources",))
    with request.app[METRICS].observe("create"):
        g = await request.app[MANAGER].create_compute_group(body["resources"], body.get("node_id"))
    return _json(group_json(g), 201)


async def delete_carved(request: web.Request) -> web.Response:
    with request.app[METRICS].observe("delete"):
        done = await request.app[MANAGER].delete_compute_group(request.match_info["group_id"])
    return _json({"group_id": request.match_info["group_id"], "deleted": done})


async def release(request: web.Request) -> web.Response:
    with request.app[METRICS].observe("release"):
        done = await request.app[MANAGER].deallocate_compute_group(request.match_info["group_id"])
    return _json({"group_id": request.match_info["group_id"], "released": done})


async def drain(request: web.Request) -> web.Response:
    with request.app[METRICS].observe("drain"):
        done = await request.app[MANAGER].drain_compute_group(request.match_info["group_id"])
    return _json({"group_id": request.match_info["group_id"], "drained": done})


async def cordon(request: web.Request) -> web.Response:
    body = await _body(request, ("reason",), ())
    node = request.match_info["node_id"]
    with request.app[METRICS].observe("cordon"):
        done = await request.app[MANAGER].cordon_node(node, body.get("reason"))
    return _json({"node_id": node, "cordoned": True, "changed": done})


async def uncordon(request: web.Request) -> web.Response:
    node = request.match_info["node_id"]
    with request.app[METRICS].observe("uncordon"):
        done = await request.app[MANAGER].uncordon_node(node)
    return _json({"node_id": node, "cordoned": False, "changed": done})


async def drain_node(request: web.Request) -> web.Response:
    body = await _body(request, ("reason",), ())
    node = request.match_info["node_id"]
    with request.app[METRICS].observe("drain_node"):
        drained = await request.app[MANAGER].drain_node(node, body.get("reason"))
    return _json({"node_id": node, "cordoned": True, "drained": [group_json(g) for g in drained]})


async def component_groups(request: web.Request) -> web.Response:
    groups = await request.app[MANAGER].get_component_allocations(request.match_info["component"])
    return _json([group_json(g) for g in groups])


async def summary(request: web.Request) -> web.Response:
    return _json(await request.app[MANAGER].get_allocation_summary())


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: one JSON ``data`` line (kind, group, node, component, detail, time) per event.

    A comment line every :data:`HEARTBEAT_S` keeps proxies from closing the stream and notices a
    client that went away; the server's shutdown ends every stream.
    """
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    await response.write(b": stream open\n\n")
    streams = request.app[STREAMS]
    task = asyncio.current_task()
    assert task is not None
    streams.add(task)
    feed = aiter(request.app[MANAGER].events())
    next_event: asyncio.Future[Event] = asyncio.ensure_future(anext(feed))
    try:
        while True:
            done, _ = await asyncio.wait({next_event}, timeout=HEARTBEAT_S)
            if not done:
                await response.write(b": heartbeat\n\n")
                continue
            e = next_event.result()
            next_event = asyncio.ensure_future(anext(feed))
            data: dict[str, Any] = {"kind": e.kind, "group_id": e.group_id, "node_id": e.node_id}
            data.update(component=e.component, detail=e.detail, at=e.at)
            await response.write(f"data: {json.dumps(data)}\n\n".encode())
    except (ConnectionResetError, asyncio.CancelledError):
        return response
    finally:
        streams.discard(task)
        next_event.cancel()


async def _end_streams(app: web.Application) -> None:
    streams: set[asyncio.Task[Any]] = app[STREAMS]
    for task in list(streams):
        task.cancel()


async def healthz(request: web.Request) -> web.Response:
    return _json({"ok": True, "version": __version__, "revision": request.app[MANAGER].revision})


async def metrics(request: web.Request) -> web.Response:
    text = await request.app[METRICS].render()
    return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE})


async def dashboard(request: web.Request) -> web.Response:
    page = resources.files("computegroups.service").joinpath("dashboard.html").read_bytes()
    return web.Response(body=page, content_type="text/html", charset="utf-8")


async def schema(request: web.Request) -> web.Response:
    return _json(openapi())


#: (method, path, handler, summary): the API, in the order of the seed's methods.
ROUTES: tuple[tuple[str, str, Handler, str], ...] = (
    ("GET", "/v1/nodes", list_nodes, "list_compute_nodes"),
    ("POST", "/v1/nodes/{node_id}/cordon", cordon, "cordon_node {reason}"),
    ("POST", "/v1/nodes/{node_id}/uncordon", uncordon, "uncordon_node"),
    ("POST", "/v1/nodes/{node_id}/drain", drain_node, "drain_node {reason}"),
    ("GET", "/v1/groups", list_groups, "list_compute_groups (query: component, state, node_id, include_released)"),
    ("POST", "/v1/groups", allocate, "allocate_compute_group {component, requirements, constraints}"),
    ("GET", "/v1/groups/{group_id}", get_group, "get_compute_group"),
    ("DELETE", "/v1/groups/{group_id}", release, "deallocate_compute_group"),
    ("POST", "/v1/groups/{group_id}/drain", drain, "drain_compute_group"),
    ("POST", "/v1/reservations", reserve, "reserve_compute_group {component, requirements, constraints, ttl_seconds}"),
    ("POST", "/v1/carved", create, "create_compute_group {resources, node_id}"),
    ("DELETE", "/v1/carved/{group_id}", delete_carved, "delete_compute_group"),
    ("GET", "/v1/components/{component}/groups", component_groups, "get_component_allocations"),
    ("GET", "/v1/summary", summary, "get_allocation_summary"),
    ("GET", "/v1/events", events, "events, as server-sent events"),
    ("GET", "/healthz", healthz, "liveness and the state revision"),
    ("GET", "/metrics", metrics, "Prometheus metrics"),
    ("GET", "/openapi.json", schema, "this schema"),
    ("GET", "/", dashboard, "the dashboard page"),
)


def openapi() -> dict[str, Any]:
    """An OpenAPI 3.1 description of :data:`ROUTES` and of the error bodies."""
    error = {
        "type": "object",
        "required": ["error", "type", "message"],
        "properties": {
            "error": {"type": "string", "enum": [code for _, _, code in ERRORS] + ["internal"]},
            "type": {"type": "string"},
            "message": {"type": "string"},
            "key": {"type": "string"},
            "reasons": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
    }
    statuses = sorted({status for _, status, _ in ERRORS})
    paths: dict[str, dict[str, Any]] = {}
    for method, path, handler, text in ROUTES:
        op: dict[str, Any] = {
            "operationId": handler.__name__,
            "summary": text,
            "responses": {"200": {"description": "OK"}}
            | {str(s): {"description": "error", "content": {"application/json": {"schema": error}}} for s in statuses},
        }
        if method == "POST" and path in ("/v1/groups", "/v1/reservations"):
            op["parameters"] = [{"name": "Idempotency-Key", "in": "header", "schema": {"type": "string"}}]
            op["responses"]["201"] = {"description": "the group"}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "computegroups", "version": __version__},
        "paths": paths,
        "components": {"schemas": {"Error": error}},
    }


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as a JSON error body: ours typed, the router's (404, 405, 413) by status."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return _json({"error": "http", "type": type(exc).__name__, "message": exc.reason}, exc.status)
    except Exception as exc:
        if not isinstance(exc, ComputeGroupsError):
            log.exception("%s %s failed", request.method, request.path)
        status, body = error_body(exc)
        return _json(body, status)


def build_app(manager: ComputeGroupManager, metrics_: Metrics | None = None) -> web.Application:
    """The aiohttp application serving ``manager`` (which the caller opens and closes)."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[MANAGER] = manager
    app[METRICS] = metrics_ or Metrics(manager)
    app[STREAMS] = set()
    app.on_shutdown.append(_end_streams)
    for method, path, handler, _ in ROUTES:
        app.router.add_route(method, path, handler)
    return app


def build_metrics_app(manager: ComputeGroupManager, metrics_: Metrics | None = None) -> web.Application:
    """Only ``/metrics`` and ``/healthz`` of ``manager``: what ``--metrics-port`` serves (supervise, dynamo-actuate)."""
    app = web.Application(middlewares=[_errors], client_max_size=MAX_BODY_BYTES)
    app[MANAGER] = manager
    app[METRICS] = metrics_ or Metrics(manager)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    return app
