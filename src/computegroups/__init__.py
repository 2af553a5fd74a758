"""computegroups: one async API over GPU and CPU compute, locally and on Kubernetes.

>>> from computegroups import ComputeGroupManager, SimulatedComputeResourceProvider
"""

from computegroups.errors import (
    ComputeGroupsError,
    ConflictError,
    InsufficientResourcesError,
    InvalidRequestError,
    NotFoundError,
    ProviderError,
    StateError,
)
from computegroups.manager import ComputeGroupManager, Event
from computegroups.model import (
    AllocationState,
    ComputeGroup,
    ComputeNode,
    Constraints,
    GpuSpec,
    NodeSpec,
    Requirements,
    Strategy,
)
from computegroups.providers import (
    ComputeResourceProvider,
    Inventory,
    KubernetesComputeResourceProvider,
    LocalComputeResourceProvider,
    SimulatedComputeResourceProvider,
)
from computegroups.state import MemoryStateStore, SqliteStateStore, StateStore
from computegroups.state.kubernetes import KubernetesStateStore
from computegroups.topology import Topology, parse_nvidia_smi_topo

__version__ = "0.1.0"

__all__ = [
    "AllocationState",
    "ComputeGroup",
    "ComputeGroupManager",
    "ComputeGroupsError",
    "ComputeNode",
    "ComputeResourceProvider",
    "ConflictError",
    "Constraints",
    "Event",
    "GpuSpec",
    "InsufficientResourcesError",
    "InvalidRequestError",
    "Inventory",
    "KubernetesComputeResourceProvider",
    "KubernetesStateStore",
    "LocalComputeResourceProvider",
    "MemoryStateStore",
    "NodeSpec",
    "NotFoundError",
    "ProviderError",
    "Requirements",
    "SimulatedComputeResourceProvider",
    "SqliteStateStore",
    "StateError",
    "StateStore",
    "Strategy",
    "Topology",
    "__version__",
    "parse_nvidia_smi_topo",
]
