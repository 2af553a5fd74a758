"""Integrations with the systems that drive compute groups.

* :mod:`computegroups.integrations.dynamo`: NVIDIA Dynamo's planner (an etcd actuator
  for ``environment: virtual``, and an in-process ``PlannerConnector``).
* :mod:`computegroups.integrations.etcd`: a small etcd v3 client over the JSON gateway.

Nothing here imports Dynamo: it is optional, and used only where it is installed.
"""
