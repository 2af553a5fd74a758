"""Every bad request gets its typed error and leaves the state exactly as it was."""

from __future__ import annotations

from typing import Any

import pytest

from computegroups import (
    ComputeGroupManager,
    ComputeGroupsError,
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
    Requirements,
)
from computegroups.model import Constraints

# (description, method, args, expected error, key the message names)
BAD: list[tuple[str, str, tuple[Any, ...], type[ComputeGroupsError], str]] = [
    ("gpus is a string", "allocate", ("c", {"gpus": "2"}), InvalidRequestError, "requirements.gpus"),
    ("gpus is a bool", "allocate", ("c", {"gpus": True}), InvalidRequestError, "requirements.gpus"),
    ("gpus negative", "allocate", ("c", {"gpus": -1}), InvalidRequestError, "requirements.gpus"),
    ("fraction above 1", "allocate", ("c", {"gpus": 1.5}), InvalidRequestError, "requirements.gpus"),
    ("gpus NaN", "allocate", ("c", {"gpus": float("nan")}), InvalidRequestError, "requirements.gpus"),
    ("gpus infinite", "allocate", ("c", {"gpus": float("inf")}), InvalidRequestError, "requirements.gpus"),
    ("share finer than 0.001", "allocate", ("c", {"gpus": 0.0001}), InvalidRequestError, "requirements.gpus"),
    ("unknown requirement", "allocate", ("c", {"gpus": 1, "gpu": 2}), InvalidRequestError, "requirements.gpu"),
    ("requirements not a dict", "allocate", ("c", [1]), InvalidRequestError, "requirements"),
    ("nothing requested", "allocate", ("c", {}), InvalidRequestError, "requirements"),
    (
        "memory negative",
        "allocate",
        ("c", {"gpus": 1, "memory_mib": -5}),
        InvalidRequestError,
        "requirements.memory_mib",
    ),
    (
        "memory fractional",
        "allocate",
        ("c", {"gpus": 1, "memory_mib": 1.5}),
        InvalidRequestError,
        "requirements.memory_mib",
    ),
    ("cpus a string", "allocate", ("c", {"cpus": "four"}), InvalidRequestError, "requirements.cpus"),
    (
        "gpu memory without gpus",
        "allocate",
        ("c", {"cpus": 1, "gpu_memory_mib": 10}),
        InvalidRequestError,
        "requirements.gpu_memory_mib",
    ),
    ("gpu model empty", "allocate", ("c", {"gpus": 1, "gpu_model": ""}), InvalidRequestError, "requirements.gpu_model"),
    (
        "gpu model a number",
        "allocate",
        ("c", {"gpus": 1, "gpu_model": 100}),
        InvalidRequestError,
        "requirements.gpu_model",
    ),
    ("unknown constraint", "allocate", ("c", {"gpus": 1}, {"nvlnk": True}), InvalidRequestError, "constraints.nvlnk"),
    (
        "strategy misspelt",
        "allocate",
        ("c", {"gpus": 1}, {"strategy": "pak"}),
        InvalidRequestError,
        "constraints.strategy",
    ),
    ("nvlink a string", "allocate", ("c", {"gpus": 2}, {"nvlink": "yes"}), InvalidRequestError, "constraints.nvlink"),
    ("labels a list", "allocate", ("c", {"gpus": 1}, {"labels": ["a"]}), InvalidRequestError, "constraints.labels"),
    (
        "label value a number",
        "allocate",
        ("c", {"gpus": 1}, {"labels": {"a": 1}}),
        InvalidRequestError,
        "constraints.labels",
    ),
    (
        "request id empty",
        "allocate",
        ("c", {"gpus": 1}, {"request_id": ""}),
        InvalidRequestError,
        "constraints.request_id",
    ),
    ("constraints not a dict", "allocate", ("c", {"gpus": 1}, "nvlink"), InvalidRequestError, "constraints"),
    ("component empty", "allocate", ("", {"gpus": 1}), InvalidRequestError, "component_name"),
    ("component with spaces", "allocate", ("a b", {"gpus": 1}), InvalidRequestError, "component_name"),
    ("component not a string", "allocate", (7, {"gpus": 1}), InvalidRequestError, "component_name"),
    ("more GPUs than any node", "allocate", ("c", {"gpus": 9}), InsufficientResourcesError, ""),
    ("unknown node", "allocate", ("c", {"gpus": 1}, {"node_id": "nope"}), InsufficientResourcesError, ""),
    ("unknown group released", "release", ("cg-nope",), NotFoundError, ""),
    ("unknown group drained", "drain", ("cg-nope",), NotFoundError, ""),
    ("unknown group fetched", "get", ("cg-nope",), NotFoundError, ""),
    ("unknown group deleted", "delete", ("cg-nope",), NotFoundError, ""),
    ("group id not a string", "release", (None,), InvalidRequestError, "group_id"),
    ("create with bad resources", "create", ({"gpus": -2},), InvalidRequestError, "requirements.gpus"),
    ("unknown filter", "list", ({"colour": "red"},), InvalidRequestError, "filters.colour"),
    ("unknown state filter", "list", ({"state": "busy"},), InvalidRequestError, "filters.state"),
    (
        "create on a node id that is not a string",
        "create",
        ({"gpus": 1}, 7),
        InvalidRequestError,
        "constraints.node_id",
    ),
    ("reserve with a string TTL", "reserve", ("c", {"gpus": 1}, None, "60"), InvalidRequestError, "ttl_seconds"),
    ("held_by a number", "held_by", (42,), InvalidRequestError, "component_name"),
    ("allocations of a number", "allocations", (3.5,), InvalidRequestError, "component_name"),
    ("clear health of a bool index", "clear_health", ("a6000-0", True), InvalidRequestError, "index"),
    ("clear health of a node that is not a name", "clear_health", (None, 0), InvalidRequestError, "node_id"),
]

R, C = "requirements", "constraints"
_ALLOC: list[tuple[str, dict[str, Any], dict[str, Any] | None, str]] = [
    # (what, requirements, constraints, key): numbers that must be finite and bounded
    ("gpus a 401-digit integer", {"gpus": 10**400}, None, f"{R}.gpus"),
    ("gpus an integer past str()'s digit limit", {"gpus": 10**5000}, None, f"{R}.gpus"),
    ("gpus 1e308", {"gpus": 1e308}, None, f"{R}.gpus"),
    ("gpus above the maximum", {"gpus": 1025}, None, f"{R}.gpus"),
    ("gpus 1e-10 (finer than 0.001)", {"gpus": 1e-10}, None, f"{R}.gpus"),
    ("gpus 0.0005", {"gpus": 0.0005}, None, f"{R}.gpus"),
    ("gpus minus infinity", {"gpus": float("-inf")}, None, f"{R}.gpus"),
    ("memory a 401-digit integer", {"memory_mib": 10**400}, None, f"{R}.memory_mib"),
    ("memory infinite", {"memory_mib": float("inf")}, None, f"{R}.memory_mib"),
    ("memory above 1 PiB", {"memory_mib": 2**30 + 1}, None, f"{R}.memory_mib"),
    ("gpu memory a 401-digit integer", {"gpus": 1, "gpu_memory_mib": 10**400}, None, f"{R}.gpu_memory_mib"),
    ("gpu memory NaN", {"gpus": 1, "gpu_memory_mib": float("nan")}, None, f"{R}.gpu_memory_mib"),
    ("nodes a 401-digit integer", {"gpus": 1, "nodes": 10**400}, None, f"{R}.nodes"),
    ("nodes zero", {"gpus": 1, "nodes": 0}, None, f"{R}.nodes"),
    ("nodes a fraction", {"gpus": 1, "nodes": 1.5}, None, f"{R}.nodes"),
    ("nodes above the maximum", {"gpus": 1, "nodes": 4097}, None, f"{R}.nodes"),
    ("cpus 1e308", {"cpus": 1e308}, None, f"{R}.cpus"),
    ("cpus a 401-digit integer", {"cpus": 10**400}, None, f"{R}.cpus"),
    ("cpus 1e-10", {"cpus": 1e-10}, None, f"{R}.cpus"),
    ("cpus NaN", {"cpus": float("nan")}, None, f"{R}.cpus"),
    ("priority a 401-digit integer", {"gpus": 1}, {"priority": 10**400}, f"{C}.priority"),
    ("priority a fraction", {"gpus": 1}, {"priority": 1.5}, f"{C}.priority"),
    # names and ids, matched whole: no trailing newline, no control characters, bounded
    ("mig profile with a trailing newline", {"mig_profile": "1g.10gb\n"}, None, f"{R}.mig_profile"),
    ("mig profile with a trailing space", {"mig_profile": "1g.10gb "}, None, f"{R}.mig_profile"),
    ("mig profile a number", {"mig_profile": 5}, None, f"{R}.mig_profile"),
    # the one MIG profile rule (model.MIG_PROFILE), as cluster specs check it: 1-7 slices, no 0 GB
    ("mig profile of 8 slices", {"mig_profile": "8g.80gb"}, None, f"{R}.mig_profile"),
    ("mig profile of 0 GB", {"mig_profile": "1g.0gb"}, None, f"{R}.mig_profile"),
    ("gpu model with a newline", {"gpus": 1, "gpu_model": "h100\n"}, None, f"{R}.gpu_model"),
    ("gpu model with a NUL", {"gpus": 1, "gpu_model": "h\x00100"}, None, f"{R}.gpu_model"),
    ("gpu model alternatives not strings", {"gpus": 1, "gpu_model": ["h100", 3]}, None, f"{R}.gpu_model"),
    ("gpu model with 65 alternatives", {"gpus": 1, "gpu_model": ["h100"] * 65}, None, f"{R}.gpu_model"),
    ("pool with a trailing newline", {"gpus": 1, "pool": "serving\n"}, None, f"{R}.pool"),
    ("pool empty", {"gpus": 1, "pool": ""}, None, f"{R}.pool"),
    ("label key with a trailing newline", {"gpus": 1}, {"labels": {"pool\n": "dev"}}, f"{C}.labels"),
    ("label value with a trailing newline", {"gpus": 1}, {"labels": {"pool": "dev\n"}}, f"{C}.labels"),
    ("label value with a bell", {"gpus": 1}, {"labels": {"pool": "d\x07ev"}}, f"{C}.labels"),
    ("65 labels", {"gpus": 1}, {"labels": {f"k{n}": "v" for n in range(65)}}, f"{C}.labels"),
    ("node id with a trailing newline", {"gpus": 1}, {"node_id": "a6000\n"}, f"{C}.node_id"),
    ("request id with a newline", {"gpus": 1}, {"request_id": "r\n1"}, f"{C}.request_id"),
    ("request id of 300 characters", {"gpus": 1}, {"request_id": "r" * 300}, f"{C}.request_id"),
    ("reservation id with an escape", {"gpus": 1}, {"reservation_id": "cg-\x1b[2J"}, f"{C}.reservation_id"),
    ("tenant with a space", {"gpus": 1}, {"tenant": "team a"}, f"{C}.tenant"),
    ("pool constraint with a trailing newline", {"gpus": 1}, {"pool": "serving\n"}, f"{C}.pool"),
    ("affinity to a name with a newline", {"gpus": 1}, {"affinity": ["decode\n"]}, f"{C}.affinity[0]"),
    ("65 anti-affinity rules", {"gpus": 1}, {"anti_affinity": ["x"] * 65}, f"{C}.anti_affinity"),
    ("anti-affinity a number", {"gpus": 1}, {"anti_affinity": 5}, f"{C}.anti_affinity"),
    ("affinity scope unknown", {"gpus": 1}, {"affinity": [{"component": "x", "scope": "rack"}]}, f"{C}.affinity[0]"),
    ("strategy a number", {"gpus": 1}, {"strategy": 5}, f"{C}.strategy"),
    ("same_numa an integer", {"gpus": 1}, {"same_numa": 1}, f"{C}.same_numa"),
    ("nic with a space", {"gpus": 1}, {"nic": "NIC 0"}, f"{C}.nic"),
    ("nic empty", {"gpus": 1}, {"nic": ""}, f"{C}.nic"),
    ("nic a number", {"gpus": 1}, {"nic": 0}, f"{C}.nic"),
    ("nic with a trailing newline", {"gpus": 1}, {"nic": "mlx5_0\n"}, f"{C}.nic"),
    ("nic link unknown", {"gpus": 1}, {"nic": "any", "nic_link": "NEAR"}, f"{C}.nic_link"),
    ("nic link an NVLink", {"gpus": 1}, {"nic": "any", "nic_link": "NV4"}, f"{C}.nic_link"),
    ("nic link a number", {"gpus": 1}, {"nic": "any", "nic_link": 3}, f"{C}.nic_link"),
    ("nic link without a nic", {"gpus": 1}, {"nic_link": "PHB"}, f"{C}.nic_link"),
]
BAD += [(what, "allocate", ("c", req, cons), InvalidRequestError, key) for what, req, cons, key in _ALLOC]
BAD += [
    ("component with a trailing newline", "allocate", ("decode\n", {"gpus": 1}), InvalidRequestError, "component_name"),
    ("component with a NUL", "allocate", ("dec\x00ode", {"gpus": 1}), InvalidRequestError, "component_name"),
    ("component of 254 characters", "allocate", ("c" * 254, {"gpus": 1}), InvalidRequestError, "component_name"),
    ("filters a string", "list", ("x",), InvalidRequestError, "filters"),
    ("filters a list", "list", ([("state", "allocated")],), InvalidRequestError, "filters"),
    ("component filter a number", "list", ({"component": 5},), InvalidRequestError, "filters.component"),
    (
        "include_released a string",
        "list",
        ({"include_released": "yes"},),
        InvalidRequestError,
        "filters.include_released",
    ),
    ("group id with a trailing newline", "release", ("cg-1\n",), InvalidRequestError, "group_id"),
    ("group id empty", "get", ("",), InvalidRequestError, "group_id"),
    ("group id a huge integer", "drain", (10**400,), InvalidRequestError, "group_id"),
    ("group id of 300 characters", "delete", ("g" * 300,), InvalidRequestError, "group_id"),
    ("reserve for 10**400 seconds", "reserve", ("c", {"gpus": 1}, None, 10**400), InvalidRequestError, "ttl_seconds"),
    ("reserve for NaN seconds", "reserve", ("c", {"gpus": 1}, None, float("nan")), InvalidRequestError, "ttl_seconds"),
    ("reserve for -1 seconds", "reserve", ("c", {"gpus": 1}, None, -1), InvalidRequestError, "ttl_seconds"),
    ("reserve with huge gpus", "reserve", ("c", {"gpus": 10**400}), InvalidRequestError, "requirements.gpus"),
    ("held_by a name with a newline", "held_by", ("c\n",), InvalidRequestError, "component_name"),
    ("allocations of 300 characters", "allocations", ("c" * 300,), InvalidRequestError, "component_name"),
    (
        "create with 10**400 memory",
        "create",
        ({"memory_mib": 10**400},),
        InvalidRequestError,
        "requirements.memory_mib",
    ),
    ("create on a node with a newline", "create", ({"gpus": 1}, "a6000\n"), InvalidRequestError, "constraints.node_id"),
    ("clear health of a node with a newline", "clear_health", ("a6000\n", 0), InvalidRequestError, "node_id"),
]


async def _call(mgr: ComputeGroupManager, method: str, args: tuple[Any, ...]) -> Any:
    if method == "held_by":  # the synchronous one
        return mgr.held_by(*args)
    fn = {
        "reserve": mgr.reserve_compute_group,
        "allocations": mgr.get_component_allocations,
        "clear_health": mgr.clear_device_health,
        "allocate": mgr.allocate_compute_group,
        "release": mgr.deallocate_compute_group,
        "drain": mgr.drain_compute_group,
        "get": mgr.get_compute_group,
        "delete": mgr.delete_compute_group,
        "create": mgr.create_compute_group,
        "list": mgr.list_compute_groups,
    }[method]
    return await fn(*args)


async def _snapshot(mgr: ComputeGroupManager) -> tuple[Any, ...]:
    groups = await mgr.list_compute_groups({"include_released": True})
    return (mgr.revision, await mgr.get_allocation_summary(), [g.to_dict() for g in groups])


def test_the_table_is_big_enough() -> None:
    assert len(BAD) >= 60


@pytest.mark.parametrize(("what", "method", "args", "error", "key"), BAD, ids=[b[0] for b in BAD])
async def test_bad_request_is_typed_and_changes_nothing(
    a6000: ComputeGroupManager, what: str, method: str, args: tuple[Any, ...], error: type[Exception], key: str
) -> None:
    held = await a6000.allocate_compute_group("existing", {"gpus": 2})
    before = await _snapshot(a6000)
    with pytest.raises(error) as info:
        await _call(a6000, method, args)
    if key:
        assert isinstance(info.value, InvalidRequestError)
        assert info.value.key == key
        assert key.split(".")[-1] in str(info.value)
        message = str(info.value)
        assert "\n" not in message and len(message) < 400  # one line, short even for a 5000-digit number
    assert await _snapshot(a6000) == before
    assert (await a6000.get_compute_group(held.id)).allocation_state == "allocated"


async def test_releasing_a_free_group_returns_false_and_changes_nothing(a6000: ComputeGroupManager) -> None:
    g = await a6000.allocate_compute_group("c", {"gpus": 1})
    assert await a6000.deallocate_compute_group(g.id) is True
    before = await _snapshot(a6000)
    assert await a6000.deallocate_compute_group(g.id) is False
    assert await _snapshot(a6000) == before
    carved = await a6000.create_compute_group({"gpus": 1})
    before = await _snapshot(a6000)
    assert await a6000.deallocate_compute_group(carved.id) is False
    assert await _snapshot(a6000) == before


async def test_request_id_reused_by_another_component_conflicts(a6000: ComputeGroupManager) -> None:
    await a6000.allocate_compute_group("a", {"gpus": 1}, {"request_id": "r1"})
    before = await _snapshot(a6000)
    with pytest.raises(ConflictError):
        await a6000.allocate_compute_group("b", {"gpus": 1}, {"request_id": "r1"})
    assert await _snapshot(a6000) == before


def test_typed_requirements_validate_too() -> None:
    with pytest.raises(InvalidRequestError):
        Requirements(gpus=-1)
    assert Requirements(gpus=0.25).share_milli == 250
    assert Requirements(gpus=2.0).whole_gpus == 2
    assert Requirements.parse({"gpus": 1, "gpu_model": ["H100", "A100"]}).models == ("h100", "a100")


def test_messages_name_key_value_and_allowed() -> None:
    with pytest.raises(InvalidRequestError) as info:
        from computegroups.model import Constraints

        Constraints.parse({"strategy": "pak"})
    assert str(info.value) == "constraints.strategy: 'pak' is not one of binpack, spread"


async def test_remembered_requests_stay_type_exact(a6000: ComputeGroupManager) -> None:
    """A valid request is remembered by content; 1, 1.0 and True are not the same request."""
    first = Requirements.parse({"gpus": 1})
    assert Requirements.parse({"gpus": 1}) is first
    with pytest.raises(InvalidRequestError):
        Requirements.parse({"gpus": True})
    as_float = Requirements.parse({"gpus": 1.0})
    assert as_float is not first and type(as_float.gpus) is float
    assert Constraints.parse({"nvlink": True}).nvlink is True
    with pytest.raises(InvalidRequestError, match="nvlink"):
        await a6000.allocate_compute_group("c", {"gpus": 1}, {"nvlink": 1})


def test_a_remembered_constraint_does_not_follow_the_callers_dict() -> None:
    labels = {"zone": "a"}
    cons = Constraints.parse({"labels": labels})
    labels["zone"] = "b"  # the caller reuses its dict
    assert cons.labels == {"zone": "a"}
    assert Constraints.parse({"labels": {"zone": "b"}}).labels == {"zone": "b"}
