"""Kubernetes plumbing shared by the Kubernetes state store and the Kubernetes provider.

``client``: a thin JSON client over ``kubernetes_asyncio`` (kubeconfig or in-cluster configuration,
bearer tokens, exec plugins) that translates API errors in one place. ``names``: the API group,
labels and object names both sides agree on. Nothing here imports a store or a provider.
"""
