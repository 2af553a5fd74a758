"""``computegroups serve``: the HTTP API, metrics and dashboard of one manager."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, TypeVar

import click
from aiohttp import web
from prometheus_client.registry import Collector

from computegroups._cliutil import run
from computegroups.errors import InvalidRequestError
from computegroups.service.app import build_app, build_metrics_app
from computegroups.service.metrics import Metrics

if TYPE_CHECKING:
    from computegroups.manager import ComputeGroupManager

__all__ = ["listen", "metrics_options", "register", "serve_metrics"]

F = TypeVar("F", bound=Callable[..., Any])


async def listen(app: web.Application, host: str, port: int, key: str = "port") -> tuple[web.AppRunner, int]:
    """Start serving ``app``; returns the runner and the port bound (``port`` 0 picks a free one).

    A port that cannot be bound is an InvalidRequestError naming ``key``.
    """
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise InvalidRequestError(f"{key}: cannot listen on {host}:{port} ({exc.strerror})", key=key) from None
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)


def metrics_options(command: F) -> F:
    """``--metrics-port`` and ``--metrics-host``, for a long-running command that serves its metrics."""
    host = click.option("--metrics-host", default="127.0.0.1", show_default=True, help="Address for --metrics-port.")
    port = click.option(
        "--metrics-port", type=click.IntRange(0, 65535), help="Serve Prometheus /metrics and /healthz on this port."
    )
    return port(host(command))


async def serve_metrics(
    stack: contextlib.AsyncExitStack,
    manager: ComputeGroupManager,
    host: str,
    port: int,
    collectors: Iterable[Collector] = (),
    *,
    err: bool = False,
) -> int:
    """Serve ``/metrics`` (the manager's series and ``collectors``') and ``/healthz`` until ``stack`` closes.

    Prints the address (on stderr with ``err``); returns the port bound.
    """
    app = build_metrics_app(manager, Metrics(manager, collectors))
    runner, bound = await listen(app, host, port, key="metrics_port")
    stack.push_async_callback(runner.cleanup)
    click.echo(f"metrics on http://{host}:{bound}/metrics", err=err)
    return bound


async def _until_stopped() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


@click.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8470, show_default=True, help="Port (0: any free one).")
@click.pass_obj
def serve_command(ctx: Any, host: str, port: int) -> None:
    """Serve one manager over HTTP: the API (/v1, /openapi.json), /metrics, /healthz and a dashboard at /."""

    async def go() -> None:
        async with ctx.manager() as mgr:
            runner, bound = await listen(build_app(mgr), host, port)
            click.echo(f"serving http://{host}:{bound}/ (API /v1, /openapi.json, /metrics, /healthz)")
            try:
                await _until_stopped()
            finally:
                await runner.cleanup()

    run(go())


def register(group: click.Group) -> None:
    """Add ``serve`` to a click group (the main CLI)."""
    group.add_command(serve_command)
