"""``computegroups dynamo-actuate``: scale Dynamo workers from the planner's decisions in etcd.

The flags and ``--config FILE`` make one :class:`~.config.ActuatorConfig` (a flag given on the command
line or by its environment variable overrides the file), checked before anything starts; a bad value
is one line naming the flag that gave it, or the file and its field. Wire the command into the main
command group with :func:`register` (the main CLI does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import signal
from typing import Any

import click
from click.core import ParameterSource
from pydantic import BaseModel

from computegroups._cliutil import REQUEST_FLAGS, fail, flag_message, run
from computegroups.errors import InvalidRequestError
from computegroups.integrations.dynamo.actuator import DEFAULT_DYNAMO_COMPONENTS
from computegroups.integrations.dynamo.config import ActuatorConfig, ReadinessConfig, RoleConfig, parse_config
from computegroups.integrations.dynamo.metrics import ActuatorCollector
from computegroups.integrations.etcd import EtcdError
from computegroups.providers.simulated import load_spec
from computegroups.runtime.circus import CircusDaemon
from computegroups.runtime.cli import CliContext
from computegroups.runtime.local import LocalRuntime
from computegroups.service.cli import metrics_options, serve_metrics

__all__ = ["dynamo_actuate_command", "register"]


#: The configuration field each parameter sets (``prefill.command``: the ``prefill`` role's command).
_FIELDS = {
    "namespace": "namespace",
    "etcd_url": "etcd.endpoints",
    "etcd_ca": "etcd.ca_file",
    "etcd_cert": "etcd.cert_file",
    "etcd_key": "etcd.key_file",
    "etcd_user": "etcd.user",
    "etcd_password": "etcd.password",
    "prefill_cmd": "prefill.command",
    "decode_cmd": "decode.command",
    "prefill_gpus": "prefill.gpus",
    "decode_gpus": "decode.gpus",
    "prefill_component": "prefill.component",
    "decode_component": "decode.component",
    "prefill_endpoint": "prefill.endpoint",
    "decode_endpoint": "decode.endpoint",
    "ready_mode": "readiness.mode",
    "health_url": "readiness.health_url",
    "settle": "readiness.settle_s",
    "ready_timeout": "readiness.timeout_s",
    "max_start_failures": "max_start_failures",
    "retry_backoff": "retry_backoff_s",
    "gpu_model": "requirements.gpu_model",
    "node_id": "constraints.node_id",
    "nvlink": "constraints.nvlink",
    "same_numa": "constraints.same_numa",
    "nic": "constraints.nic",
    "nic_link": "constraints.nic_link",
    "strategy": "constraints.strategy",
    "poll_interval": "poll_interval_s",
    "graceful_timeout": "graceful_timeout_s",
    "lease_ttl": "lease_ttl_s",
    "metrics_port": "metrics.port",
    "metrics_host": "metrics.host",
}
#: Fields set only within their part once that part is there: a role by its command, metrics by a port.
_PRIMARY = ("prefill.command", "decode.command", "metrics.port")


def _default(model: type[BaseModel], name: str) -> Any:
    """A field's default, shown as the flag's."""
    return model.model_fields[name].default


def _split(field: str, command: str) -> list[str] | None:
    """A worker command line split as a shell would (None: empty), or InvalidRequestError naming the field."""
    try:
        return shlex.split(command) or None
    except ValueError as exc:  # an unclosed quote, a trailing backslash
        raise InvalidRequestError(f"{field}: {command!r} cannot be split into arguments: {exc}", key=field) from exc


def _configuration(click_ctx: click.Context, config: str | None, values: dict[str, Any]) -> Any:
    """The file's configuration with the flags given on the command line (or by their variable) over it."""
    data: Any = load_spec(config, "config")[0] if config else {}
    if not isinstance(data, dict):
        return data  # refused by the model, naming the file
    data = dict(data)
    given = {
        _FIELDS[name]: value
        for name, value in values.items()
        if name in _FIELDS
        and click_ctx.get_parameter_source(name) in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    for field in sorted(given, key=lambda f: f not in _PRIMARY):  # a part first, then what is set inside it
        value = given[field]
        if field.endswith(".command"):
            value = _split(field, value)
        elif field == "etcd.endpoints":
            value = [e.strip() for e in value.split(",") if e.strip()]
        part, _, key = field.rpartition(".")
        if not part:
            data[field] = value
            continue
        if value is None:
            continue
        inner = data.get(part)
        if not isinstance(inner, dict):
            if part in ("prefill", "decode", "metrics") and field not in _PRIMARY:
                continue  # a role's settings without its command, a host without a port: not used
            inner = {}
        data[part] = {**inner, key: value}
    return data


@click.command("dynamo-actuate")
@click.option(
    "--config",
    metavar="FILE",
    help="The configuration as YAML or JSON (computegroups schema actuator); flags given override it.",
)
@click.option("--namespace", help="Dynamo namespace: the planner writes under v1/NAMESPACE/planner/.")
@click.option(
    "--etcd",
    "etcd_url",
    default="http://127.0.0.1:2379",
    show_default=True,
    envvar="ETCD_ENDPOINTS",
    help="etcd endpoints (http://host:port or https://host:port, comma-separated): the actuator uses the first; "
    "the workers get them all as ETCD_ENDPOINTS.",
)
@click.option(
    "--etcd-ca",
    metavar="FILE",
    envvar="ETCD_AUTH_CA",
    help="With https:// endpoints: the CA bundle that signed etcd's certificate (default: the system's).",
)
@click.option("--etcd-cert", metavar="FILE", envvar="ETCD_AUTH_CLIENT_CERT", help="Client certificate for etcd.")
@click.option("--etcd-key", metavar="FILE", envvar="ETCD_AUTH_CLIENT_KEY", help="Key of --etcd-cert.")
@click.option("--etcd-user", metavar="NAME", envvar="ETCD_AUTH_USERNAME", help="etcd user (etcd auth enabled).")
@click.option(
    "--etcd-password",
    metavar="PASSWORD",
    envvar="ETCD_AUTH_PASSWORD",
    help="Password of --etcd-user (better given as ETCD_AUTH_PASSWORD). Workers get these settings as the "
    "ETCD_AUTH_* variables Dynamo reads.",
)
@click.option(
    "--prefill-gpus",
    type=int,
    default=_default(RoleConfig, "gpus"),
    show_default=True,
    help="GPUs per prefill worker (the planner's prefill_engine_num_gpu).",
)
@click.option(
    "--decode-gpus",
    type=int,
    default=_default(RoleConfig, "gpus"),
    show_default=True,
    help="GPUs per decode worker (the planner's decode_engine_num_gpu).",
)
@click.option("--prefill-cmd", help="Prefill worker command (one shell-quoted string); omit to never scale prefill.")
@click.option("--decode-cmd", help="Decode worker command (one shell-quoted string); omit to never scale decode.")
@click.option(
    "--prefill-component",
    default=DEFAULT_DYNAMO_COMPONENTS["prefill"],
    show_default=True,
    help="Dynamo component the prefill workers register under (given to them as COMPUTEGROUPS_DYNAMO_COMPONENT).",
)
@click.option(
    "--decode-component",
    default=DEFAULT_DYNAMO_COMPONENTS["decode"],
    show_default=True,
    help="Dynamo component the decode workers register under.",
)
@click.option(
    "--prefill-endpoint", default=_default(RoleConfig, "endpoint"), show_default=True, help="Their Dynamo endpoint."
)
@click.option(
    "--decode-endpoint", default=_default(RoleConfig, "endpoint"), show_default=True, help="Their Dynamo endpoint."
)
@click.option(
    "--ready",
    "ready_mode",
    type=click.Choice(["discovery", "health", "settle"]),
    default=_default(ReadinessConfig, "mode"),
    show_default=True,
    help="When a worker is ready: registered in Dynamo's discovery in etcd, healthy at --health-url, "
    "or running for --settle seconds.",
)
@click.option(
    "--health-url",
    metavar="URL",
    help="With --ready health: a worker's health URL; {port} is the DYN_SYSTEM_PORT it is given, "
    "e.g. http://127.0.0.1:{port}/health.",
)
@click.option(
    "--settle",
    type=float,
    default=_default(ReadinessConfig, "settle_s"),
    show_default=True,
    help="With --ready settle: seconds.",
)
@click.option(
    "--ready-timeout",
    type=float,
    default=_default(ReadinessConfig, "timeout_s"),
    show_default=True,
    help="Seconds to wait for workers to be ready before acknowledging the shortfall.",
)
@click.option(
    "--max-start-failures",
    type=int,
    default=_default(ActuatorConfig, "max_start_failures"),
    show_default=True,
    help="Workers of a role that may exit before they are ready (retried with backoff) before the role counts as "
    "short and the decision is acknowledged.",
)
@click.option(
    "--retry-backoff",
    type=float,
    default=_default(ActuatorConfig, "retry_backoff_s"),
    show_default=True,
    help="Seconds before the first retry of a failed worker (doubled each time, at most 60).",
)
@click.option("--gpu-model", help="Substring of the GPU product name.")
@click.option("--node", "node_id", help="Only this node.")
@click.option("--nvlink", is_flag=True, help="Every pair of a worker's GPUs joined by NVLink.")
@click.option("--same-numa", is_flag=True, help="All of a worker's GPUs on one NUMA node.")
@click.option(
    "--nic",
    metavar="NIC|any",
    help="All of a worker's GPUs near this NIC (NIC0, mlx5_0) or any one NIC, for KV-cache transfers over RDMA "
    "(prefill and decode workers).",
)
@click.option(
    "--nic-link",
    metavar="LINK",
    help="With --nic: the farthest link from a worker's GPU to the NIC, PIX, PXB, PHB, NODE (default) or SYS.",
)
@click.option("--strategy", type=click.Choice(["binpack", "spread"]), help="Node choice.")
@click.option(
    "--poll-interval",
    type=float,
    default=_default(ActuatorConfig, "poll_interval_s"),
    show_default=True,
    help="Seconds between reads of the keys (besides the watch).",
)
@click.option(
    "--graceful-timeout",
    type=float,
    default=_default(ActuatorConfig, "graceful_timeout_s"),
    show_default=True,
    help="Seconds a stopped worker gets after SIGTERM before SIGKILL.",
)
@click.option(
    "--lease-ttl",
    type=int,
    default=_default(ActuatorConfig, "lease_ttl_s"),
    show_default=True,
    help="TTL of the acknowledgement's lease.",
)
@click.option("--once", is_flag=True, help="Converge once on the current decision, acknowledge it, and exit.")
@metrics_options
@click.option(
    "--runtime-dir",
    metavar="DIR",
    envvar="COMPUTEGROUPS_RUNTIME_DIR",
    help="Folder of the circus daemon (default: $XDG_RUNTIME_DIR/computegroups or /tmp/computegroups-UID).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log each step.")
@click.pass_obj
def dynamo_actuate_command(
    ctx: CliContext,
    /,
    config: str | None,
    once: bool,
    runtime_dir: str | None,
    verbose: bool,
    **values: Any,
) -> None:
    """Run Dynamo prefill/decode workers on compute groups, as many as the planner decides.

    \b
    computegroups dynamo-actuate --namespace dynamo --etcd http://127.0.0.1:2379 \\
        --prefill-gpus 2 --decode-gpus 2 --nvlink \\
        --prefill-cmd "python3 -m dynamo.vllm --model M --disaggregation-mode prefill --tensor-parallel-size 2" \\
        --decode-cmd "python3 -m dynamo.vllm --model M --disaggregation-mode decode --tensor-parallel-size 2"
    """
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    click_ctx = click.get_current_context()
    given = {
        opt
        for param in click_ctx.command.params
        if param.name and click_ctx.get_parameter_source(param.name) != ParameterSource.DEFAULT
        for opt in param.opts
    }
    flags = {
        field: next(p.opts[0] for p in click_ctx.command.params if p.name == name) for name, field in _FIELDS.items()
    }
    flags |= {"prefill": "--prefill-cmd", "decode": "--prefill-cmd/--decode-cmd", "metrics": "--metrics-port"}

    def refusal(exc: InvalidRequestError) -> str:
        """The flag that gave the bad value, or the file and its field."""
        message = str(exc)
        if exc.key == "config":  # the file itself: it names it
            return message
        if exc.key is None and config is not None:  # the whole file
            return f"{config}: {message}"
        field = message.split(":", 1)[0].split("[", 1)[0]
        flag = flags.get(field) or REQUEST_FLAGS.get(field)
        if config is not None and (flag is None or flag not in given):
            return f"{config} {message}"
        return flag_message(exc, {**REQUEST_FLAGS, **flags})

    try:
        cfg = parse_config(_configuration(click_ctx, config, values))
        try:
            etcd = cfg.etcd.client()
        except EtcdError as exc:
            field = f"etcd.{exc.key}" if exc.key and exc.key != "url" else "etcd.endpoints"  # EtcdClient's setting
            raise InvalidRequestError(f"{field}: {exc}", key=field) from exc
        readiness = cfg.readiness.build(etcd)
    except InvalidRequestError as exc:
        fail(f"dynamo-actuate: {refusal(exc)}", 2)
    try:
        etcd.check()  # a wrong CA, certificate or password is refused here, before anything starts
    except EtcdError as exc:
        if not exc.transient:
            fail(f"dynamo-actuate: {exc}", 2)
        logging.getLogger(__name__).warning("dynamo-actuate: %s; will keep trying", exc)

    async def body(rt: LocalRuntime, stack: contextlib.AsyncExitStack) -> None:
        actuator = cfg.actuator(rt, etcd, readiness)
        if cfg.metrics is not None:
            await serve_metrics(stack, rt.manager, cfg.metrics.host, cfg.metrics.port, [ActuatorCollector(actuator)])
        if once:
            actuator.acquire()
            try:
                outcome = await actuator.step()
            finally:
                actuator.release_lock()
            click.echo(f"{outcome}" if outcome is not None else "no decision yet")
            return
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await actuator.run(stop)

    async def go() -> None:
        mgr = ctx.manager()
        mgr.monitor_interval = None
        runtime = LocalRuntime(mgr, CircusDaemon(runtime_dir), graceful_timeout_s=cfg.graceful_timeout_s)
        async with mgr, contextlib.AsyncExitStack() as stack:
            await body(runtime, stack)

    run(go())


def register(group: click.Group) -> None:
    """Add ``dynamo-actuate`` to a click group (the main ``computegroups`` CLI)."""
    group.add_command(dynamo_actuate_command)
