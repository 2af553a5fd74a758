"""Configuration files as pydantic models: the cluster spec and its pools, with a published JSON Schema.

These are the shapes of the files people write (``--spec cluster.yaml``, ``--pools pools.yaml``);
each field is checked here, once, and a bad file is refused with one line naming where
(``spec nodes[1].cpus: ...``), as an :class:`~computegroups.errors.InvalidRequestError`. The request
path (requirements and constraints of each allocation) keeps its own hand-written parsing in
:mod:`computegroups.model`, which is several times faster than a model per request.

``computegroups schema spec`` prints the JSON Schema (``docs/schema/spec.schema.json`` is that output),
for editors and CI checks of configuration repositories.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from computegroups.errors import InvalidRequestError
from computegroups.model import MAX_CPUS, MAX_GPUS, MAX_MEMORY_MIB, MIG_PROFILE, NAME

__all__ = [
    "ClusterSpec",
    "GpuConfig",
    "NodeConfig",
    "PoolConfig",
    "QuotaConfig",
    "QuotasConfig",
    "json_schema",
    "parse",
]

MAX_SPEC_NODES = 100_000  # nodes of one spec (entries times count)
_M = TypeVar("_M", bound=BaseModel)

Name = Annotated[str, Field(pattern="^" + NAME.pattern + "$", max_length=253)]
PRINTABLE = r"^[^\x00-\x1f\x7f-\x9f]+$"  # no control characters
Text = Annotated[str, Field(min_length=1, max_length=253, pattern=PRINTABLE)]
Whole = Annotated[int, Field(ge=0, le=MAX_MEMORY_MIB, strict=True)]
LabelValue = Annotated[str, Field(max_length=253, pattern=r"^[^\x00-\x1f\x7f-\x9f]*$")]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class GpuConfig(_Config):
    """The GPU of a node: model name, memory, and a count where neither preset nor topology says."""

    model: Text | None = None
    memory_mib: Whole | None = None
    count: Annotated[int, Field(ge=0, le=MAX_GPUS, strict=True)] | None = None


class NodeConfig(_Config):
    """One entry of ``nodes:`` (``count`` nodes of this shape)."""

    id: Name | None = None
    count: Annotated[int, Field(ge=0, le=MAX_SPEC_NODES, strict=True)] = 1
    preset: Literal["dgx-h100", "hgx-a100", "pcie-a6000-nvlink-pairs", "cpu-only"] | None = None
    topology: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    gpu: GpuConfig | None = None
    gpus: Annotated[int, Field(ge=0, le=MAX_GPUS, strict=True)] | None = None
    cpus: Annotated[float, Field(ge=0, le=MAX_CPUS)] | None = None
    memory_mib: Whole | None = None
    labels: dict[Name, LabelValue | int | float | bool] = Field(default_factory=dict)
    mig: dict[Annotated[int, Field(ge=0, lt=MAX_GPUS)], list[str]] | None = None

    @field_validator("cpus", mode="before")
    @classmethod
    def _cpus(cls, value: object) -> object:
        if isinstance(value, bool) or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"not a finite number in 0..{MAX_CPUS}")
        return value

    @field_validator("mig")
    @classmethod
    def _mig(cls, value: dict[int, list[str]] | None) -> dict[int, list[str]] | None:
        for index, profiles in (value or {}).items():
            if not profiles:
                raise ValueError(f"GPU {index}: not a list of profiles")
            slices = 0
            for p in profiles:
                m = MIG_PROFILE.fullmatch(p)
                if m is None:
                    raise ValueError(f"GPU {index}: {p[:40]!r} is not a MIG profile like 1g.10gb")
                slices += int(m.group(1))
            if slices > 7:
                raise ValueError(f"GPU {index}: more than 7 compute slices")
        return value

    def label_map(self) -> dict[str, str]:
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in self.labels.items()}


class QuotaConfig(_Config):
    """A ceiling on what one component or tenant may hold in a pool."""

    max_gpus: Annotated[float, Field(ge=0, le=MAX_GPUS * MAX_SPEC_NODES)] | None = None
    max_share: Annotated[float, Field(gt=0, le=1)] | None = None


class QuotasConfig(_Config):
    components: dict[Name, QuotaConfig] = Field(default_factory=dict)
    tenants: dict[Name, QuotaConfig] = Field(default_factory=dict)
    default_component: QuotaConfig | None = None
    default_tenant: QuotaConfig | None = None


class PoolConfig(_Config):
    """One entry of ``pools:``: nodes by label selector and/or id, a default priority and quotas."""

    name: Name
    selector: dict[Name, LabelValue] = Field(default_factory=dict)
    nodes: list[Name] = Field(default_factory=list)
    priority: Annotated[int, Field(ge=-1_000_000, le=1_000_000, strict=True)] = 0
    quotas: QuotasConfig = Field(default_factory=QuotasConfig)

    @model_validator(mode="after")
    def _members(self) -> PoolConfig:
        if not self.selector and not self.nodes:
            raise ValueError("give a selector or nodes")
        return self


class ClusterSpec(_Config):
    """A simulated cluster spec file: its nodes and, optionally, its pools."""

    nodes: Annotated[list[NodeConfig], Field(max_length=MAX_SPEC_NODES)]
    pools: list[PoolConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> ClusterSpec:
        names = [p.name for p in self.pools]
        dup = next((n for n in names if names.count(n) > 1), None)
        if dup is not None:
            raise ValueError(f"duplicate pool {dup!r}")
        if sum(n.count for n in self.nodes) > MAX_SPEC_NODES:
            raise ValueError(f"more than {MAX_SPEC_NODES} nodes")
        return self


_UNION_TAGS = frozenset({"int", "float", "bool", "str", "constrained-str", "list[str]"})


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part not in _UNION_TAGS and not part.startswith("function-"):
            out += f".{part}" if out else part
    return out


def parse(model: type[_M], data: object, what: str, key: str | None = None) -> _M:
    """``data`` as ``model``, or an InvalidRequestError naming the first bad field in one line.

    The message starts with ``what`` and the field's path (``spec nodes[1].cpus: ...``; only the path
    when ``what`` is empty). The error's ``key`` is ``key`` where given, else the bad field's name.
    """
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        where = _where(tuple(err["loc"]))
        message = " ".join(str(err["msg"]).removeprefix("Value error, ").removeprefix("Input ").split())
        message = message.split(" or instance of ", 1)[0]  # not the model's class name
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        value = err.get("input")
        hidden = err["type"] in ("missing", "extra_forbidden") or value is None or isinstance(value, dict | list)
        shown = "" if hidden else repr(value)
        shown = shown if len(shown) <= 40 else shown[:37] + "..."
        fields = [str(p) for p in err["loc"] if isinstance(p, str) and p not in _UNION_TAGS]
        key = key or (fields[-1] if fields else what or None)
        place = (f"{what}.{where}" if what.endswith("]") else f"{what} {where}" if what else where) if where else what
        text = f"{shown}: {message}" if shown else message
        raise InvalidRequestError(f"{place}: {text}" if place else text, key=key) from None


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema of a configuration file."""
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
