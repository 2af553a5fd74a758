"""Names the Kubernetes state store and provider agree on: the API group, labels, object names."""

from __future__ import annotations

import hashlib
import re

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "DELETED_LABEL",
    "DNS_NAME",
    "LIVE_SELECTOR",
    "MANAGED_BY",
    "STATE_LABEL",
    "STORE_LABEL",
    "cr_name",
]

API_GROUP = "computegroups.dev"
API_VERSION = f"{API_GROUP}/v1alpha1"
STORE_LABEL = f"{API_GROUP}/store"
DELETED_LABEL = f"{API_GROUP}/deleted"
#: the record's state on every ComputeGroup object (``deleted`` on a deletion tombstone)
STATE_LABEL = f"{API_GROUP}/state"
#: the label selector of live groups: what readers list and ``kubectl get cg -l`` shows
LIVE_SELECTOR = f"{STATE_LABEL} notin (released,deleted)"
MANAGED_BY = "app.kubernetes.io/managed-by"
#: a lowercase DNS subdomain name, as Kubernetes object names are
DNS_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def cr_name(group_id: str, store: str = "default") -> str:
    """The object name of a group: its id where that is a valid name, else a digest of it."""
    name = group_id if store == "default" else f"{store}.{group_id}"
    if DNS_NAME.match(name) and ".." not in name:
        return name
    return f"{store}.x-{hashlib.sha256(group_id.encode()).hexdigest()[:40]}"
