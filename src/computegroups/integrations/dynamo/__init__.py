"""NVIDIA Dynamo planner integration: scale real workers on compute groups from the planner's decisions.

* :class:`DynamoActuator` (CLI ``computegroups dynamo-actuate``): watches the keys
  the planner writes with ``environment: virtual`` (``v1/{namespace}/planner/``),
  converges prefill and decode workers under the local runtime, waits until they
  are registered in Dynamo's discovery (:mod:`.readiness`), and acknowledges with
  ``scaled_decision_id``.
* :class:`ComputeGroupsConnector`: the planner's ``PlannerConnector`` shape, to run
  the planner in process with compute groups as its environment.
* :mod:`.config`: the actuator's configuration (``ActuatorConfig``, its JSON Schema);
  :mod:`.metrics`: its Prometheus series (``ActuatorCollector``).

Importable without Dynamo installed. See ``docs/dynamo.md``.
"""

from computegroups.integrations.dynamo.actuator import (
    DECODE,
    DEFAULT_DYNAMO_COMPONENTS,
    DEFAULT_DYNAMO_ENDPOINT,
    PREFILL,
    ROLES,
    SCALING_DECISION_KEY,
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
from computegroups.integrations.dynamo.readiness import (
    DiscoveryReadiness,
    HealthReadiness,
    Readiness,
    SettleReadiness,
    instances_prefix,
)

__all__ = [
    "DECODE",
    "DEFAULT_DYNAMO_COMPONENTS",
    "DEFAULT_DYNAMO_ENDPOINT",
    "PREFILL",
    "ROLES",
    "SCALING_DECISION_KEY",
    "ComputeGroupsConnector",
    "Decision",
    "DiscoveryReadiness",
    "DynamoActuator",
    "GpuShape",
    "HealthReadiness",
    "Outcome",
    "Readiness",
    "SettleReadiness",
    "WorkerInfo",
    "WorkerSpec",
    "component_name",
    "instances_prefix",
    "parse_specs",
    "register",
    "root_key",
]
