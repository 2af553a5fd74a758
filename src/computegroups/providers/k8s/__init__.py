"""Kubernetes plumbing shared by the Kubernetes provider and state store.

``client``: a thin JSON client over ``kubernetes_asyncio`` (kubeconfig or in-cluster
configuration, bearer tokens, exec plugins) that translates API errors in one place.
``discovery`` and ``materialise``: pure functions from API objects to node specs and
from groups to pod fragments and ResourceClaims; nothing there does I/O.
"""
