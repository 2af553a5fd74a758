"""The ``computegroups`` command line.

Exit codes: 0 success; 1 an unexpected failure underneath (state, provider);
2 bad input (usage, invalid request, unknown id); 3 insufficient resources;
4 conflict with the current state. Errors are one line on stderr, never a traceback.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from computegroups import __version__
from computegroups._cliutil import (
    EXIT_CODES,
    complete_group_id,
    fail,
    parse_request,
    request_options,
    run,
    use_flags,
)
from computegroups._cliutil import emit as _emit
from computegroups.cli_views import physical_gpus, physical_matrix
from computegroups.errors import InvalidRequestError
from computegroups.manager import ComputeGroupManager
from computegroups.model import ComputeGroup, ComputeNode
from computegroups.providers.base import ComputeResourceProvider
from computegroups.providers.local import LocalComputeResourceProvider
from computegroups.providers.simulated import SimulatedComputeResourceProvider, load_spec
from computegroups.state.base import StateStore
from computegroups.state.sqlite import SqliteStateStore, default_state_path

__all__ = ["EXIT_CODES", "cli", "main"]

T = TypeVar("T")


class Context:
    """Options shared by every command."""

    def __init__(
        self,
        state: str | None,
        spec: str | None,
        simulate: bool,
        as_json: bool,
        pools: str | None = None,
        provider: str = "auto",
        kube: dict[str, str | None] | None = None,
    ) -> None:
        self.state = state
        self.spec = spec
        self.simulate = simulate
        self.json = as_json
        self.pools_file = pools
        self.kind = provider
        self.kube = kube or {}

    def provider(self) -> ComputeResourceProvider:
        kind = self.kind
        if kind == "auto":
            kind = "simulated" if self.spec or self.simulate else "local"
        elif kind != "simulated" and (self.spec or self.simulate):
            raise InvalidRequestError("provider: --spec and --simulate need --provider simulated", key="provider")
        if kind == "simulated":
            return SimulatedComputeResourceProvider.from_spec(Path(self.spec) if self.spec else None)
        if kind == "kubernetes":
            from computegroups.providers.kubernetes import KubernetesComputeResourceProvider

            return KubernetesComputeResourceProvider(
                self.kube.get("kubeconfig"),
                context=self.kube.get("context"),
                namespace=self.kube.get("namespace") or "computegroups",
            )
        return LocalComputeResourceProvider()

    def pools(self) -> list[Any]:
        """Pool definitions: the ``pools:`` of --pools FILE, else of the --spec file."""
        source = self.pools_file or self.spec
        if not source:
            return []
        data, _ = load_spec(source)
        pools = data.get("pools", []) if isinstance(data, dict) else []
        if not isinstance(pools, list):
            raise InvalidRequestError(f"{source}: 'pools' is not a list", key="pools")
        return pools

    def store(self) -> StateStore:
        """The state store the commands would use, without discovering anything (for reading the event log)."""
        if self.kind == "kubernetes":
            return cast(StateStore, cast(Any, self.provider()).state_store())
        if self.state == ":memory:":
            raise InvalidRequestError("state: an in-memory state keeps nothing to read", key="state")
        path = Path(self.state) if self.state else default_state_path()
        if not path.is_file():
            raise InvalidRequestError(f"state: no state file at {path}", key="state")
        return SqliteStateStore(path)

    def manager(self) -> ComputeGroupManager:
        provider = self.provider()
        store_of = getattr(provider, "state_store", None)
        if self.state is None and callable(store_of):  # Kubernetes: state in the cluster, beside the nodes
            return ComputeGroupManager(provider, store_of(), pools=self.pools())
        return ComputeGroupManager(provider, self.state, pools=self.pools())


def with_manager(ctx: Context, body: Callable[[ComputeGroupManager], Awaitable[T]]) -> T:
    async def go() -> T:
        async with ctx.manager() as mgr:
            return await body(mgr)

    return run(go())


def emit(ctx: Context, data: Any, human: Callable[[], None]) -> None:
    _emit(ctx.json, data, human)


def _table(rows: list[list[str]], headers: list[str]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    click.echo("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in rows:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _group_row(g: ComputeGroup) -> list[str]:
    r = g.resources
    topo = g.topology
    return [
        g.id,
        g.node_id,
        g.component or "-",
        g.allocation_state,
        f"{r['gpus']:g}",
        ",".join(map(str, r["gpu_indices"])) or "-",
        topo.get("bottleneck") or "-",
    ]


_GROUP_HEADERS = ["GROUP", "NODE", "COMPONENT", "STATE", "GPUS", "INDICES", "LINK"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--state",
    metavar="PATH",
    envvar="COMPUTEGROUPS_STATE",
    help="SQLite state file (default: $XDG_STATE_HOME/computegroups/state.db); ':memory:' for none.",
)
@click.option("--spec", metavar="FILE", help="Simulate the cluster described by this YAML/JSON spec.")
@click.option("--simulate", is_flag=True, help="Simulate the built-in demo cluster instead of this machine.")
@click.option("--pools", metavar="FILE", help="YAML/JSON file whose 'pools:' defines pools (default: the spec's).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.option(
    "--provider",
    type=click.Choice(["auto", "simulated", "local", "kubernetes"]),
    default="auto",
    show_default=True,
    envvar="COMPUTEGROUPS_PROVIDER",
    help="Where compute is discovered; auto: simulated with --spec/--simulate, else this machine.",
)
@click.option("--namespace", help="Kubernetes namespace of the state and the pods (default: computegroups).")
@click.option("--kubeconfig", metavar="PATH", help="Kubernetes config file (default: $KUBECONFIG, ~/.kube/config).")
@click.option("--kube-context", metavar="NAME", help="Kubernetes context of the config file.")
@click.version_option(version=__version__, prog_name="computegroups")
@click.pass_context
def cli(
    click_ctx: click.Context,
    state: str | None,
    spec: str | None,
    simulate: bool,
    pools: str | None,
    as_json: bool,
    provider: str,
    namespace: str | None,
    kubeconfig: str | None,
    kube_context: str | None,
) -> None:
    """Discover GPUs and CPUs, and allocate topology-aware compute groups.

    Without --spec or --simulate, this machine is discovered through NVML.
    """
    kube = {"namespace": namespace, "kubeconfig": kubeconfig, "context": kube_context}
    click_ctx.obj = Context(state, spec, simulate, as_json, pools, provider, kube)


def _node_human(nodes: list[ComputeNode], notes: list[str]) -> None:
    for note in notes:
        click.echo(f"note: {note}")
    _table(
        [
            [
                n.id,
                str(n.resources["gpus"]),
                n.resources["gpu_model"] or "-",
                f"{n.resources['free']['gpus']:g}",
                f"{n.resources['cpus']:g}",
                str(n.resources["memory_mib"]),
                str(len(n.compute_groups)),
            ]
            for n in nodes
        ],
        ["NODE", "GPUS", "MODEL", "FREE", "CPUS", "MEMORY_MIB", "GROUPS"],
    )
    for n in nodes:
        labels, m = physical_matrix(n.spec)
        if len(labels) < 2:
            continue
        click.echo(f"\n{n.id} topology")
        first = {f"GPU{smi}": devices[0] for smi, devices in physical_gpus(n.spec).items()}
        rows = [[a, *row, str(n.topology.numa_node(first[a]))] for a, row in zip(labels, m, strict=True)]
        for nic in n.topology.nics:  # each NIC's link to each GPU, as nvidia-smi's NIC rows show it
            label = f"{nic.name} ({nic.device})" if nic.device else nic.name
            links = [nic.links[first[a]] for a in labels]
            rows.append([label, *links, "-" if nic.numa_node is None else str(nic.numa_node)])
        _table(rows, ["", *labels, "NUMA"])


@cli.command()
@click.pass_obj
def discover(ctx: Context) -> None:
    """Nodes, GPUs and each node's topology matrix."""

    async def body(mgr: ComputeGroupManager) -> tuple[list[ComputeNode], list[str]]:
        return await mgr.list_compute_nodes(), list(mgr.inventory.notes)

    nodes, notes = with_manager(ctx, body)
    emit(ctx, {"notes": notes, "nodes": [n.to_dict() for n in nodes]}, lambda: _node_human(nodes, notes))


@cli.command()
@click.option("--component", help="Only this component's groups.")
@click.option("--state", "state_filter", help="Only groups in this state.")
@click.option("--node", "node_id", help="Only groups on this node.")
@click.pass_obj
def groups(ctx: Context, component: str | None, state_filter: str | None, node_id: str | None) -> None:
    """List compute groups."""
    filters: dict[str, Any] = {}
    if component:
        filters["component"] = component
    if state_filter:
        filters["state"] = state_filter
    if node_id:
        filters["node_id"] = node_id
    found = with_manager(ctx, lambda m: m.list_compute_groups(filters))
    emit(ctx, [g.to_dict() for g in found], lambda: _table([_group_row(g) for g in found], _GROUP_HEADERS))


def _show_group(ctx: Context, g: ComputeGroup) -> None:
    def human() -> None:
        _table([_group_row(g)], _GROUP_HEADERS)
        click.echo(f"CUDA_VISIBLE_DEVICES={g.env['CUDA_VISIBLE_DEVICES']}")

    emit(ctx, g.to_dict(), human)


@cli.command()
@click.argument("component")
@request_options
@click.option("--reservation", "reservation_id", help="Claim this reservation (a group id from 'reserve').")
@click.pass_obj
def allocate(ctx: Context, /, component: str, reservation_id: str | None, **opts: Any) -> None:
    """Allocate a compute group to COMPONENT and print it."""
    req, cons = parse_request(opts)
    if reservation_id:
        cons["reservation_id"] = reservation_id
    _show_group(ctx, with_manager(ctx, lambda m: m.allocate_compute_group(component, req, cons)))


@cli.command()
@click.argument("component")
@request_options
@click.option("--ttl", type=float, default=300.0, show_default=True, help="Seconds until the reservation expires.")
@click.pass_obj
def reserve(ctx: Context, /, component: str, ttl: float, **opts: Any) -> None:
    """Reserve capacity for COMPONENT's planned scale-up; claim it with 'allocate --reservation ID'."""
    req, cons = parse_request(opts)
    _show_group(ctx, with_manager(ctx, lambda m: m.reserve_compute_group(component, req, cons, ttl_seconds=ttl)))


@cli.command()
@click.argument("group_id", required=False, shell_complete=complete_group_id)
@click.option("--node", "node", help="Drain a whole node instead: cordon it and drain every group on it.")
@click.option("--reason", help="With --node: why (shown by get nodes and describe).")
@click.pass_obj
def drain(ctx: Context, group_id: str | None, node: str | None, reason: str | None) -> None:
    """Mark a group draining (it gets no new owner), or with --node every group on a node, cordoning it.

    Owners keep their groups until they release them.
    """
    if (group_id is None) == (node is None):
        fail("drain: give a GROUP_ID or --node NODE, not both", 2)
    if reason is not None and node is None:
        fail("--reason: only with --node", 2)
    if node is not None:
        use_flags({"node_id": "--node"})
        drained = with_manager(ctx, lambda m: m.drain_node(node, reason))
        emit(
            ctx,
            {"node_id": node, "cordoned": True, "drained": [g.id for g in drained]},
            lambda: click.echo(f"node/{node} cordoned; {len(drained)} group(s) draining: {_ids(drained)}"),
        )
        return
    gid = cast(str, group_id)
    changed = with_manager(ctx, lambda m: m.drain_compute_group(gid))
    emit(
        ctx,
        {"group_id": gid, "drained": changed},
        lambda: click.echo(f"{gid}: {'draining' if changed else 'already draining'}"),
    )


def _ids(groups: list[ComputeGroup]) -> str:
    return ", ".join(g.id for g in groups) or "none"


@cli.command()
@click.argument("node")
@click.option("--reason", help="Why (shown by get nodes and describe node).")
@click.pass_obj
def cordon(ctx: Context, node: str, reason: str | None) -> None:
    """Cordon a node: it takes no new groups; its groups keep their owners. Every process sharing the state sees it."""
    changed = with_manager(ctx, lambda m: m.cordon_node(node, reason))
    emit(
        ctx,
        {"node_id": node, "cordoned": True, "changed": changed},
        lambda: click.echo(f"node/{node} {'cordoned' if changed else 'already cordoned'}"),
    )


@cli.command()
@click.argument("node")
@click.pass_obj
def uncordon(ctx: Context, node: str) -> None:
    """Let a cordoned node take new groups again."""
    changed = with_manager(ctx, lambda m: m.uncordon_node(node))
    emit(
        ctx,
        {"node_id": node, "cordoned": False, "changed": changed},
        lambda: click.echo(f"node/{node} {'uncordoned' if changed else 'was not cordoned'}"),
    )


@cli.command()
@click.pass_obj
def summary(ctx: Context) -> None:
    """Totals: GPUs total, allocated, reserved, free; groups by state; GPUs per component."""
    s = with_manager(ctx, lambda m: m.get_allocation_summary())

    def human() -> None:
        for key in (
            "nodes",
            "total_gpus",
            "allocated_gpus",
            "reserved_gpus",
            "free_gpus",
            "unhealthy_gpus",
            "total_cpus",
            "free_cpus",
        ):
            click.echo(f"{key:16} {s[key]:g}")
        click.echo(f"{'groups':16} " + (", ".join(f"{k}={v}" for k, v in sorted(s["groups"].items())) or "none"))
        for comp, n in s["components"].items():
            click.echo(f"  {comp:14} {n:g} GPU(s)")
        for name, p in s.get("pools", {}).items():
            click.echo(
                f"pool {name}: {p['allocated_gpus']:g} of {p['total_gpus']} GPUs allocated, "
                f"{p['free_gpus']:g} free, priority {p['priority']}"
            )

    emit(ctx, s, human)


@cli.command()
@click.option("--state-dir", type=click.Path(file_okay=False), help="Keep the demo's state here (default: a temp dir).")
@click.pass_obj
def demo(ctx: Context, state_dir: str | None) -> None:
    """Tour the API on the built-in simulated cluster (or --spec), with SQLite state."""
    import tempfile

    from computegroups.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(state_dir or tmp) / "demo-state.db"
        provider = SimulatedComputeResourceProvider.from_spec(Path(ctx.spec) if ctx.spec else None)
        say = (lambda text: click.echo(json.dumps({"message": text.strip()}))) if ctx.json else click.echo
        run(run_demo(provider, path, say))


@cli.command()
@click.argument("kind", type=click.Choice(["spec", "pools", "actuator"]))
def schema(kind: str) -> None:
    """Print the JSON Schema of a configuration file: a cluster spec, a list of pools, or dynamo-actuate's."""
    from pydantic import TypeAdapter

    from computegroups.config import ClusterSpec, PoolConfig, json_schema
    from computegroups.integrations.dynamo.config import ActuatorConfig

    if kind == "spec":
        data = json_schema(ClusterSpec)
    elif kind == "actuator":
        data = json_schema(ActuatorConfig)
    else:
        data = TypeAdapter(list[PoolConfig]).json_schema()
        data["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        data["title"] = "Pools"
    click.echo(json.dumps(data, indent=2, sort_keys=True))


def main() -> None:
    """Console entry point."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        fail("aborted", 130)
    except click.exceptions.NoArgsIsHelpError as exc:  # pragma: no cover - click >= 8.2
        click.echo(exc.format_message(), err=True)
        sys.exit(2)
    except click.ClickException as exc:
        fail(exc.format_message(), 2)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)


def _json_after_command(click_ctx: click.Context, param: click.Parameter, value: bool) -> None:
    if value and isinstance(click_ctx.obj, Context):
        click_ctx.obj.json = True


def _register_extensions() -> None:
    from computegroups.cli_top import register as register_top
    from computegroups.cli_views import register as register_views
    from computegroups.integrations.dynamo import register as register_dynamo
    from computegroups.runtime.cli import register as register_runtime
    from computegroups.service.cli import register as register_service

    register_views(cli)
    register_top(cli)
    register_runtime(cli)
    register_dynamo(cli)
    register_service(cli)
    # `--json` works after the command too (`computegroups summary --json`).
    for command in cli.commands.values():
        if not any("--json" in p.opts for p in command.params):
            command.params.append(
                click.Option(
                    ["--json"],
                    is_flag=True,
                    expose_value=False,
                    callback=_json_after_command,
                    help="Print JSON instead of tables.",
                )
            )


_register_extensions()

if __name__ == "__main__":  # pragma: no cover
    main()
