"""``computegroups serve``: the HTTP API, metrics and dashboard of one manager."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import click
from aiohttp import web

from computegroups._cliutil import run
from computegroups.errors import InvalidRequestError
from computegroups.service.app import build_app

__all__ = ["listen", "register"]


async def listen(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start serving ``app``; returns the runner and the port bound (``port`` 0 picks a free one)."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise InvalidRequestError(f"port: cannot listen on {host}:{port} ({exc.strerror})", key="port") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    return runner, int(bound)


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
