"""The Dynamo actuator's configuration as pydantic models, with a published JSON Schema.

``dynamo-actuate`` builds an :class:`ActuatorConfig` from ``--config FILE`` (YAML or JSON, these keys)
and its flags (a flag given on the command line, or by its environment variable, overrides the file),
checks it here once before anything starts, and builds the actuator from it; nothing of it is parsed
again while converging. A bad value is one line naming the field (``prefill.gpus: -1: ...``), which the
command turns into the flag that gave it (``--prefill-gpus``) or the file's field. What other parts
of the package already decide is left to them and reused: placement constraints and requirements
(:meth:`Constraints.parse`, :meth:`Requirements.parse`), the health URL template
(:func:`.readiness.health_url_problem`), etcd's URLs and TLS files (:class:`EtcdClient`).

``computegroups schema actuator`` prints the JSON Schema (``docs/schema/actuator.schema.json``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator

from computegroups.config import PRINTABLE, Text, _Config, parse
from computegroups.errors import InvalidRequestError
from computegroups.integrations.dynamo.actuator import (
    DEFAULT_DYNAMO_ENDPOINT,
    DYNAMO_NAME,
    DynamoActuator,
    WorkerSpec,
    parse_specs,
)
from computegroups.integrations.dynamo.readiness import (
    DiscoveryReadiness,
    HealthReadiness,
    Readiness,
    SettleReadiness,
    health_url_problem,
)
from computegroups.integrations.etcd import EtcdClient
from computegroups.model import MAX_GPUS, Constraints, Requirements
from computegroups.runtime.local import LocalRuntime

__all__ = ["ActuatorConfig", "EtcdConfig", "MetricsConfig", "ReadinessConfig", "RoleConfig", "parse_config"]

MAX_SECONDS = 10**7  # about 115 days: any timeout or interval
DynamoName = Annotated[str, Field(pattern=DYNAMO_NAME.pattern, max_length=253)]
Seconds = Annotated[float, Field(ge=0, le=MAX_SECONDS, strict=True)]
Argument = Annotated[str, Field(max_length=65_536)]
Long = Annotated[str, Field(min_length=1, max_length=4096, pattern=PRINTABLE)]  # a path, a URL


class RoleConfig(_Config):
    """The workers of one role: their command, GPUs per worker, and where they register in Dynamo."""

    command: Annotated[list[Argument], Field(min_length=1, max_length=4096)]
    gpus: Annotated[int, Field(ge=0, le=MAX_GPUS, strict=True)] = 1
    component: DynamoName | None = None
    endpoint: DynamoName = DEFAULT_DYNAMO_ENDPOINT


class EtcdConfig(_Config):
    """The etcd the planner writes to: endpoints (the actuator uses the first; workers get them all) and access."""

    endpoints: Annotated[list[Long], Field(min_length=1, max_length=64)] = ["http://127.0.0.1:2379"]
    ca_file: Long | None = None
    cert_file: Long | None = None
    key_file: Long | None = None
    user: Text | None = None
    password: str | None = None

    def client(self) -> EtcdClient:
        """A client of the first endpoint (EtcdError, with the setting at fault as its key, if refused)."""
        return EtcdClient(
            self.endpoints[0],
            ca_file=self.ca_file,
            cert_file=self.cert_file,
            key_file=self.key_file,
            user=self.user,
            password=self.password,
        )


class ReadinessConfig(_Config):
    """When a worker counts as ready: registered in Dynamo's discovery, healthy over HTTP, or running a while."""

    mode: Literal["discovery", "health", "settle"] = "discovery"
    health_url: Long | None = Field(default=None, validate_default=True)
    settle_s: Seconds = 5.0
    timeout_s: Seconds = 900.0

    @field_validator("health_url")
    @classmethod
    def _url(cls, value: str | None, info: ValidationInfo) -> str | None:
        health = info.data.get("mode") == "health"
        if value is None:
            if health:
                raise ValueError("needed by mode health")
            return value
        if not health:
            raise ValueError("used only by mode health")
        problem = health_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    def build(self, etcd: EtcdClient) -> Readiness:
        """The readiness check this describes (discovery is read from ``etcd``)."""
        if self.mode == "health":
            return HealthReadiness(self.health_url or "")
        if self.mode == "settle":
            return SettleReadiness(self.settle_s)
        return DiscoveryReadiness(etcd)


class MetricsConfig(_Config):
    """Where to serve Prometheus ``/metrics`` and ``/healthz``."""

    port: Annotated[int, Field(ge=0, le=65535, strict=True)]
    host: Text = "127.0.0.1"


class ActuatorConfig(_Config):
    """What ``dynamo-actuate`` runs with: the namespace, etcd, each role's workers, placement, readiness, timing."""

    namespace: DynamoName
    etcd: EtcdConfig = Field(default_factory=EtcdConfig)
    prefill: RoleConfig | None = None
    decode: RoleConfig | None = Field(default=None, validate_default=True)
    requirements: dict[str, Any] = Field(default_factory=dict)
    constraints: dict[str, Any] = Field(default_factory=dict)
    readiness: ReadinessConfig = Field(default_factory=ReadinessConfig)
    max_start_failures: Annotated[int, Field(ge=1, le=10_000, strict=True)] = 3
    retry_backoff_s: Seconds = 1.0
    retry_backoff_max_s: Seconds = 60.0
    deregister_timeout_s: Seconds = 40.0
    poll_interval_s: Annotated[float, Field(gt=0, le=MAX_SECONDS, strict=True)] = 5.0
    graceful_timeout_s: Seconds = 30.0
    lease_ttl_s: Annotated[int, Field(ge=1, le=86_400, strict=True)] = 10
    metrics: MetricsConfig | None = None

    @field_validator("decode")
    @classmethod
    def _a_role(cls, value: RoleConfig | None, info: ValidationInfo) -> RoleConfig | None:
        if value is None and info.data.get("prefill") is None:
            raise ValueError("no role to scale: give prefill and/or decode")
        return value

    def roles(self) -> dict[str, RoleConfig]:
        """The roles to scale, by name."""
        return {role: cfg for role, cfg in (("prefill", self.prefill), ("decode", self.decode)) if cfg is not None}

    def specs(self) -> dict[str, WorkerSpec]:
        """The worker spec of each role to scale."""
        roles = self.roles()
        prefill, decode = roles.get("prefill"), roles.get("decode")
        return parse_specs(
            prefill.gpus if prefill else 1,
            prefill.command if prefill else None,
            decode.gpus if decode else 1,
            decode.command if decode else None,
            self.requirements,
            self.constraints,
            components={r: c.component for r, c in roles.items()},
            endpoints={r: c.endpoint for r, c in roles.items()},
        )

    def actuator(self, runtime: LocalRuntime, etcd: EtcdClient, readiness: Readiness | None = None) -> DynamoActuator:
        """The actuator this describes, on ``runtime`` (whose manager is open) and ``etcd``."""
        return DynamoActuator(
            runtime,
            etcd,
            self.namespace,
            self.specs(),
            poll_interval_s=self.poll_interval_s,
            lease_ttl_s=self.lease_ttl_s,
            readiness=readiness or self.readiness.build(etcd),
            ready_timeout_s=self.readiness.timeout_s,
            max_start_failures=self.max_start_failures,
            retry_backoff_s=self.retry_backoff_s,
            retry_backoff_max_s=self.retry_backoff_max_s,
            deregister_timeout_s=self.deregister_timeout_s,
            etcd_endpoints=",".join(self.etcd.endpoints),
        )


def parse_config(data: object, what: str = "") -> ActuatorConfig:
    """``data`` as an :class:`ActuatorConfig`, or an InvalidRequestError naming the first bad field in one line.

    Placement is checked by the rules every allocation follows: ``constraints`` as
    :meth:`Constraints.parse`, ``requirements`` (with each role's ``gpus``) as
    :meth:`Requirements.parse`; their errors name ``constraints.KEY`` / ``requirements.KEY``.
    ``what`` (a file's path) starts each message.
    """
    config = parse(ActuatorConfig, data, what)
    prefix = f"{what} " if what else ""
    try:
        if "gpus" in config.requirements:
            raise InvalidRequestError(
                "requirements.gpus: set per role (prefill.gpus, decode.gpus)", key="requirements.gpus"
            )
        Constraints.parse(config.constraints)
        for cfg in config.roles().values():
            Requirements.parse({**config.requirements, "gpus": cfg.gpus})
    except InvalidRequestError as exc:
        raise InvalidRequestError(f"{prefix}{exc}", key=exc.key) from None
    return config
