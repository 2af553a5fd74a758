"""Typed values: devices, nodes, requirements, constraints and group records.

Everything here is pure data with validation; nothing does I/O. Quantities are
kept as integers internally (GPU shares in thousandths, CPUs in millicores) so
that capacity arithmetic is exact.

Compiled with mypyc like the decision core (records, views and request parsing are on every
call's path). The frozen dataclasses stay plain Python classes (``native_class=False``): their
``__post_init__`` takes what a caller gave (a strategy's name, a list of models) and normalises
or refuses it, where a native class would raise ``TypeError`` on the declared type first.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import Enum, StrEnum
from types import MappingProxyType
from typing import Any, NamedTuple, TypeVar

from mypy_extensions import mypyc_attr

from computegroups.errors import InvalidRequestError, one_of
from computegroups.memo import Memo
from computegroups.topology import NIC_LINKS, Topology

__all__ = [
    "MAX_CPUS",
    "MAX_GPUS",
    "MAX_MEMORY_MIB",
    "MAX_NODES",
    "MIG_PROFILE",
    "MILLI",
    "NAME",
    "AllocationState",
    "ComputeGroup",
    "ComputeNode",
    "Constraints",
    "DeviceShare",
    "GangComputeGroup",
    "GpuSpec",
    "GroupRecord",
    "NodeSpec",
    "Requirements",
    "Strategy",
]

MILLI = 1000  # one whole GPU, one CPU core
#: A MIG profile's name (``1g.10gb``, ``3g.40gb``, ``1g.10gb+me``): compute slices (1-7; the group it
#: captures first) and memory in GB (the second), in either case. Requests and cluster specs both check against it.
MIG_PROFILE = re.compile(r"([1-7])g\.([1-9][0-9]{0,3})gb(\+me)?", re.IGNORECASE)
# Bounds of one request, far above any real machine: a number past them is a mistake, not a wish.
MAX_GPUS = 1024  # GPUs (or MIG devices) per node of a request
MAX_CPUS = 1_048_576  # CPU cores
MAX_MEMORY_MIB = 2**30  # MiB of host or GPU memory (1 PiB)
MAX_NODES = 4096  # nodes of one multi-node group
#: A component, pool or tenant name: matched whole (no trailing newline), 1-253 characters.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@-]{0,252}")
_TEXT = re.compile(r"[^\x00-\x1f\x7f-\x9f]{1,253}")  # an id or a model: no control characters
_LABEL_VALUE = re.compile(r"[^\x00-\x1f\x7f-\x9f]{0,253}")
_T = TypeVar("_T")


class AllocationState(StrEnum):
    """Lifecycle of a compute group.

    ``free``: pre-carved by ``create_compute_group``, holds its devices, no owner.
    ``reserved``: held for a component's planned scale-up.
    ``allocated``: owned by a component.
    ``draining``: gets no new owner; an owner it has keeps it until release.
    ``released``: gone; kept briefly as a tombstone so a second release is a no-op.
    """

    FREE = "free"
    RESERVED = "reserved"
    ALLOCATED = "allocated"
    DRAINING = "draining"
    RELEASED = "released"


class Strategy(StrEnum):
    """How to choose among nodes that fit: fill the fullest, or the emptiest."""

    BINPACK = "binpack"
    SPREAD = "spread"


# -- inventory ----------------------------------------------------------------
@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class GpuSpec:
    """One GPU as discovered: its node-local index is how nvidia-smi numbers it."""

    index: int
    uuid: str
    name: str
    memory_mib: int
    pci_bus_id: str = ""
    numa_node: int | None = None
    compute_capability: str = ""
    nvlink_domain: str = ""  # NVLink clique/partition id where known
    mig_profile: str = ""  # a MIG device (e.g. "3g.40gb"); given only to requests naming its profile
    parent_index: int | None = None  # nvidia-smi's index of the physical GPU, where it differs from ``index``
    parent_uuid: str = ""  # a MIG device's physical GPU

    @property
    def smi_index(self) -> int:
        """The index nvidia-smi shows for this device (its parent GPU's, for a MIG device)."""
        return self.parent_index if self.parent_index is not None else self.index

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class NodeSpec:
    """A machine as discovered: GPUs, their topology, CPUs and memory, labels."""

    id: str
    gpus: tuple[GpuSpec, ...] = ()
    topology: Topology | None = None
    cpus_milli: int = 0
    memory_mib: int = 0
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s: Any = self  # read untyped: compiled, a declared type is checked on read, before it is refused here
        if s.topology is not None and s.topology.gpu_count != len(s.gpus):
            raise InvalidRequestError(
                f"node {s.id}: topology has {s.topology.gpu_count} GPUs, inventory has {len(s.gpus)}",
                key="topology",
            )
        if [g.index for g in s.gpus] != list(range(len(s.gpus))):
            raise InvalidRequestError(f"node {s.id}: GPU indices must be 0..n-1 in order", key="gpus")

    @property
    def effective_topology(self) -> Topology:
        """The topology, or a uniform one where none was discovered."""
        if self.topology is not None:
            return self.topology
        return _uniform_topology(len(self.gpus))


_UNIFORM: dict[int, Topology] = {}


def _uniform_topology(n: int) -> Topology:
    if n not in _UNIFORM:
        _UNIFORM[n] = Topology.uniform(n, "SYS")
    return _UNIFORM[n]


# -- requests -----------------------------------------------------------------
def shown(value: object) -> str:
    """``repr(value)`` for a message, short even for an integer of a thousand digits."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {len(str(value)) if value.bit_length() < 10_000 else 'thousands of'} digits"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(key: str, value: object, maximum: float, *, integer: bool = False) -> float:
    """A finite number in [0, maximum] (an int or a float; a whole one if ``integer``)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "an integer" if integer else "a number"
        raise InvalidRequestError(f"{key}: {shown(value)} is not {kind}", key=key)
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidRequestError(f"{key}: {value!r} is not a finite number", key=key)
    if value < 0:
        raise InvalidRequestError(f"{key}: {shown(value)} is negative; it must be >= 0", key=key)
    if value > maximum:
        raise InvalidRequestError(f"{key}: {shown(value)} is above the maximum of {maximum:.0f}", key=key)
    if integer and value != int(value):
        raise InvalidRequestError(f"{key}: {value!r} is not a whole number", key=key)
    return value


def check_text(key: str, value: object, pattern: re.Pattern[str] = _TEXT, what: str = "") -> str:
    """A string matched whole by ``pattern`` (by default: 1-253 characters, none of them a control character)."""
    if not isinstance(value, str) or not pattern.fullmatch(value):
        what = what or "a non-empty string of at most 253 characters without control characters"
        raise InvalidRequestError(f"{key}: {shown(value)} is not {what}", key=key)
    return value


def check_bool(key: str, value: object) -> bool:
    """A bool (not 0 or 1)."""
    if not isinstance(value, bool):
        raise InvalidRequestError(f"{key}: {shown(value)} is not true or false", key=key)
    return value


def check_int_in(key: str, value: object, low: int, high: int) -> int:
    """An int (not a bool) in low..high."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidRequestError(f"{key}: {shown(value)} is not an integer in {low}..{high}", key=key)
    return value


def check_seconds(key: str, value: object) -> float | None:
    """None, or a number of seconds in (0, 1 day]."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 86_400:
        raise InvalidRequestError(f"{key}: {shown(value)} is not a number of seconds in (0, 86400]", key=key)
    return float(value)


def check_callable(key: str, value: object) -> Any:
    """A callable (a factory, a clock)."""
    if not callable(value):
        raise InvalidRequestError(f"{key}: {type(value).__name__} is not callable", key=key)
    return value


_NAME_RULE = "a name (1-253 of letters, digits and . _ : / @ -, starting alphanumeric)"


def check_name(key: str, value: object) -> str:
    """A component, pool or tenant name (:data:`NAME`)."""
    return check_text(key, value, NAME, _NAME_RULE)


def _known_keys(value: object, prefix: str, typename: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """A mapping's items, refusing a non-mapping or any key not in ``keys``."""
    if not isinstance(value, Mapping):
        raise InvalidRequestError(f"{prefix}: {type(value).__name__} is not a mapping or {typename}", key=prefix)
    unknown = sorted(str(k) for k in value if k not in keys)
    if unknown:
        raise InvalidRequestError(
            f"{prefix}.{unknown[0]}: unknown key; allowed: {one_of(keys)}", key=f"{prefix}.{unknown[0]}"
        )
    return dict(value)


_SCALARS = (str, int, float, bool, type(None))
_PARSED: Memo[tuple[object, ...], object] = Memo("class, type-exact request content", 4096)


def _frozen(value: object) -> object:
    """A hashable, type-exact image of a request value; TypeError for anything but plain data.

    Types are part of the image so that ``1``, ``1.0`` and ``True`` stay distinct requests.
    """
    t = type(value)
    if t in _SCALARS or isinstance(value, Enum):
        return (t, value)
    if t is list or t is tuple:
        return (t, tuple(_frozen(v) for v in value))  # type: ignore[attr-defined]
    if t is dict:
        return (t, tuple((k, _frozen(v)) for k, v in value.items()))  # type: ignore[attr-defined]
    raise TypeError(t)


def _parse_cached(cls: type[_T], value: Mapping[str, Any], build: Callable[[object], _T]) -> _T:
    """``build(value)``, remembered by the request's content: a planner sends the same few requests again and again."""
    if type(value) is not dict:
        return build(value)
    key: tuple[object, ...] = (cls, tuple(value.items()), tuple(map(type, value.values())))
    try:
        hit = _PARSED.get(key)  # flat requests: the common case, and the cheap key
    except TypeError:  # a list or a mapping inside
        try:
            key = (cls, _frozen(value))
        except TypeError:
            return build(value)
        hit = _PARSED.get(key)
    if hit is None:
        hit = _PARSED.put(key, build(value))  # build(value) raises for a bad request: only valid ones are remembered
    return hit  # type: ignore[return-value]


def _milli(key: str, value: float) -> int:
    scaled = value * MILLI
    rounded = round(scaled)
    if abs(scaled - rounded) > 1e-6 or (value > 0 and rounded == 0):
        raise InvalidRequestError(f"{key}: {value!r} is finer than the 0.001 resolution", key=key)
    return int(rounded)


_REQUIREMENTS_KEYS = ("gpus", "gpu_memory_mib", "gpu_model", "cpus", "memory_mib", "pool", "nodes", "mig_profile")


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class Requirements:
    """What a group must contain. Validated on construction.

    ``gpus``: whole GPUs (an int >= 0) or a share of one GPU (a float in (0, 1)).
    ``gpu_memory_mib``: minimum memory per GPU; for a share, the memory it needs.
    ``gpu_model``: case-insensitive substring of the product name (or a tuple of
    alternatives). ``cpus`` (cores, fractions allowed) and ``memory_mib``: host
    resources to hold beside the GPUs.
    """

    gpus: int | float = 0
    gpu_memory_mib: int | None = None
    gpu_model: str | tuple[str, ...] | None = None
    cpus: int | float = 0
    memory_mib: int = 0
    pool: str | None = None
    nodes: int = 1
    mig_profile: str | None = None
    # Normalised views, derived on construction (placement reads them on every candidate):
    #: whole GPUs requested (0 for a share or CPU only)
    whole_gpus: int = field(init=False, repr=False, compare=False)
    #: thousandths of one GPU requested as a share (0 when whole or none)
    share_milli: int = field(init=False, repr=False, compare=False)
    #: CPUs in thousandths of a core
    cpus_milli: int = field(init=False, repr=False, compare=False)
    #: lower-cased model alternatives (empty: any)
    models: tuple[str, ...] = field(init=False, repr=False, compare=False)
    #: whether any (non-MIG) GPU qualifies: no model, memory or MIG profile asked for
    any_gpu: bool = field(init=False, repr=False, compare=False)
    #: ``to_dict()``, read-only, as group records keep it
    stored: Mapping[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s: Any = self  # read untyped: compiled, a declared type is checked on read, before it is refused here
        if s.mig_profile is not None:
            if not isinstance(s.mig_profile, str) or not MIG_PROFILE.fullmatch(s.mig_profile):
                raise InvalidRequestError(
                    f"requirements.mig_profile: {shown(s.mig_profile)} is not a MIG profile such as '1g.10gb'",
                    key="requirements.mig_profile",
                )
            if s.gpus == 0:
                object.__setattr__(self, "gpus", 1)  # one MIG device unless more are asked for
        g = _number("requirements.gpus", s.gpus, MAX_GPUS)
        if s.mig_profile is not None and (g < 1 or g != int(g)):
            raise InvalidRequestError(
                "requirements.gpus: with mig_profile, gpus counts whole MIG devices", key="requirements.gpus"
            )
        if g >= 1 and g != int(g):
            raise InvalidRequestError(
                f"requirements.gpus: {s.gpus!r} is not allowed; use an int for whole GPUs "
                "or a float in (0, 1) for a share of one GPU",
                key="requirements.gpus",
            )
        if g < 1:
            _milli("requirements.gpus", g)
        if s.gpu_memory_mib is not None:
            _number("requirements.gpu_memory_mib", s.gpu_memory_mib, MAX_MEMORY_MIB, integer=True)
            if g == 0:
                raise InvalidRequestError(
                    "requirements.gpu_memory_mib: given without any gpus", key="requirements.gpu_memory_mib"
                )
        if s.gpu_model is not None:
            models = (s.gpu_model,) if isinstance(s.gpu_model, str) else s.gpu_model
            if (
                not isinstance(models, tuple)
                or not 0 < len(models) <= 64
                or not all(isinstance(m, str) and _TEXT.fullmatch(m) for m in models)
            ):
                raise InvalidRequestError(
                    f"requirements.gpu_model: {shown(s.gpu_model)} is not a non-empty string "
                    "(or list of them) without control characters",
                    key="requirements.gpu_model",
                )
            if g == 0:
                raise InvalidRequestError(
                    "requirements.gpu_model: given without any gpus", key="requirements.gpu_model"
                )
        _milli("requirements.cpus", _number("requirements.cpus", s.cpus, MAX_CPUS))
        _number("requirements.memory_mib", s.memory_mib, MAX_MEMORY_MIB, integer=True)
        if s.pool is not None:
            check_name("requirements.pool", s.pool)
        _number("requirements.nodes", s.nodes, MAX_NODES, integer=True)
        if s.nodes < 1:
            raise InvalidRequestError(
                f"requirements.nodes: {s.nodes!r} is not in 1..{MAX_NODES}", key="requirements.nodes"
            )
        if s.nodes > 1 and g < 1:
            raise InvalidRequestError(
                "requirements.nodes: a multi-node group needs whole gpus per node", key="requirements.nodes"
            )
        if g == 0 and s.cpus == 0 and s.memory_mib == 0:
            raise InvalidRequestError(
                "requirements: nothing requested; give gpus, cpus or memory_mib", key="requirements"
            )
        models = (s.gpu_model,) if isinstance(s.gpu_model, str) else s.gpu_model or ()
        object.__setattr__(self, "whole_gpus", int(g) if g >= 1 else 0)
        object.__setattr__(self, "share_milli", round(g * MILLI) if 0 < g < 1 else 0)
        object.__setattr__(self, "cpus_milli", round(s.cpus * MILLI))
        object.__setattr__(self, "models", tuple(m.lower() for m in models))
        object.__setattr__(self, "any_gpu", not models and s.gpu_memory_mib is None and s.mig_profile is None)
        object.__setattr__(self, "stored", MappingProxyType(self.to_dict()))

    @classmethod
    def parse(cls, value: Requirements | Mapping[str, Any]) -> Requirements:
        """Build from a dict (or return a Requirements as is); unknown keys are refused."""
        if isinstance(value, Requirements):
            return value
        return _parse_cached(cls, value, cls._build)

    @classmethod
    def _build(cls, value: object) -> Requirements:
        kwargs = _known_keys(value, "requirements", "Requirements", _REQUIREMENTS_KEYS)
        if isinstance(kwargs.get("gpu_model"), list):
            kwargs["gpu_model"] = tuple(kwargs["gpu_model"])
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"gpus": self.gpus}
        if self.gpu_memory_mib is not None:
            out["gpu_memory_mib"] = self.gpu_memory_mib
        if self.gpu_model is not None:
            out["gpu_model"] = self.gpu_model if isinstance(self.gpu_model, str) else list(self.gpu_model)
        if self.cpus:
            out["cpus"] = self.cpus
        if self.memory_mib:
            out["memory_mib"] = self.memory_mib
        if self.pool:
            out["pool"] = self.pool
        if self.nodes != 1:
            out["nodes"] = self.nodes
        if self.mig_profile:
            out["mig_profile"] = self.mig_profile
        return out


class Scope(StrEnum):
    """How close an affinity rule wants two components: the same node, or the same NVLink domain."""

    NODE = "node"
    NVLINK_DOMAIN = "nvlink_domain"


_AFFINITY_RULE_KEYS = ("component", "scope", "required")


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class AffinityRule:
    """Place near (affinity) or away from (anti-affinity) the groups of ``component``.

    ``required`` rules filter nodes; preferred ones (``required=False``) only score them.
    """

    component: str
    scope: Scope = Scope.NODE
    required: bool = True

    @classmethod
    def parse(cls, value: object, key: str) -> AffinityRule:
        if isinstance(value, AffinityRule):
            return value
        if isinstance(value, str):
            value = {"component": value}
        if not isinstance(value, Mapping):
            raise InvalidRequestError(f"{key}: {value!r} is not a component name or a rule mapping", key=key)
        unknown = sorted(str(k) for k in value if k not in _AFFINITY_RULE_KEYS)
        if unknown:
            raise InvalidRequestError(
                f"{key}.{unknown[0]}: unknown key; allowed: {one_of(_AFFINITY_RULE_KEYS)}", key=key
            )
        comp = value.get("component")
        if not isinstance(comp, str) or not NAME.fullmatch(comp):
            raise InvalidRequestError(f"{key}.component: {shown(comp)} is not a component name", key=key)
        scope = value.get("scope", "node")
        if scope not in [s.value for s in Scope]:
            raise InvalidRequestError(
                f"{key}.scope: {scope!r} is not one of {one_of([s.value for s in Scope])}", key=key
            )
        required = value.get("required", True)
        if not isinstance(required, bool):
            raise InvalidRequestError(f"{key}.required: {required!r} is not true or false", key=key)
        return cls(comp, Scope(scope), required)

    def to_dict(self) -> dict[str, Any]:
        return {"component": self.component, "scope": self.scope.value, "required": self.required}


_LABEL_KEY = re.compile(r"([A-Za-z0-9.\-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9_.\-]{0,61}[A-Za-z0-9])?")
_MAX_RULES = 64  # labels, affinity or anti-affinity rules in one request
#: A NIC as ``nvidia-smi topo -m`` names it (``NIC0``, ``mlx5_0``), or ``any``.
_NIC_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
#: The link ``nic_link`` defaults to: the NIC's NUMA node, never across the SMP interconnect.
DEFAULT_NIC_LINK = "NODE"


_CONSTRAINTS_KEYS = (
    "node_id",
    "strategy",
    "nvlink",
    "same_numa",
    "labels",
    "request_id",
    "pool",
    "tenant",
    "priority",
    "preemptible",
    "reservation_id",
    "affinity",
    "anti_affinity",
    "nic",
    "nic_link",
)


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class Constraints:
    """Where and how a group may be placed. Validated on construction.

    ``node_id``: only this node. ``strategy``: binpack (default) or spread.
    ``nvlink``: every pair of the group's GPUs joined by NVLink. ``same_numa``:
    all GPUs on one NUMA node. ``labels``: node label selector (all must match).
    ``request_id``: idempotency key; a retry with the same id returns the same group.
    ``pool`` / ``tenant``: the pool to place in and the tenant its quotas count against.
    ``priority`` (int, higher wins) and ``preemptible``: a request that does not fit may
    preempt preemptible groups of lower priority. ``reservation_id``: claim a reservation.
    ``affinity`` / ``anti_affinity``: lists of rules (a component name, or
    ``{"component", "scope": node|nvlink_domain, "required": bool}``).
    ``nic``: every GPU of the group near one NIC of the node, the one named (``NIC0`` or its
    device name ``mlx5_0``) or, with ``"any"``, any one; ``nic_link``: the farthest link a GPU
    may have to it, one of PIX, PXB, PHB, NODE (default: the NIC's NUMA node) or SYS.
    """

    node_id: str | None = None
    strategy: Strategy = Strategy.BINPACK
    nvlink: bool = False
    same_numa: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    request_id: str | None = None
    pool: str | None = None
    tenant: str | None = None
    priority: int = 0
    preemptible: bool = False
    reservation_id: str | None = None
    affinity: tuple[AffinityRule, ...] = ()
    anti_affinity: tuple[AffinityRule, ...] = ()
    nic: str | None = None
    nic_link: str | None = None
    #: ``to_dict()``, read-only, as group records keep it
    stored: Mapping[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        s: Any = self  # read untyped: compiled, a declared type is checked on read, before it is refused here
        for key in ("node_id", "request_id", "reservation_id"):
            v = getattr(self, key)
            if v is not None:
                check_text(f"constraints.{key}", v)
        for key in ("pool", "tenant"):
            v = getattr(self, key)
            if v is not None:
                check_name(f"constraints.{key}", v)
        if not isinstance(s.strategy, Strategy):
            allowed = [m.value for m in Strategy]
            if s.strategy not in allowed:
                raise InvalidRequestError(
                    f"constraints.strategy: {s.strategy!r} is not one of {one_of(allowed)}",
                    key="constraints.strategy",
                )
            object.__setattr__(self, "strategy", Strategy(s.strategy))
        if isinstance(s.priority, bool) or not isinstance(s.priority, int) or abs(s.priority) > 10**9:
            raise InvalidRequestError(
                f"constraints.priority: {shown(s.priority)} is not an integer in [-1e9, 1e9]",
                key="constraints.priority",
            )
        for key in ("affinity", "anti_affinity"):
            rules = getattr(self, key)
            if isinstance(rules, str | Mapping | AffinityRule):
                rules = (rules,)
            if not isinstance(rules, list | tuple) or len(rules) > _MAX_RULES:
                raise InvalidRequestError(
                    f"constraints.{key}: {shown(rules)} is not a list of at most {_MAX_RULES} rules",
                    key=f"constraints.{key}",
                )
            object.__setattr__(
                self, key, tuple(AffinityRule.parse(r, f"constraints.{key}[{n}]") for n, r in enumerate(rules))
            )
        for key in ("nvlink", "same_numa", "preemptible"):
            if not isinstance(getattr(self, key), bool):
                raise InvalidRequestError(
                    f"constraints.{key}: {getattr(self, key)!r} is not true or false", key=f"constraints.{key}"
                )
        if not isinstance(s.labels, Mapping) or len(s.labels) > _MAX_RULES:
            raise InvalidRequestError(
                f"constraints.labels: {shown(s.labels)} is not a mapping of at most {_MAX_RULES} labels",
                key="constraints.labels",
            )
        for k, v in s.labels.items():
            if not isinstance(k, str) or not _LABEL_KEY.fullmatch(k) or not isinstance(v, str):
                raise InvalidRequestError(
                    f"constraints.labels: {shown(k)}={shown(v)} is not a label key and string value",
                    key="constraints.labels",
                )
            check_text("constraints.labels", v, _LABEL_VALUE, "a label value without control characters")
        object.__setattr__(self, "labels", MappingProxyType(dict(s.labels)))  # the caller's dict may change
        self._check_nic()
        object.__setattr__(self, "stored", MappingProxyType(self.to_dict()))

    def _check_nic(self) -> None:
        s: Any = self  # read untyped, as in __post_init__
        if s.nic is None:
            if s.nic_link is not None:
                raise InvalidRequestError(
                    f"constraints.nic_link: {shown(s.nic_link)} has no NIC to be near"
                    " (give nic too: a NIC name or 'any')",
                    key="constraints.nic_link",
                )
            return
        check_text("constraints.nic", s.nic, _NIC_NAME, "a NIC name (NIC0, mlx5_0) or 'any'")
        link = DEFAULT_NIC_LINK if s.nic_link is None else s.nic_link
        if not isinstance(link, str) or link.upper() not in NIC_LINKS:
            raise InvalidRequestError(
                f"constraints.nic_link: {shown(link)} is not one of {one_of(NIC_LINKS)}", key="constraints.nic_link"
            )
        object.__setattr__(self, "nic_link", link.upper())

    @classmethod
    def parse(cls, value: Constraints | Mapping[str, Any] | None) -> Constraints:
        """Build from a dict or None (or return a Constraints as is); unknown keys are refused."""
        if value is None:
            return _DEFAULT_CONSTRAINTS
        if isinstance(value, Constraints):
            return value
        return _parse_cached(cls, value, cls._build)

    @classmethod
    def _build(cls, value: object) -> Constraints:
        return cls(**_known_keys(value, "constraints", "Constraints", _CONSTRAINTS_KEYS))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.strategy.value}
        if self.node_id:
            out["node_id"] = self.node_id
        if self.nvlink:
            out["nvlink"] = True
        if self.same_numa:
            out["same_numa"] = True
        if self.labels:
            out["labels"] = dict(self.labels)
        for key in ("pool", "tenant", "reservation_id"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        if self.priority:
            out["priority"] = self.priority
        if self.preemptible:
            out["preemptible"] = True
        if self.affinity:
            out["affinity"] = [r.to_dict() for r in self.affinity]
        if self.anti_affinity:
            out["anti_affinity"] = [r.to_dict() for r in self.anti_affinity]
        if self.nic is not None:
            out["nic"] = self.nic
            out["nic_link"] = self.nic_link
        return out


_DEFAULT_CONSTRAINTS = Constraints()


# -- state records ------------------------------------------------------------
_EMPTY: Mapping[str, Any] = MappingProxyType({})


@mypyc_attr(native_class=False)
@dataclass(frozen=True, slots=True)
class DeviceShare:
    """The part of one GPU a group holds: all of it (1000) or a share."""

    index: int
    uuid: str
    share_milli: int
    memory_mib: int


class GroupRecord(NamedTuple):
    """A compute group as the state store keeps it (the unit of commit).

    Immutable. A named tuple rather than a frozen dataclass: every decision builds
    one and every release copies one, and a tuple is built several times faster.
    Change one with :meth:`replace`.
    """

    id: str
    node_id: str
    state: AllocationState
    component: str | None
    devices: tuple[DeviceShare, ...]
    cpus_milli: int = 0
    memory_mib: int = 0
    request_id: str | None = None
    carved: bool = False  # made by create_compute_group: survives release as a free group
    requirements: Mapping[str, Any] = _EMPTY
    constraints: Mapping[str, Any] = _EMPTY
    created_at: float = 0.0
    updated_at: float = 0.0
    priority: int = 0
    preemptible: bool = False
    pool: str | None = None
    tenant: str | None = None
    expires_at: float | None = None  # reservations: capacity returns at this time unless claimed
    pending: bool = False  # a preemptor waiting for its draining victims; holds no capacity yet
    preempted_by: str | None = None  # on a victim: the group that preempted it
    gang_id: str | None = None  # parts of one multi-node group share it

    @property
    def holds_capacity(self) -> bool:
        """Whether this group's devices count as taken."""
        return self.state is not AllocationState.RELEASED and not self.pending

    @property
    def gpus(self) -> float:
        """GPUs held: an int for whole GPUs, a fraction for a share."""
        if len(self.devices) == 1 and self.devices[0].share_milli < MILLI:
            return self.devices[0].share_milli / MILLI
        return len(self.devices)

    @property
    def share_milli(self) -> int:
        """GPU capacity held, in thousandths of a GPU."""
        return sum(d.share_milli for d in self.devices)

    def replace(self, **changes: Any) -> GroupRecord:
        """A copy with ``changes`` applied and ``updated_at`` set (to now unless given)."""
        values = list(self)
        values[_UPDATED_AT] = time.time()
        try:
            for name, value in changes.items():
                values[_FIELD_INDEX[name]] = value
        except KeyError as exc:
            raise TypeError(f"GroupRecord has no field {exc}") from None
        return _new_tuple(GroupRecord, values)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "node_id": self.node_id,
            "state": self.state.value,
            "component": self.component,
            "devices": [[d.index, d.uuid, d.share_milli, d.memory_mib] for d in self.devices],
            "cpus_milli": self.cpus_milli,
            "memory_mib": self.memory_mib,
            "request_id": self.request_id,
            "carved": self.carved,
            "requirements": dict(self.requirements),
            "constraints": dict(self.constraints),
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            **{k: getattr(self, k) for k in _OPTIONAL_RECORD_FIELDS if getattr(self, k) not in (None, False, 0)},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> GroupRecord:
        """The record of :meth:`to_json`'s object, or of one with fields at their defaults left out."""
        get = data.get
        expires_at = get("expires_at")
        return _new_tuple(  # positionally, in field order: about half the time of keywords
            cls,
            (
                data["id"],
                data["node_id"],
                AllocationState(data["state"]),
                get("component"),
                tuple(DeviceShare(int(i), str(u), int(s), int(m)) for i, u, s, m in data["devices"]),
                int(get("cpus_milli", 0)),
                int(get("memory_mib", 0)),
                get("request_id"),
                bool(get("carved", False)),
                dict(get("requirements", _EMPTY)),
                dict(get("constraints", _EMPTY)),
                float(get("created_at", 0.0)),
                float(get("updated_at", 0.0)),
                int(get("priority", 0)),
                bool(get("preemptible", False)),
                get("pool"),
                get("tenant"),
                None if expires_at is None else float(expires_at),
                bool(get("pending", False)),
                get("preempted_by"),
                get("gang_id"),
            ),
        )


_FIELD_INDEX = {name: n for n, name in enumerate(GroupRecord._fields)}
_UPDATED_AT = _FIELD_INDEX["updated_at"]
_new_tuple = tuple.__new__
_OPTIONAL_RECORD_FIELDS = (
    "priority",
    "preemptible",
    "pool",
    "tenant",
    "expires_at",
    "pending",
    "preempted_by",
    "gang_id",
)


def group_env(record: GroupRecord) -> dict[str, str]:
    """The environment that isolates a group's workload to its devices."""
    devices = record.devices
    if not devices:
        return {"CUDA_VISIBLE_DEVICES": "", "COMPUTEGROUPS_GROUP_ID": record.id}
    if len(devices) > 1:
        return {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "CUDA_VISIBLE_DEVICES": ",".join([d.uuid for d in devices]),
            "COMPUTEGROUPS_GROUP_ID": record.id,
        }
    d = devices[0]
    env = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": d.uuid}
    if d.share_milli < MILLI:
        env["COMPUTEGROUPS_GPU_SHARE"] = f"{d.share_milli / MILLI:.3f}"
        env["COMPUTEGROUPS_GPU_MEMORY_MIB"] = str(d.memory_mib)
    env["COMPUTEGROUPS_GROUP_ID"] = record.id
    return env


# -- public views -------------------------------------------------------------
Telemetry = Callable[[str, int], Mapping[str, float]]  # (node_id, gpu index) -> metrics


@mypyc_attr(allow_interpreted_subclasses=True)  # the HTTP client's RemoteComputeGroup is one
class ComputeGroup:
    """A logical grouping of compute resources allocated as a unit (read-only view).

    Obtained from :class:`~computegroups.manager.ComputeGroupManager`; reflects
    the state when it was returned, except ``utilization``, which is read live.
    """

    __slots__ = ("_node", "_record", "_telemetry")

    def __init__(self, record: GroupRecord, node: NodeSpec | None, telemetry: Telemetry | None = None) -> None:
        self._record = record
        self._node = node
        self._telemetry = telemetry

    @property
    def id(self) -> str:
        """Unique identifier for this compute group."""
        return self._record.id

    @property
    def node_id(self) -> str:
        """The node whose devices this group holds."""
        return self._record.node_id

    @property
    def resources(self) -> dict[str, Any]:
        """Resources in this group: node_id, gpus, gpu_indices, gpu_uuids, and cpus / memory_mib where held."""
        r = self._record
        node = self._node
        indices: list[int] = []
        uuids: list[str] = []
        memory: list[int] = []
        gpus: list[GpuSpec] = []
        mig = False
        for d in r.devices:
            uuids.append(d.uuid)
            memory.append(d.memory_mib)
            if node is None:
                indices.append(d.index)
                continue
            g = node.gpus[d.index]
            gpus.append(g)
            mig = mig or bool(g.mig_profile)
            indices.append(g.index if g.parent_index is None else g.parent_index)  # what nvidia-smi shows
        out: dict[str, Any] = {
            "node_id": r.node_id,
            "gpus": r.gpus,
            "gpu_indices": indices,
            "gpu_uuids": uuids,
            "gpu_memory_mib": memory,
        }
        if gpus:
            out["gpu_model"] = gpus[0].name
            if mig:
                migs = [g for g in gpus if g.mig_profile]
                out["mig_profiles"] = [g.mig_profile for g in migs]
                out["mig_parent_uuids"] = [g.parent_uuid for g in migs]
        if r.cpus_milli:
            out["cpus"] = r.cpus_milli / MILLI
        if r.memory_mib:
            out["memory_mib"] = r.memory_mib
        return out

    @property
    def topology(self) -> dict[str, Any]:
        """Links between this group's GPUs, their NUMA nodes and the bottleneck link."""
        r = self._record
        idx = [d.index for d in r.devices]
        if self._node is None or not idx:
            return {"gpu_indices": idx, "links": {}, "numa_nodes": [], "bottleneck": None}
        topo = self._node.effective_topology
        links = {f"{a}-{b}": topo.link(a, b) for n, a in enumerate(idx) for b in idx[n + 1 :]}
        worst = min(links.items(), key=lambda kv: topo.rank(*map(int, kv[0].split("-"))))[1] if links else None
        out: dict[str, Any] = {
            "gpu_indices": idx,
            "links": links,
            "numa_nodes": sorted({n for n in (topo.numa_node(i) for i in idx) if n is not None}),
            "bottleneck": worst,
            "nvlink": bool(links) and all(topo.is_nvlink(a, b) for a, b in (map(int, k.split("-")) for k in links)),
        }
        if topo.nics:  # each NIC's link to each of the group's GPUs, in gpu_indices order
            out["nics"] = {nic.name: [nic.links[i] for i in idx] for nic in topo.nics}
        return out

    @property
    def utilization(self) -> dict[str, float]:
        """Live utilization of this group's GPUs: mean ``gpu`` percent and ``memory_used_mib``."""
        if self._telemetry is None or not self._record.devices:
            return {}
        samples = [self._telemetry(self._record.node_id, d.index) for d in self._record.devices]
        samples = [s for s in samples if s]
        if not samples:
            return {}
        return {
            "gpu": sum(s.get("gpu", 0.0) for s in samples) / len(samples),
            "memory_used_mib": sum(s.get("memory_used_mib", 0.0) for s in samples),
        }

    @property
    def allocation_state(self) -> str:
        """Current allocation state: free, reserved, allocated, draining or released."""
        return self._record.state.value

    @property
    def component(self) -> str | None:
        """Component currently using this group, if any."""
        return self._record.component

    @property
    def env(self) -> dict[str, str]:
        """Environment isolating a workload to this group (CUDA_VISIBLE_DEVICES as GPU UUIDs)."""
        return group_env(self._record)

    @property
    def request_id(self) -> str | None:
        """The idempotency key the group was allocated with, if any."""
        return self._record.request_id

    @property
    def record(self) -> GroupRecord:
        """The stored record behind this view."""
        return self._record

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description."""
        return {
            "id": self.id,
            "node_id": self.node_id,
            "component": self.component,
            "allocation_state": self.allocation_state,
            "resources": self.resources,
            "topology": self.topology,
            "env": self.env,
            "request_id": self.request_id,
        }

    def __repr__(self) -> str:
        r = self._record
        return (
            f"ComputeGroup(id={r.id!r}, node={r.node_id!r}, gpus={r.gpus}, "
            f"state={r.state.value}, component={r.component!r})"
        )

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ComputeGroup) and other._record == self._record

    def __hash__(self) -> int:
        return hash(self._record.id)


class GangComputeGroup(ComputeGroup):
    """One compute group that spans nodes (e.g. 2 nodes x 8 GPUs for a multi-node engine).

    ``node_id``, ``env`` and ``record`` are those of the first part; ``parts`` lists every
    node's part; ``envs`` maps each node to the environment of its part.
    """

    __slots__ = ("_gang_id", "_parts", "_specs")

    def __init__(
        self,
        gang_id: str,
        parts: list[GroupRecord],
        specs: Mapping[str, NodeSpec],
        telemetry: Telemetry | None = None,
    ) -> None:
        super().__init__(parts[0], specs.get(parts[0].node_id), telemetry)
        self._gang_id = gang_id
        self._parts = parts
        self._specs = specs

    @property
    def id(self) -> str:
        return self._gang_id

    @property
    def parts(self) -> list[ComputeGroup]:
        """The per-node groups, in order."""
        return [ComputeGroup(p, self._specs.get(p.node_id), self._telemetry) for p in self._parts]

    @property
    def part_records(self) -> list[GroupRecord]:
        return list(self._parts)

    @property
    def resources(self) -> dict[str, Any]:
        """Totals plus ``nodes``: each part's node_id, gpu_indices and gpu_uuids."""
        parts = [p.resources for p in self.parts]
        out = dict(parts[0])
        out["gpus"] = sum(p["gpus"] for p in parts)
        out["node_ids"] = [p["node_id"] for p in parts]
        out["nodes"] = parts
        out["gpu_uuids"] = [u for p in parts for u in p["gpu_uuids"]]
        return out

    @property
    def envs(self) -> dict[str, dict[str, str]]:
        """Per node, the environment of that node's part."""
        return {p.node_id: group_env(p) for p in self._parts}

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["id"] = self._gang_id
        out["envs"] = self.envs
        return out

    def __repr__(self) -> str:
        return f"GangComputeGroup(id={self._gang_id!r}, nodes={[p.node_id for p in self._parts]})"


class ComputeNode:
    """A machine with compute resources (read-only view with live utilization)."""

    __slots__ = ("_cordoned", "_free", "_groups", "_spec", "_telemetry", "_unhealthy")

    def __init__(
        self,
        spec: NodeSpec,
        groups: list[ComputeGroup],
        free: Mapping[str, float],
        unhealthy: frozenset[int] = frozenset(),
        telemetry: Telemetry | None = None,
        cordoned: str | None = None,
    ) -> None:
        self._spec = spec
        self._groups = groups
        self._free = dict(free)
        self._unhealthy = unhealthy
        self._telemetry = telemetry
        self._cordoned = cordoned

    @property
    def cordoned(self) -> str | None:
        """Why the node takes no new groups (an operator's cordon or the provider's), or None."""
        return self._cordoned

    @property
    def id(self) -> str:
        """Unique identifier for this node."""
        return self._spec.id

    @property
    def compute_groups(self) -> list[ComputeGroup]:
        """Compute groups on this node (free, reserved, allocated or draining)."""
        return list(self._groups)

    @property
    def resources(self) -> dict[str, Any]:
        """Total and free resources: gpus, gpu_model, gpu_memory_mib, cpus, memory_mib, labels, free,
        unhealthy_gpus, cordoned (the reason, or None)."""
        s = self._spec
        return {
            "gpus": len(s.gpus),
            "gpu_model": s.gpus[0].name if s.gpus else None,
            "gpu_memory_mib": s.gpus[0].memory_mib if s.gpus else 0,
            "gpu_uuids": [g.uuid for g in s.gpus],
            "cpus": s.cpus_milli / MILLI,
            "memory_mib": s.memory_mib,
            "labels": dict(s.labels),
            "free": dict(self._free),
            "unhealthy_gpus": sorted(self._unhealthy),
            "cordoned": self._cordoned,
        }

    @property
    def utilization(self) -> dict[str, float]:
        """Allocated share of GPUs (``gpus_allocated``) and live GPU use where monitored."""
        s = self._spec
        total = len(s.gpus)
        out: dict[str, float] = {}
        if total:
            out["gpus_allocated"] = 1.0 - self._free.get("gpus", 0.0) / total
        if s.cpus_milli:
            out["cpus_allocated"] = 1.0 - self._free.get("cpus", 0.0) * MILLI / s.cpus_milli
        if self._telemetry is not None and total:
            samples = [self._telemetry(s.id, g.index) for g in s.gpus]
            samples = [x for x in samples if x]
            if samples:
                out["gpu"] = sum(x.get("gpu", 0.0) for x in samples) / len(samples)
                out["memory_used_mib"] = sum(x.get("memory_used_mib", 0.0) for x in samples)
        return out

    @property
    def spec(self) -> NodeSpec:
        """What discovery found on this node."""
        return self._spec

    @property
    def topology(self) -> Topology:
        """The node's GPU topology (uniform where none was discovered)."""
        return self._spec.effective_topology

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description including the topology matrix."""
        topo = self.topology
        return {
            "id": self.id,
            "resources": self.resources,
            "utilization": self.utilization,
            "gpus": [g.to_dict() for g in self._spec.gpus],
            "topology": topo.matrix() if self._spec.gpus else [],
            "nics": [
                {"name": c.name, "device": c.device, "numa_node": c.numa_node, "links": list(c.links)}
                for c in topo.nics
            ],
            "groups": [g.id for g in self._groups],
        }

    def __repr__(self) -> str:
        return f"ComputeNode(id={self.id!r}, gpus={len(self._spec.gpus)})"
