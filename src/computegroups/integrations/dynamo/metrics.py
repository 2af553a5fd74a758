"""Prometheus series of a Dynamo actuator: per role, the planner's target, the ready workers and the shortfall.

Computed at scrape time from the actuator's last convergence (:attr:`DynamoActuator.last_settled`, the
last one no newer decision superseded) and its count of decisions by outcome, so the convergence loop
does nothing for them. :class:`ActuatorCollector` goes on the registry of the manager's
:class:`~computegroups.service.metrics.Metrics`, so one ``/metrics`` serves both.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from computegroups.integrations.dynamo.actuator import ROLES, DynamoActuator

__all__ = ["DECISION_OUTCOMES", "ActuatorCollector"]

#: The ``outcome`` label of ``computegroups_dynamo_decisions_total``.
DECISION_OUTCOMES = ("met", "short", "superseded")


class ActuatorCollector(Collector):
    """The series of one actuator (roles without a worker spec are never scaled and have none)."""

    def __init__(self, actuator: DynamoActuator) -> None:
        self.actuator = actuator

    def collect(self) -> Iterator[Any]:
        act = self.actuator
        labels = ["component", "role"]
        target = GaugeMetricFamily(
            "computegroups_dynamo_target_replicas",
            "Workers of a role the planner's last decision wants (absent where it said nothing).",
            labels=labels,
        )
        ready = GaugeMetricFamily(
            "computegroups_dynamo_ready_replicas", "Workers of a role ready after the last convergence.", labels=labels
        )
        short = GaugeMetricFamily(
            "computegroups_dynamo_shortfall",
            "Workers of a role missing for the last decision after the last convergence (0: met).",
            labels=labels,
        )
        outcome = act.last_settled
        if outcome is not None:
            for role in ROLES:
                if role not in act.specs:
                    continue
                key = [act.component(role), role]
                wanted = outcome.targets.get(role)
                if wanted is not None:
                    target.add_metric(key, wanted)
                ready.add_metric(key, outcome.ready.get(role, 0))
                short.add_metric(key, outcome.shortfall.get(role, 0))
        decisions = CounterMetricFamily(
            "computegroups_dynamo_decisions",
            "Planner decisions by outcome: acknowledged met or short, or superseded while converging.",
            labels=["namespace", "outcome"],
        )
        for name in DECISION_OUTCOMES:
            decisions.add_metric([act.namespace, name], act.decisions[name])
        yield from (target, ready, short, decisions)
