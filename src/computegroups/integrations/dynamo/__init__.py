"""NVIDIA Dynamo planner integration: scale real workers on compute groups from the planner's decisions.

* :class:`DynamoActuator` (CLI ``computegroups dynamo-actuate``): watches the keys
  the planner writes with ``environment: virtual`` (``v1/{namespace}/planner/``),
  converges prefill and decode workers under the local runtime, and acknowledges
  with ``scaled_decision_id``.
* :class:`ComputeGroupsConnector`: the planner's ``PlannerConnector`` shape, to run
  the planner in process with compute groups as its environment.

Importable without Dynamo installed. See ``docs/dynamo.md``.
"""

from computegroups.integrations.dynamo.actuator import (
    DECODE,
    PREFILL,
    ROLES,
    Decision,
    DynamoActuator,
    Outcome,
    WorkerSpec,
    component_name,
    parse_specs,
    root_key,
)
from computegroups.integrations.dynamo.cli import register
from computegroups.integrations.dynamo.connector import ComputeGroupsConnector, GpuShape, WorkerInfo

__all__ = [
    "DECODE",
    "PREFILL",
    "ROLES",
    "ComputeGroupsConnector",
    "Decision",
    "DynamoActuator",
    "GpuShape",
    "Outcome",
    "WorkerInfo",
    "WorkerSpec",
    "component_name",
    "parse_specs",
    "register",
    "root_key",
]
