"""``computegroups top``: a live view of the allocation map, the use of each node and what changed.

It reads the state like every other command (any process's commits show), redraws every
``--interval`` seconds, and lists the changes it saw between two reads (a group allocated, released,
drained or moved to another state). On a terminal it takes the full screen (``rich``'s alternate
screen); elsewhere, or with ``--once``, it prints one frame and exits.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from computegroups._cliutil import run
from computegroups.cli_views import allocation_row, component_colour, physical_gpus
from computegroups.manager import ComputeGroupManager
from computegroups.model import ComputeNode

__all__ = ["register"]


def frame(nodes: list[ComputeNode], summary: dict[str, Any], feed: deque[str]) -> Group:
    """One screen: the totals, the map with each node's use, and the recent changes."""
    head = Text.assemble(
        ("computegroups  ", "bold"),
        f"GPUs {summary['total_gpus']:g}  allocated {summary['allocated_gpus']:g}  ",
        f"reserved {summary['reserved_gpus']:g}  free {summary['free_gpus']:g}  ",
        (f"unhealthy {summary['unhealthy_gpus']}", "red" if summary["unhealthy_gpus"] else ""),
        f"  revision {summary['revision']}",
    )
    most = max((len(physical_gpus(n.spec)) for n in nodes), default=0)
    grid = Table(box=None, pad_edge=False, show_edge=False)
    grid.add_column("NODE", no_wrap=True)
    for i in range(most):
        grid.add_column(f"GPU{i}", no_wrap=True)
    grid.add_column("USE", justify="right", no_wrap=True)
    for n in nodes:
        row = allocation_row(n)
        cells = []
        for c in row["gpus"]:
            style = "red" if c["unhealthy"] else (component_colour(c["components"][0]) if c["components"] else "dim")
            cells.append(Text(c["text"], style=style))
        cells += [Text("")] * (most - len(cells))
        use = n.utilization
        text = f"{100 * use.get('gpus_allocated', 0):.0f}% alloc"
        if "gpu" in use:
            text += f" {use['gpu']:.0f}% busy"
        if n.cordoned:
            text += " cordoned"
        grid.add_row(Text(n.id, style="dim" if n.cordoned else ""), *cells, text)
    changes = Text("\n".join(feed) if feed else "no change seen yet", style="" if feed else "dim")
    return Group(head, Panel(grid, title="allocation map"), Panel(changes, title="changes"))


def _changes(before: dict[str, tuple[str, str, str]], after: dict[str, tuple[str, str, str]]) -> list[str]:
    stamp = time.strftime("%H:%M:%S")
    out = []
    for gid, (state, component, node) in after.items():
        old = before.get(gid)
        if old is None:
            out.append(f"{stamp} {state:9} {gid} {component} on {node}")
        elif old[0] != state:
            out.append(f"{stamp} {state:9} {gid} {component} on {node} (was {old[0]})")
    for gid in before.keys() - after.keys():
        _, component, node = before[gid]
        out.append(f"{stamp} released  {gid} {component} on {node}")
    return out


async def _read(mgr: ComputeGroupManager) -> tuple[list[ComputeNode], dict[str, Any], dict[str, tuple[str, str, str]]]:
    nodes = await mgr.list_compute_nodes()
    summary = await mgr.get_allocation_summary()
    groups = {g.id: (g.allocation_state, g.component or "-", g.node_id) for n in nodes for g in n.compute_groups}
    return nodes, summary, groups


@click.command("top")
@click.option(
    "--interval", type=click.FloatRange(0.1, 3600), default=1.0, show_default=True, help="Seconds between reads."
)
@click.option("--once", is_flag=True, help="Print one frame and exit.")
@click.pass_obj
def top_command(ctx: Any, interval: float, once: bool) -> None:
    """A live view: the map, each node's use and the changes as they are committed."""
    console = Console()
    feed: deque[str] = deque(maxlen=12)

    async def go() -> None:
        async with ctx.manager() as mgr:
            nodes, summary, groups = await _read(mgr)
            if once or not console.is_terminal:
                console.print(frame(nodes, summary, feed))
                return
            with Live(frame(nodes, summary, feed), console=console, screen=True, auto_refresh=False) as live:
                while True:
                    await asyncio.sleep(interval)
                    nodes, summary, now = await _read(mgr)
                    feed.extendleft(_changes(groups, now))
                    groups = now
                    live.update(frame(nodes, summary, feed), refresh=True)

    run(go())


def register(group: click.Group) -> None:
    """Add ``top`` to a click group (the main CLI)."""
    group.add_command(top_command)
