"""What every ``computegroups`` command shares: exit codes, one-line errors, JSON or table output."""

from __future__ import annotations

import asyncio
import json
import math
import re
import sys
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click

from computegroups.errors import (
    ComputeGroupsError,
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
)
from computegroups.model import Constraints, Requirements

__all__ = [
    "EXIT_CODES",
    "complete_group_id",
    "emit",
    "exit_code",
    "fail",
    "flag_message",
    "parse_request",
    "request_options",
    "run",
    "use_flags",
]

#: Exit code per error class; anything else that the library raises on purpose is 1.
EXIT_CODES: dict[type[ComputeGroupsError], int] = {
    InvalidRequestError: 2,
    NotFoundError: 2,
    InsufficientResourcesError: 3,
    ConflictError: 4,
}

T = TypeVar("T")


def exit_code(exc: ComputeGroupsError) -> int:
    """The exit code for a library error."""
    return next((c for cls, c in EXIT_CODES.items() if isinstance(exc, cls)), 1)


def fail(message: str, code: int) -> NoReturn:
    """Print one line on stderr and exit."""
    click.echo(f"computegroups: {' '.join(message.split())}", err=True)
    sys.exit(code)


#: The flag a user typed for each API key an error can name (``requirements.gpus`` is ``--gpus``).
REQUEST_FLAGS: dict[str, str] = {
    "requirements.gpus": "--gpus",
    "requirements.gpu_memory_mib": "--gpu-memory-mib",
    "requirements.gpu_model": "--gpu-model",
    "requirements.mig_profile": "--mig-profile",
    "requirements.nodes": "--nodes",
    "requirements.cpus": "--cpus",
    "requirements.memory_mib": "--memory-mib",
    "requirements.pool": "--pool",
    "requirements": "request",
    "constraints.nvlink": "--nvlink",
    "constraints.same_numa": "--same-numa",
    "constraints.nic": "--nic",
    "constraints.nic_link": "--nic-link",
    "constraints.strategy": "--strategy",
    "constraints.node_id": "--node",
    "constraints.labels": "--label",
    "constraints.pool": "--pool",
    "constraints.tenant": "--tenant",
    "constraints.priority": "--priority",
    "constraints.preemptible": "--preemptible",
    "constraints.affinity": "--affinity",
    "constraints.anti_affinity": "--anti-affinity",
    "constraints.request_id": "--request-id",
    "constraints.reservation_id": "--reservation",
}
#: Keys only one flag or argument can set; translated always.
_ALWAYS = {
    "ttl_seconds": "--ttl",
    "monitor_interval": "--interval",
    "component_name": "COMPONENT",
    "group_id": "GROUP_ID",
    "port": "--port",
    "metrics_port": "--metrics-port",
    "sort_by": "--sort-by",
    "selector": "--selector",
    "provider": "--provider",
    "since": "--since",
    "state": "--state",
    "node_id": "NODE",
    "reason": "--reason",
}
_active: dict[str, str] = dict(_ALWAYS)
_KEY = re.compile(r"([a-z_]+(?:\.[a-z_]+)?)(\[\d+\])?(\.[a-z_]+)?:")


def use_flags(flags: dict[str, str]) -> None:
    """Name these flags for these API keys in this command's errors (``{"node_id": "--node"}``)."""
    _active.update(flags)


def flag_message(exc: InvalidRequestError, flags: dict[str, str] | None = None) -> str:
    """The error's message with the API key it starts with replaced by the flag the user typed."""
    message = str(exc)
    m = _KEY.match(message)
    flag = (flags if flags is not None else _active).get(m.group(1)) if m else None
    if m is None or flag is None:
        return message
    return f"{flag}:{message[m.end() :]}"


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine, turning library errors into one line and an exit code."""
    try:
        return asyncio.run(coro)
    except InvalidRequestError as exc:
        fail(flag_message(exc), exit_code(exc))
    except ComputeGroupsError as exc:
        fail(str(exc), exit_code(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def emit(as_json: bool, data: Any, human: Callable[[], None]) -> None:
    """Print ``data`` as JSON, or call ``human`` to print it for people."""
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        human()


def _requirements(
    gpus: float | None, gpu_memory_mib: int | None, gpu_model: str | None, cpus: float | None, memory_mib: int | None
) -> dict[str, Any]:
    req: dict[str, Any] = {}
    if gpus is not None:
        req["gpus"] = int(gpus) if math.isfinite(gpus) and 1 <= gpus <= 2**31 and gpus == int(gpus) else gpus
    if gpu_memory_mib is not None:
        req["gpu_memory_mib"] = gpu_memory_mib
    if gpu_model:
        req["gpu_model"] = gpu_model
    if cpus is not None:
        req["cpus"] = cpus
    if memory_mib is not None:
        req["memory_mib"] = memory_mib
    return req


def request_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by allocate and reserve: requirements and constraints."""
    options = [
        click.option("--gpus", type=float, help="Whole GPUs (2) or a share of one GPU (0.25)."),
        click.option("--gpu-memory-mib", type=int, help="Minimum memory per GPU (for a share: memory it needs)."),
        click.option("--gpu-model", help="Case-insensitive substring of the GPU product name."),
        click.option("--mig-profile", help="A MIG device of this profile (e.g. 1g.10gb)."),
        click.option("--nodes", type=int, help="Spread one group over this many nodes (gpus per node)."),
        click.option("--cpus", type=float, help="CPU cores to hold."),
        click.option("--memory-mib", type=int, help="Host memory to hold."),
        click.option("--nvlink", is_flag=True, help="Every pair of GPUs joined by NVLink."),
        click.option("--same-numa", is_flag=True, help="All GPUs on one NUMA node."),
        click.option("--nic", metavar="NIC|any", help="All GPUs near this NIC (NIC0, mlx5_0) or any one NIC."),
        click.option(
            "--nic-link",
            metavar="LINK",
            help="With --nic: the farthest link to the NIC, PIX, PXB, PHB, NODE (default) or SYS.",
        ),
        click.option("--strategy", type=click.Choice(["binpack", "spread"]), default="binpack", show_default=True),
        click.option("--node", "node_id", help="Only this node."),
        click.option("--label", "labels", multiple=True, metavar="KEY=VALUE", help="Node label selector (repeatable)."),
        click.option("--pool", help="Place in this pool (its quotas apply)."),
        click.option("--tenant", help="The tenant whose pool quota this counts against."),
        click.option("--priority", type=int, help="Higher wins; may preempt preemptible lower-priority groups."),
        click.option("--preemptible", is_flag=True, help="May be preempted by higher-priority requests."),
        click.option(
            "--affinity",
            multiple=True,
            metavar="COMPONENT[:SCOPE][:preferred]",
            help="Place near this component (scope node or nvlink_domain; repeatable).",
        ),
        click.option(
            "--anti-affinity",
            multiple=True,
            metavar="COMPONENT[:SCOPE][:preferred]",
            help="Place away from this component (repeatable).",
        ),
        click.option("--request-id", help="Idempotency key: a retry returns the same group."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def rule_option(text: str, flag: str) -> dict[str, Any]:
    """``COMPONENT[:node|nvlink_domain][:preferred|required]`` as an affinity rule."""
    parts = text.split(":")
    rule: dict[str, Any] = {"component": parts[0]}
    for extra in parts[1:]:
        if extra in ("node", "nvlink_domain"):
            rule["scope"] = extra
        elif extra in ("preferred", "required"):
            rule["required"] = extra == "required"
        else:
            fail(f"{flag}: {extra!r} in {text!r} is not node, nvlink_domain, preferred or required", 2)
    return rule


def parse_request(opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Requirements and constraints from the options of :func:`request_options`, validated.

    A bad value exits 2 with one line naming the flag (``--gpus: inf is not a finite number``), before
    any state is opened; later errors about the request name the flags too.
    """
    _active.update(REQUEST_FLAGS)
    req, cons = _request(opts)
    try:
        Requirements.parse(req)
        Constraints.parse(cons)
    except InvalidRequestError as exc:
        fail(flag_message(exc), 2)
    return req, cons


def _request(opts: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    req = _requirements(opts["gpus"], opts["gpu_memory_mib"], opts["gpu_model"], opts["cpus"], opts["memory_mib"])
    if opts["mig_profile"]:
        req["mig_profile"] = opts["mig_profile"]
    if opts["nodes"] is not None:
        req["nodes"] = opts["nodes"]
    cons: dict[str, Any] = {"strategy": opts["strategy"], "nvlink": opts["nvlink"], "same_numa": opts["same_numa"]}
    for key in ("node_id", "request_id", "pool", "tenant", "priority", "nic", "nic_link"):
        if opts[key] is not None:
            cons[key] = opts[key]
    if opts["preemptible"]:
        cons["preemptible"] = True
    if opts["affinity"]:
        cons["affinity"] = [rule_option(t, "--affinity") for t in opts["affinity"]]
    if opts["anti_affinity"]:
        cons["anti_affinity"] = [rule_option(t, "--anti-affinity") for t in opts["anti_affinity"]]
    if opts["labels"]:
        parsed = {}
        for item in opts["labels"]:
            if "=" not in item:
                fail(f"--label: {item!r} is not KEY=VALUE", 2)
            k, v = item.split("=", 1)
            parsed[k] = v
        cons["labels"] = parsed
    return req, cons


def complete_group_id(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of GROUP_ID: the live groups of the state file the command would open.

    Reads the file through the store, never creates it, and completes nothing on any error (a
    completion must not print a traceback into the user's shell).
    """
    from pathlib import Path

    from click.shell_completion import CompletionItem

    from computegroups.state.sqlite import SqliteStateStore, default_state_path

    state = ctx.find_root().params.get("state") or str(default_state_path())
    if state == ":memory:" or not Path(state).is_file():
        return []

    async def live() -> list[Any]:
        store = SqliteStateStore(state)
        await store.open()
        try:
            return [r for r in (await store.changes_since(0)).upserts if r.holds_capacity]
        finally:
            await store.close()

    try:
        records = asyncio.run(live())
    except Exception:
        return []
    items = {(r.gang_id or r.id): r for r in records}
    return [
        CompletionItem(gid, help=f"{r.component or '-'} {r.state.value} on {r.node_id}")
        for gid, r in sorted(items.items())
        if gid.startswith(incomplete)
    ]
