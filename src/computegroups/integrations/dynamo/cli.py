"""``computegroups dynamo-actuate``: scale Dynamo workers from the planner's decisions in etcd.

Wire it into the main command group with :func:`register` (the main CLI does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shlex
import signal
from typing import Any

import click

from computegroups._cliutil import REQUEST_FLAGS, fail, flag_message, run
from computegroups.errors import InvalidRequestError
from computegroups.integrations.dynamo.actuator import (
    DEFAULT_DYNAMO_COMPONENTS,
    DEFAULT_DYNAMO_ENDPOINT,
    DynamoActuator,
    check_name,
    parse_specs,
)
from computegroups.integrations.dynamo.metrics import ActuatorCollector
from computegroups.integrations.dynamo.readiness import DiscoveryReadiness, HealthReadiness, Readiness, SettleReadiness
from computegroups.integrations.etcd import EtcdClient, EtcdError
from computegroups.model import Constraints
from computegroups.runtime.circus import CircusDaemon
from computegroups.runtime.cli import CliContext
from computegroups.runtime.local import LocalRuntime
from computegroups.service.cli import metrics_options, serve_metrics

__all__ = ["dynamo_actuate_command", "register"]


#: The flag of each EtcdClient setting, for the one line that refuses it.
_ETCD_FLAGS = {
    "url": "--etcd",
    "ca_file": "--etcd-ca",
    "cert_file": "--etcd-cert",
    "key_file": "--etcd-key",
    "user": "--etcd-user",
    "password": "--etcd-password",
}


def _split(flag: str, command: str | None) -> list[str] | None:
    """A worker command line split as a shell would, or InvalidRequestError naming the flag."""
    if not command:
        return None
    try:
        return shlex.split(command)
    except ValueError as exc:  # an unclosed quote, a trailing backslash
        raise InvalidRequestError(f"{flag}: {command!r} cannot be split into arguments: {exc}", key=flag) from exc


@click.command("dynamo-actuate")
@click.option("--namespace", required=True, help="Dynamo namespace: the planner writes under v1/NAMESPACE/planner/.")
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
    default=1,
    show_default=True,
    help="GPUs per prefill worker (the planner's prefill_engine_num_gpu).",
)
@click.option(
    "--decode-gpus",
    type=int,
    default=1,
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
@click.option("--prefill-endpoint", default=DEFAULT_DYNAMO_ENDPOINT, show_default=True, help="Their Dynamo endpoint.")
@click.option("--decode-endpoint", default=DEFAULT_DYNAMO_ENDPOINT, show_default=True, help="Their Dynamo endpoint.")
@click.option(
    "--ready",
    "ready_mode",
    type=click.Choice(["discovery", "health", "settle"]),
    default="discovery",
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
@click.option("--settle", type=float, default=5.0, show_default=True, help="With --ready settle: seconds.")
@click.option(
    "--ready-timeout",
    type=float,
    default=900.0,
    show_default=True,
    help="Seconds to wait for workers to be ready before acknowledging the shortfall.",
)
@click.option(
    "--max-start-failures",
    type=int,
    default=3,
    show_default=True,
    help="Workers of a role that may exit before they are ready (retried with backoff) before the role counts as "
    "short and the decision is acknowledged.",
)
@click.option(
    "--retry-backoff",
    type=float,
    default=1.0,
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
    default=5.0,
    show_default=True,
    help="Seconds between reads of the keys (besides the watch).",
)
@click.option(
    "--graceful-timeout",
    type=float,
    default=30.0,
    show_default=True,
    help="Seconds a stopped worker gets after SIGTERM before SIGKILL.",
)
@click.option("--lease-ttl", type=int, default=10, show_default=True, help="TTL of the acknowledgement's lease.")
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
    namespace: str,
    etcd_url: str,
    etcd_ca: str | None,
    etcd_cert: str | None,
    etcd_key: str | None,
    etcd_user: str | None,
    etcd_password: str | None,
    prefill_gpus: int,
    decode_gpus: int,
    prefill_cmd: str | None,
    decode_cmd: str | None,
    prefill_component: str,
    decode_component: str,
    prefill_endpoint: str,
    decode_endpoint: str,
    ready_mode: str,
    health_url: str | None,
    settle: float,
    ready_timeout: float,
    max_start_failures: int,
    retry_backoff: float,
    gpu_model: str | None,
    node_id: str | None,
    nvlink: bool,
    same_numa: bool,
    nic: str | None,
    nic_link: str | None,
    strategy: str | None,
    poll_interval: float,
    graceful_timeout: float,
    lease_ttl: int,
    once: bool,
    metrics_port: int | None,
    metrics_host: str,
    runtime_dir: str | None,
    verbose: bool,
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
    if not prefill_cmd and not decode_cmd:
        fail("dynamo-actuate: give --prefill-cmd and/or --decode-cmd", 2)
    req: dict[str, Any] = {"gpu_model": gpu_model} if gpu_model else {}
    cons: dict[str, Any] = {}
    if node_id:
        cons["node_id"] = node_id
    if nvlink:
        cons["nvlink"] = True
    if same_numa:
        cons["same_numa"] = True
    if nic is not None:
        cons["nic"] = nic
    if nic_link is not None:
        cons["nic_link"] = nic_link
    if strategy:
        cons["strategy"] = strategy
    if ready_mode == "health" and not health_url:
        fail("dynamo-actuate: --ready health needs --health-url", 2)
    if health_url and ready_mode != "health":
        fail("dynamo-actuate: --health-url is only used with --ready health", 2)
    try:
        check_name("namespace", namespace)
        Constraints.parse(cons)  # a bad value is refused here, naming its flag, before anything starts
        specs = parse_specs(
            prefill_gpus,
            _split("--prefill-cmd", prefill_cmd),
            decode_gpus,
            _split("--decode-cmd", decode_cmd),
            req,
            cons,
            components={"prefill": prefill_component, "decode": decode_component},
            endpoints={"prefill": prefill_endpoint, "decode": decode_endpoint},
        )
        endpoints = [e.strip() for e in etcd_url.split(",") if e.strip()]
        if not endpoints:
            raise InvalidRequestError(f"--etcd: {etcd_url!r} names no endpoint", key="etcd")
        try:
            etcd = EtcdClient(
                endpoints[0],
                ca_file=etcd_ca,
                cert_file=etcd_cert,
                key_file=etcd_key,
                user=etcd_user,
                password=etcd_password,
            )
        except EtcdError as exc:
            flag = _ETCD_FLAGS.get(exc.key or "", "--etcd")
            raise InvalidRequestError(f"{flag}: {exc}", key=flag) from exc
        readiness: Readiness
        if ready_mode == "health":
            readiness = HealthReadiness(health_url or "")
        elif ready_mode == "settle":
            readiness = SettleReadiness(settle)
        else:
            readiness = DiscoveryReadiness(etcd)
        # Validate the rest before anything starts (the runtime and the manager are opened later).
        if max_start_failures < 1:
            raise InvalidRequestError(f"--max-start-failures: {max_start_failures} is less than 1")
        for flag, value in (("--ready-timeout", ready_timeout), ("--retry-backoff", retry_backoff)):
            if value < 0:
                raise InvalidRequestError(f"{flag}: {value} is negative")
    except InvalidRequestError as exc:
        fail(f"dynamo-actuate: {flag_message(exc, REQUEST_FLAGS)}", 2)
    except EtcdError as exc:
        fail(f"dynamo-actuate: {exc}", 2)
    try:
        etcd.check()  # a wrong CA, certificate or password is refused here, before anything starts
    except EtcdError as exc:
        if not exc.transient:
            fail(f"dynamo-actuate: {exc}", 2)
        logging.getLogger(__name__).warning("dynamo-actuate: %s; will keep trying", exc)

    async def body(rt: LocalRuntime, stack: contextlib.AsyncExitStack) -> None:
        actuator = DynamoActuator(
            rt,
            etcd,
            namespace,
            specs,
            poll_interval_s=poll_interval,
            lease_ttl_s=lease_ttl,
            readiness=readiness,
            ready_timeout_s=ready_timeout,
            max_start_failures=max_start_failures,
            retry_backoff_s=retry_backoff,
            etcd_endpoints=",".join(endpoints),
        )
        if metrics_port is not None:
            await serve_metrics(stack, rt.manager, metrics_host, metrics_port, [ActuatorCollector(actuator)])
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
        runtime = LocalRuntime(mgr, CircusDaemon(runtime_dir), graceful_timeout_s=graceful_timeout)
        async with mgr, contextlib.AsyncExitStack() as stack:
            await body(runtime, stack)

    run(go())


def register(group: click.Group) -> None:
    """Add ``dynamo-actuate`` to a click group (the main ``computegroups`` CLI)."""
    group.add_command(dynamo_actuate_command)
