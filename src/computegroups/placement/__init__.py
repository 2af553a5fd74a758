"""Placement: pure functions from (cluster occupancy, request) to a decision."""

from computegroups.placement.cluster import Cluster, NodeState
from computegroups.placement.engine import Decision, place

__all__ = ["Cluster", "Decision", "NodeState", "place"]
