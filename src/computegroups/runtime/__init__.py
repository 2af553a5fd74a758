"""Local runtime: components run as circus watchers on their compute groups' devices.

>>> async with ComputeGroupManager(LocalComputeResourceProvider(), state) as mgr:  # doctest: +SKIP
...     runtime = LocalRuntime(mgr)
...     group, worker = await runtime.run("decode", {"gpus": 2}, ["python", "serve.py"])
"""

from computegroups.runtime.circus import CircusDaemon, CircusError, default_runtime_dir
from computegroups.runtime.local import REQUEST_PREFIX, LocalRuntime, RestartPolicy, Worker, sharing_env

__all__ = [
    "REQUEST_PREFIX",
    "CircusDaemon",
    "CircusError",
    "LocalRuntime",
    "RestartPolicy",
    "Worker",
    "default_runtime_dir",
    "sharing_env",
]
