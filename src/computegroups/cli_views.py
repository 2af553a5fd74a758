"""``get``, ``describe`` and ``map``: the state in the conventions of kubectl.

``get groups|nodes [NAME]`` prints a table (``-o wide`` adds columns; ``-o json|yaml|name``), sorted by
``--sort-by COLUMN``, filtered by ``-l key=value`` on the nodes' labels, and with ``--watch`` prints
each change as it is committed, by any process. ``describe group|node NAME`` prints one object as
fields. ``map`` draws nodes by GPUs, each cell the group that holds it.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click
import yaml

from computegroups._cliutil import complete_group_id, run
from computegroups.errors import InvalidRequestError, NotFoundError
from computegroups.events import Event
from computegroups.manager import ComputeGroupManager
from computegroups.model import ComputeGroup, ComputeNode, GangComputeGroup, GroupRecord, NodeSpec
from computegroups.state.base import EventLog

__all__ = ["age", "allocation_row", "component_colour", "human_mib", "physical_gpus", "physical_matrix", "register"]

OUTPUTS = ("table", "wide", "json", "yaml", "name")


def age(seconds: float) -> str:
    """A duration as kubectl prints one: 45s, 5m12s, 3h4m, 2d3h."""
    s = max(0, int(seconds))
    if s < 120:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 10:
        return f"{m}m{s}s" if s else f"{m}m"
    h, m = divmod(m, 60)
    if h == 0:
        return f"{m}m"
    if h < 48:
        return f"{h}h{m}m" if m else f"{h}h"
    d, h = divmod(h, 24)
    return f"{d}d{h}h" if h else f"{d}d"


def human_mib(mib: float) -> str:
    """Memory in binary units: 512Mi, 80Gi, 1.5Ti."""
    if mib <= 0:
        return "-"
    for unit, size in (("Ti", 1024 * 1024), ("Gi", 1024)):
        if mib >= size:
            value = mib / size
            return f"{value:.0f}{unit}" if value >= 10 or value == int(value) else f"{value:.1f}{unit}"
    return f"{mib:.0f}Mi"


def _selector(text: str | None) -> dict[str, str]:
    """``key=value,key2=value2`` (kubectl's equality selector)."""
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise InvalidRequestError(f"selector: {part!r} is not key=value", key="selector")
        out[key.strip()] = value.strip()
    return out


def _matches(spec: NodeSpec | None, selector: Mapping[str, str]) -> bool:
    return all(spec is not None and spec.labels.get(k) == v for k, v in selector.items())


def _parts(g: ComputeGroup) -> list[GroupRecord]:
    return g.part_records if isinstance(g, GangComputeGroup) else [g.record]


def _reason(r: GroupRecord) -> str:
    if r.pending:
        return "waiting for preempted groups to drain"
    if r.preempted_by:
        return f"preempted by {r.preempted_by}"
    if r.carved and r.component is None:
        return "pre-carved"
    return "-"


#: (column, wide only, value of a group) for ``get groups``; the value also sorts.
GROUP_COLUMNS: tuple[tuple[str, bool, Callable[[ComputeGroup, float], Any]], ...] = (
    ("NAME", False, lambda g, now: g.id),
    ("NODE", False, lambda g, now: ",".join(p.node_id for p in _parts(g))),
    ("COMPONENT", False, lambda g, now: g.component or "-"),
    ("STATE", False, lambda g, now: g.allocation_state),
    ("GPUS", False, lambda g, now: g.resources["gpus"]),
    (
        "INDICES",
        False,
        lambda g, now: " ".join(
            (f"{n['node_id']}:" if isinstance(g, GangComputeGroup) else "")
            + (",".join(map(str, n["gpu_indices"])) or "-")
            for n in (g.resources.get("nodes") or [g.resources])
        ),
    ),
    ("LINK", False, lambda g, now: g.topology.get("bottleneck") or "-"),
    ("PRIORITY", False, lambda g, now: g.record.priority),
    ("POOL", False, lambda g, now: g.record.pool or "-"),
    ("AGE", False, lambda g, now: now - g.record.created_at),
    ("EXPIRES", False, lambda g, now: g.record.expires_at - now if g.record.expires_at else None),
    ("REASON", False, lambda g, now: _reason(g.record)),
    ("CPU", True, lambda g, now: g.resources.get("cpus", 0)),
    ("MEMORY", True, lambda g, now: g.resources.get("memory_mib", 0)),
    ("TENANT", True, lambda g, now: g.record.tenant or "-"),
    ("REQUEST-ID", True, lambda g, now: g.request_id or "-"),
    ("UUIDS", True, lambda g, now: ",".join(g.resources["gpu_uuids"]) or "-"),
)

NODE_COLUMNS: tuple[tuple[str, bool, Callable[[ComputeNode, float], Any]], ...] = (
    ("NAME", False, lambda n, now: n.id),
    ("STATUS", False, lambda n, now: "Ready,SchedulingDisabled" if n.cordoned else "Ready"),
    ("GPUS", False, lambda n, now: len(physical_gpus(n.spec))),
    ("FREE", False, lambda n, now: n.resources["free"]["gpus"]),
    ("MODEL", False, lambda n, now: n.resources["gpu_model"] or "-"),
    ("CPU", False, lambda n, now: n.resources["cpus"]),
    ("FREE-CPU", False, lambda n, now: n.resources["free"]["cpus"]),
    ("MEMORY", False, lambda n, now: n.resources["memory_mib"]),
    ("GROUPS", False, lambda n, now: len(n.compute_groups)),
    ("UNHEALTHY", False, lambda n, now: ",".join(map(str, n.resources["unhealthy_gpus"])) or "-"),
    ("MIG", True, lambda n, now: sum(1 for g in n.spec.gpus if g.mig_profile)),
    ("LABELS", True, lambda n, now: ",".join(f"{k}={v}" for k, v in sorted(n.spec.labels.items())) or "-"),
)


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("AGE", "EXPIRES"):
        return age(value)
    if column == "MEMORY":
        return human_mib(value)
    if column in ("CPU", "FREE-CPU"):
        return f"{value:g}" if value else "-"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None:
        return (1, 0)
    return (0, value) if isinstance(value, (int, float)) else (0, str(value))


def _sort_column(
    columns: Sequence[tuple[str, bool, Callable[[Any, float], Any]]], sort_by: str
) -> Callable[[Any, float], Any]:
    found = next((c for c in columns if c[0] == sort_by.upper()), None)
    if found is None:
        raise InvalidRequestError(
            f"sort_by: {sort_by!r} is not a column ({', '.join(c[0] for c in columns)})", key="sort_by"
        )
    return found[2]


def _table(
    columns: Sequence[tuple[str, bool, Callable[[Any, float], Any]]],
    objs: Sequence[Any],
    wide: bool,
    sort_by: str | None,
    header: bool = True,
) -> list[str]:
    now = time.time()
    cols = [c for c in columns if wide or not c[1]]
    if sort_by is not None:
        value = _sort_column(columns, sort_by)
        objs = sorted(objs, key=lambda o: _sort_key(value(o, now)))
    rows = [[_cell(c[0], c[2](o, now)) for c in cols] for o in objs]
    heads = [c[0] for c in cols]
    widths = [max(len(x) for x in col) for col in zip(heads, *rows, strict=False)]
    lines = ["   ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    if header:
        lines.insert(0, "   ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)).rstrip())
    return lines


def _print(objs: Sequence[Any], kind: str, output: str, sort_by: str | None) -> None:
    if output in ("json", "yaml"):
        data = [o.to_dict() for o in objs]
        if output == "json":
            click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        else:
            click.echo(yaml.safe_dump(json.loads(json.dumps(data, default=str)), sort_keys=True).rstrip())
        return
    if output == "name":
        for o in objs:
            click.echo(f"{kind}/{o.id}")
        return
    columns = GROUP_COLUMNS if kind == "group" else NODE_COLUMNS
    if sort_by is not None:
        _sort_column(columns, sort_by)
    if not objs:
        click.echo(f"No {kind}s found.", err=True)
        return
    for line in _table(columns, objs, output == "wide", sort_by):
        click.echo(line)


async def _groups(
    mgr: ComputeGroupManager,
    name: str | None,
    selector: Mapping[str, str],
    released: bool,
    component: str | None,
    state: str | None,
) -> list[ComputeGroup]:
    if name is not None:
        return [await mgr.get_compute_group(name)]
    filters: dict[str, Any] = {"include_released": released}
    if component:
        filters["component"] = component
    if state:
        filters["state"] = state
    specs = {s.id: s for s in mgr.node_specs()}
    groups = await mgr.list_compute_groups(filters)
    return [g for g in groups if all(_matches(specs.get(p.node_id), selector) for p in _parts(g))]


async def _nodes(mgr: ComputeGroupManager, name: str | None, selector: Mapping[str, str]) -> list[ComputeNode]:
    nodes = [n for n in await mgr.list_compute_nodes() if _matches(n.spec, selector)]
    if name is not None:
        nodes = [n for n in nodes if n.id == name]
        if not nodes:
            raise NotFoundError(f"node {name!r} not found")
    return nodes


def _output_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "-o",
        "--output",
        type=click.Choice(OUTPUTS),
        default="table",
        show_default=True,
        help="table, wide (more columns), json, yaml or name.",
    )(f)


@click.command("get")
@click.argument("kind", type=click.Choice(["groups", "group", "nodes", "node"]))
@click.argument("name", required=False, shell_complete=complete_group_id)
@_output_option
@click.option("--sort-by", help="Sort by this column (AGE, GPUS, PRIORITY, ...).")
@click.option("-l", "--selector", help="Only objects on nodes labelled key=value[,key=value].")
@click.option("--component", help="Only this component's groups.")
@click.option("--state", "state_filter", help="Only groups in this state.")
@click.option("-A", "--all", "released", is_flag=True, help="Include released groups.")
@click.option("-w", "--watch", is_flag=True, help="After the list, print each group or node as it changes.")
@click.pass_obj
def get_command(
    ctx: Any,
    kind: str,
    name: str | None,
    output: str,
    sort_by: str | None,
    selector: str | None,
    component: str | None,
    state_filter: str | None,
    released: bool,
    watch: bool,
) -> None:
    """List groups or nodes (kubectl get)."""
    if ctx.json:
        output = "json"
    groups = kind.startswith("group")

    async def fetch(mgr: ComputeGroupManager) -> list[Any]:
        chosen = _selector(selector)
        if groups:
            return await _groups(mgr, name, chosen, released, component, state_filter)
        return await _nodes(mgr, name, chosen)

    async def go() -> None:
        async with ctx.manager() as mgr:
            objs = await fetch(mgr)
            _print(objs, "group" if groups else "node", output, sort_by)
            if watch:
                await _watch(mgr, fetch, objs, groups, output)

    run(go())


async def _watch(
    mgr: ComputeGroupManager,
    fetch: Callable[[ComputeGroupManager], Any],
    objs: list[Any],
    groups: bool,
    output: str,
    interval_s: float = 0.5,
) -> None:
    """Print each object whose description changed (a removed group as released), until interrupted."""
    seen = {o.id: json.dumps(o.to_dict(), sort_keys=True, default=str) for o in objs}
    columns = GROUP_COLUMNS if groups else NODE_COLUMNS
    try:
        while True:
            await asyncio.sleep(interval_s)
            current = await fetch(mgr)
            changed = []
            for o in current:
                text = json.dumps(o.to_dict(), sort_keys=True, default=str)
                if seen.get(o.id) != text:
                    seen[o.id] = text
                    changed.append(o)
            if groups:
                gone = set(seen) - {o.id for o in current}
                for gid in sorted(gone):
                    del seen[gid]
                    changed.append(await mgr.get_compute_group(gid))
            for o in changed:
                if output in ("json", "yaml"):
                    click.echo(json.dumps(o.to_dict(), sort_keys=True, default=str))
                elif output == "name":
                    click.echo(f"{'group' if groups else 'node'}/{o.id}")
                else:
                    for line in _table(columns, [o], output == "wide", None, header=False):
                        click.echo(line)
    except asyncio.CancelledError:  # pragma: no cover - interrupted
        return


@click.command("describe")
@click.argument("kind", type=click.Choice(["group", "node"]))
@click.argument("name", shell_complete=complete_group_id)
@click.pass_obj
def describe_command(ctx: Any, kind: str, name: str) -> None:
    """Everything about one group or node (kubectl describe)."""

    async def go() -> dict[str, Any]:
        async with ctx.manager() as mgr:
            if kind == "group":
                g = await mgr.get_compute_group(name)
                return _describe_group(g)
            (node,) = await _nodes(mgr, name, {})
            return _describe_node(node)

    data = run(go())
    if ctx.json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
        return
    _print_fields(data)


def _describe_group(g: ComputeGroup) -> dict[str, Any]:
    now = time.time()
    r = g.record
    out: dict[str, Any] = {
        "Name": g.id,
        "Component": g.component or "-",
        "State": g.allocation_state,
        "Reason": _reason(r),
        "Priority": f"{r.priority}{' (preemptible)' if r.preemptible else ''}",
        "Pool": r.pool or "-",
        "Tenant": r.tenant or "-",
        "Request ID": g.request_id or "-",
        "Created": f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(r.created_at))} ({age(now - r.created_at)} ago)",
        "Expires": f"in {age(r.expires_at - now)}" if r.expires_at else "-",
        "Requirements": dict(r.requirements) or "-",
        "Constraints": dict(r.constraints) or "-",
    }
    nodes = g.resources.get("nodes") or [g.resources]
    out["Nodes"] = {
        n["node_id"]: {
            "GPUs": n["gpus"],
            "Indices": ",".join(map(str, n["gpu_indices"])) or "-",
            "UUIDs": n["gpu_uuids"] or "-",
            "CPU": n.get("cpus", "-"),
            "Memory": human_mib(n.get("memory_mib", 0)),
            **({"MIG": n["mig_profiles"]} if n.get("mig_profiles") else {}),
        }
        for n in nodes
    }
    topo = g.topology
    out["Topology"] = {"Bottleneck": topo.get("bottleneck") or "-", "NUMA nodes": topo.get("numa_nodes") or "-"}
    out["Environment"] = g.env
    return out


def _describe_node(n: ComputeNode) -> dict[str, Any]:
    res = n.resources
    labels, matrix = physical_matrix(n.spec)
    return {
        "Name": n.id,
        "Labels": dict(n.spec.labels) or "-",
        "GPUs": {
            f"GPU{g.smi_index}"
            + (f" MIG {g.mig_profile}" if g.mig_profile else ""): f"{g.name} {human_mib(g.memory_mib)} {g.uuid}"
            for g in n.spec.gpus
        },
        "Capacity": {"GPUs": len(labels), "CPU": res["cpus"], "Memory": human_mib(res["memory_mib"])},
        "Free": {
            "GPUs": res["free"]["gpus"],
            "CPU": res["free"]["cpus"],
            "Memory": human_mib(res["free"]["memory_mib"]),
        },
        "Unhealthy GPUs": res["unhealthy_gpus"] or "-",
        "Unschedulable": f"true ({n.cordoned})" if n.cordoned else "false",
        "Groups": [
            f"{g.id} {g.component or '-'} {g.allocation_state} {g.resources['gpus']:g} GPU(s)" for g in n.compute_groups
        ]
        or "-",
        "Topology": [" ".join(["      "] + [x.ljust(6) for x in labels])]
        + [" ".join([a.ljust(6)] + [x.ljust(6) for x in row]) for a, row in zip(labels, matrix, strict=True)],
    }


def _print_fields(data: Mapping[str, Any], indent: int = 0) -> None:
    pad = " " * indent
    width = max((len(k) for k in data), default=0) + 1
    for key, value in data.items():
        if isinstance(value, Mapping):
            click.echo(f"{pad}{key}:")
            _print_fields(value, indent + 2)
        elif isinstance(value, list):
            click.echo(f"{pad}{key}:")
            for item in value:
                click.echo(f"{pad}  {item}")
        else:
            click.echo(f"{pad}{(key + ':').ljust(width)} {value}")


def physical_gpus(spec: NodeSpec) -> dict[int, list[int]]:
    """A node's physical GPUs by nvidia-smi index, in order: the devices of each (its MIG slices, or itself)."""
    out: dict[int, list[int]] = {}
    for d, g in enumerate(spec.gpus):
        out.setdefault(g.smi_index, []).append(d)
    return dict(sorted(out.items()))


def physical_matrix(spec: NodeSpec) -> tuple[list[str], list[list[str]]]:
    """The topology matrix of a node's physical GPUs, labelled by nvidia-smi index (a MIG node's devices
    are slices of these; two slices of one GPU are not shown as GPUs of their own)."""
    first = {smi: devices[0] for smi, devices in physical_gpus(spec).items()}
    topo = spec.effective_topology
    labels = [f"GPU{i}" for i in first]
    matrix = [["X" if a == b else topo.link(first[a], first[b]) for b in first] for a in first]
    return labels, matrix


@click.command("map")
@click.option("-l", "--selector", help="Only nodes labelled key=value[,key=value].")
@click.pass_obj
def map_command(ctx: Any, selector: str | None) -> None:
    """Nodes by GPUs: each cell the component holding that GPU (shares and MIG slices counted)."""

    async def go() -> list[ComputeNode]:
        chosen = _selector(selector)
        async with ctx.manager() as mgr:
            return await _nodes(mgr, None, chosen)

    nodes = run(go())
    grid = [allocation_row(n) for n in nodes]
    if ctx.json:
        click.echo(json.dumps(grid, indent=2, sort_keys=True))
        return
    width = max((len(c["text"]) for row in grid for c in row["gpus"]), default=1)
    width = max(width, 4)
    colour = sys.stdout.isatty()
    name_w = max((len(r["node"]) for r in grid), default=4)  # a cordoned node is marked after its cells
    most = max((len(r["gpus"]) for r in grid), default=0)
    click.echo("NODE".ljust(name_w) + "  " + " ".join(f"GPU{i}".ljust(width) for i in range(most)))
    for row in grid:
        cells = []
        for c in row["gpus"]:
            text = c["text"].ljust(width)
            if colour and c["components"]:
                text = click.style(text, fg=component_colour(c["components"][0]))
            cells.append(text)
        click.echo(row["node"].ljust(name_w) + "  " + " ".join(cells) + ("  (cordoned)" if row["cordoned"] else ""))


_COLOURS = ("cyan", "green", "yellow", "magenta", "blue", "bright_red", "bright_cyan", "bright_green", "bright_magenta")


def component_colour(component: str) -> str:
    """The terminal colour of a component, the same in ``map`` and ``top`` (names both click and rich know)."""
    return _COLOURS[sum(map(ord, component)) % len(_COLOURS)]


def allocation_row(n: ComputeNode) -> dict[str, Any]:
    """One node of the map: per physical GPU, the components holding it and a short text."""
    by_smi = physical_gpus(n.spec)
    holders: dict[int, list[tuple[str, int]]] = {}
    for g in n.compute_groups:
        for part in _parts(g):
            if part.node_id != n.id:
                continue
            for dev in part.devices:
                holders.setdefault(dev.index, []).append((part.component or "(free)", dev.share_milli))
    unhealthy = set(n.resources["unhealthy_gpus"])
    cells = []
    for smi, devices in by_smi.items():
        held = [h for d in devices for h in holders.get(d, [])]
        components = sorted({c for c, _ in held})
        mig = len(devices) > 1 or any(n.spec.gpus[d].mig_profile for d in devices)
        if mig:
            used = sum(1 for d in devices if holders.get(d))
            text = (
                f"{components[0][:6] if len(components) == 1 else 'mig'} {used}/{len(devices)}"
                if used
                else f". 0/{len(devices)}"
            )
        elif not held:
            text = "."
        elif len(held) == 1 and held[0][1] >= 1000:
            text = components[0][:10]
        else:
            text = f"{'+'.join(c[:4] for c in components)} {sum(s for _, s in held) / 1000:g}"
        if any(d in unhealthy for d in devices):
            text = "!" + text
        cells.append(
            {
                "gpu": smi,
                "components": components,
                "text": text,
                "mig_devices": len(devices) if mig else 0,
                "unhealthy": any(d in unhealthy for d in devices),
            }
        )
    return {"node": n.id, "cordoned": n.cordoned, "gpus": cells}


def register(group: click.Group) -> None:
    """Add ``get``, ``describe``, ``map`` and ``events`` to a click group (the main CLI)."""
    for command in (get_command, describe_command, map_command, events_command):
        group.add_command(command)


_DURATION = re.compile(r"(\d{1,9})(s|m|h|d)")


def _since(text: str | None, now: float) -> tuple[int, float]:
    """``--since``: an event number, or a duration back from now (30s, 10m, 2h, 1d); (after seq, after time)."""
    if not text:
        return 0, 0.0
    if text.isdigit() and len(text) <= 18:
        return int(text), 0.0
    m = _DURATION.fullmatch(text)
    if m is None:
        raise InvalidRequestError(f"since: {text[:40]!r} is not an event number or a duration like 10m", key="since")
    return 0, now - int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _event_line(e: Event) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(e.at))
    fields = [when, str(e.seq), e.kind, e.group_id or "-", e.component or "-", e.node_id or "-", e.detail]
    return "  ".join(fields).rstrip()


@click.command("events")
@click.option("--since", help="Only events after this event number, or newer than a duration (30s, 10m, 2h, 1d).")
@click.option("-w", "--watch", is_flag=True, help="Then print each new event as any process records it.")
@click.option("--component", help="Only this component's events.")
@click.option("--group", "group_id", help="Only this group's events.", shell_complete=complete_group_id)
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table", show_default=True)
@click.pass_obj
def events_command(
    ctx: Any, since: str | None, watch: bool, component: str | None, group_id: str | None, output: str
) -> None:
    """What happened, from the state's durable event log: every change and refusal, with its time."""
    as_json = ctx.json or output == "json"

    async def go() -> None:
        after, newer = _since(since, time.time())
        store = ctx.store()
        await store.open()
        try:
            if not isinstance(store, EventLog):
                raise InvalidRequestError("state: this state store keeps no event log", key="state")
            while True:
                batch = await store.events_since(after, 1000)
                for e in batch:
                    if (
                        e.at < newer
                        or (component and e.component != component)
                        or (group_id and e.group_id != group_id)
                    ):
                        continue
                    click.echo(json.dumps(e.to_dict()) if as_json else _event_line(e))
                if batch:
                    after = batch[-1].seq
                    continue
                if not watch:
                    return
                await asyncio.sleep(0.25)
        finally:
            await store.close()

    run(go())
