"""Providers: discovery and materialisation per environment."""

from computegroups.providers.base import ComputeResourceProvider, DeviceHealth, Inventory
from computegroups.providers.kubernetes import KubernetesComputeResourceProvider
from computegroups.providers.local import LocalComputeResourceProvider
from computegroups.providers.simulated import SimulatedComputeResourceProvider

__all__ = [
    "ComputeResourceProvider",
    "DeviceHealth",
    "Inventory",
    "KubernetesComputeResourceProvider",
    "LocalComputeResourceProvider",
    "SimulatedComputeResourceProvider",
]
