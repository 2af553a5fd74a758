"""Pure helpers of the Kubernetes provider.

``discovery``: pure functions from API objects to node specs and from groups to pod fragments and
ResourceClaims; nothing there does I/O. The client and the names shared with the state store are
in :mod:`computegroups.kube`.
"""
