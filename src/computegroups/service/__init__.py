"""The HTTP service: ``computegroups serve``, its client and its metrics."""

from computegroups.service.app import build_app, openapi
from computegroups.service.client import ComputeGroupsClient
from computegroups.service.metrics import Metrics
from computegroups.service.wire import RemoteComputeGroup

__all__ = ["ComputeGroupsClient", "Metrics", "RemoteComputeGroup", "build_app", "openapi"]
