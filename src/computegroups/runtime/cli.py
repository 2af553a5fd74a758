"""``computegroups run / stop / ps / supervise``: the local runtime's commands.

Wire them into the main command group with :func:`register`::

    from computegroups.runtime.cli import register
    register(cli)

The commands expect ``click_ctx.obj`` to have ``manager() -> ComputeGroupManager``
and ``json: bool`` (the main CLI's Context does). Exit codes follow the main CLI:
2 bad input or unknown id, 3 insufficient resources, 4 conflict, 1 anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import click

from computegroups._cliutil import complete_group_id, emit, fail, parse_request, request_options, run
from computegroups.manager import ComputeGroupManager
from computegroups.runtime.circus import CircusDaemon
from computegroups.runtime.local import LocalRuntime, RestartPolicy
from computegroups.service.cli import metrics_options, serve_metrics

__all__ = ["ps_command", "register", "release_command", "run_command", "stop_command", "supervise_command"]

T = TypeVar("T")


class CliContext(Protocol):
    json: bool

    def manager(self) -> ComputeGroupManager: ...


def _with_runtime(
    ctx: CliContext, runtime_dir: str | None, body: Callable[[LocalRuntime], Awaitable[T]], **mgr_kwargs: Any
) -> T:
    async def go() -> T:
        mgr = ctx.manager()
        for key, value in mgr_kwargs.items():
            setattr(mgr, key, value)
        runtime = LocalRuntime(mgr, CircusDaemon(runtime_dir))
        async with mgr:
            return await body(runtime)

    return run(go())


def _emit(ctx: CliContext, data: Any, human: Callable[[], None]) -> None:
    emit(ctx.json, data, human)


_runtime_dir = click.option(
    "--runtime-dir",
    metavar="DIR",
    envvar="COMPUTEGROUPS_RUNTIME_DIR",
    help="Folder of the circus daemon (default: $XDG_RUNTIME_DIR/computegroups or /tmp/computegroups-UID).",
)


@click.command("run")
@click.argument("component")
@request_options
@click.option(
    "--policy",
    type=click.Choice([p.value for p in RestartPolicy]),
    default="release",
    show_default=True,
    help="When the worker exits: release its group, or restart it on the same group.",
)
@click.option("--mps", is_flag=True, help="For a share of a GPU: set the CUDA MPS thread and memory limits.")
@_runtime_dir
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def run_command(
    ctx: CliContext,
    /,
    component: str,
    policy: str,
    mps: bool,
    runtime_dir: str | None,
    command: tuple[str, ...],
    **opts: Any,
) -> None:
    """Allocate a group for COMPONENT and run COMMAND on it under circus; prints the group id.

    Takes the same requirement and constraint options as ``allocate``.

    \b
    computegroups run decode --gpus 2 --nvlink -- python -m my.server --port 8000
    """
    argv = list(command[1:] if command and command[0] == "--" else command)
    if not argv:
        fail("run: give the command after --, e.g. computegroups run decode --gpus 1 -- python serve.py", 2)
    req, cons = parse_request(opts)

    async def body(rt: LocalRuntime) -> dict[str, Any]:
        group, worker = await rt.run(component, req, argv, cons, policy=policy, mps=mps)
        return {"group": group.to_dict(), "worker": worker.to_dict()}

    out = _with_runtime(ctx, runtime_dir, body)
    _emit(ctx, out, lambda: click.echo(out["group"]["id"]))


@click.command("stop")
@click.argument("group_id", shell_complete=complete_group_id)
@_runtime_dir
@click.pass_obj
def stop_command(ctx: CliContext, group_id: str, runtime_dir: str | None) -> None:
    """Stop GROUP_ID's worker gracefully and release the group."""
    done = _with_runtime(ctx, runtime_dir, lambda rt: rt.stop(group_id))
    _emit(
        ctx,
        {"group_id": group_id, "stopped": done},
        lambda: click.echo(f"{group_id}: {'stopped and released' if done else 'nothing to stop'}"),
    )


@click.command("release")
@click.argument("group_id", shell_complete=complete_group_id)
@_runtime_dir
@click.pass_obj
def release_command(ctx: CliContext, group_id: str, runtime_dir: str | None) -> None:
    """Release a group (a no-op, reported, if it had no owner); a worker running on it is stopped first."""
    changed = _with_runtime(ctx, runtime_dir, lambda rt: rt.manager.deallocate_compute_group(group_id))
    _emit(
        ctx,
        {"group_id": group_id, "released": changed},
        lambda: click.echo(f"{group_id}: {'released' if changed else 'already free; nothing changed'}"),
    )


@click.command("ps")
@click.option("--all", "show_all", is_flag=True, help="Include workers that ended.")
@_runtime_dir
@click.pass_obj
def ps_command(ctx: CliContext, show_all: bool, runtime_dir: str | None) -> None:
    """Components, groups, pids and state of the workers (exits are noticed first)."""
    rows = _with_runtime(ctx, runtime_dir, lambda rt: rt.ps())
    if not show_all:
        rows = [r for r in rows if r["state"] in ("starting", "running")]

    def human() -> None:
        table = [
            [
                r["component"],
                r["group_id"],
                r["state"],
                r["group_state"],
                ",".join(map(str, r["pids"])) or "-",
                str(r["restarts"]),
                "-" if r.get("last_exit_code") is None else str(r["last_exit_code"]),
                r["policy"],
                ",".join(map(str, r["gpu_indices"])) or "-",
                " ".join(r["command"])[:60],
                r["note"],
            ]
            for r in rows
        ]
        headers = [
            "COMPONENT",
            "GROUP",
            "STATE",
            "GROUP_STATE",
            "PIDS",
            "RESTARTS",
            "LAST_EXIT",
            "POLICY",
            "GPUS",
            "COMMAND",
            "NOTE",
        ]
        widths = [max(len(str(x)) for x in col) for col in zip(headers, *table, strict=False)]
        for row in [headers, *table]:
            click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())

    _emit(ctx, rows, human)


@click.command("supervise")
@click.option("--interval", type=float, default=2.0, show_default=True, help="Seconds between monitoring rounds.")
@click.option("--duration", type=float, help="Stop after this many seconds (default: until interrupted).")
@metrics_options
@_runtime_dir
@click.pass_obj
def supervise_command(
    ctx: CliContext,
    interval: float,
    duration: float | None,
    metrics_port: int | None,
    metrics_host: str,
    runtime_dir: str | None,
) -> None:
    """Keep a manager open: sample health and use, notice exited workers, release expired reservations."""

    async def body(rt: LocalRuntime) -> int:
        mgr = rt.manager

        async def printer() -> None:
            async for e in mgr.events():
                if ctx.json:
                    fields = {"kind": e.kind, "group_id": e.group_id, "node_id": e.node_id, "component": e.component}
                    click.echo(json.dumps({**fields, "detail": e.detail, "at": e.at}))
                else:
                    click.echo(f"{e.kind} group={e.group_id or '-'} node={e.node_id or '-'} {e.detail}".rstrip())

        async with contextlib.AsyncExitStack() as stack:
            if metrics_port is not None:
                await serve_metrics(stack, mgr, metrics_host, metrics_port, err=ctx.json)
            task = asyncio.get_running_loop().create_task(printer())
            stack.callback(task.cancel)
            await asyncio.sleep(duration if duration is not None else float("inf"))
        return mgr.monitor.rounds if mgr.monitor is not None else 0

    rounds = _with_runtime(ctx, runtime_dir, body, monitor_interval=interval)
    if ctx.json:
        click.echo(json.dumps({"rounds": rounds}))


def register(group: click.Group) -> None:
    """Add ``run``, ``stop``, ``release``, ``ps`` and ``supervise`` to a click group (the main CLI)."""
    for command in (run_command, stop_command, release_command, ps_command, supervise_command):
        group.add_command(command)
