"""List-then-watch (``kube/informer.py``) against the real API server: a collection followed
incrementally, a watch the server ends taken up again from where it was (no list), a version too
old for the server (410 Gone) listed again."""

from __future__ import annotations

import asyncio
import base64
import json
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from computegroups.kube.client import KubeClient, Obj
from computegroups.kube.informer import Informer, follow

from .harness import ControlPlane

pytestmark = pytest.mark.k8s


def _pod(name: str, namespace: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"containers": [{"name": "x", "image": "busybox"}]},
    }


async def _until(check: Callable[[], bool], what: str, timeout_s: float = 30.0, state: object = None) -> None:
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what} ({state!r})")


async def test_an_informer_follows_adds_changes_and_deletes_without_listing_again(
    k8s_cluster: ControlPlane, k8s_namespace: str
) -> None:
    api = k8s_cluster.client()
    pods = f"/api/v1/namespaces/{k8s_namespace}/pods"
    api.post(pods, _pod("before", k8s_namespace))
    client = await KubeClient.create(k8s_cluster.kubeconfig)
    informer = Informer(client, pods)
    try:
        await informer.start()
        assert sorted(informer.items) == [f"{k8s_namespace}/before"] and informer.lists == 1
        informer.changed.clear()
        version = informer.version
        api.post(pods, _pod("after", k8s_namespace))
        await _until(lambda: f"{k8s_namespace}/after" in informer.items, "the new pod")
        assert informer.changed.is_set() and informer.version > version
        api.patch(f"{pods}/after", {"metadata": {"labels": {"colour": "blue"}}})
        await _until(
            lambda: informer.items[f"{k8s_namespace}/after"]["metadata"].get("labels", {}).get("colour") == "blue",
            "the label",
        )
        api.request("DELETE", f"{pods}/before", {"gracePeriodSeconds": 0})
        await _until(lambda: f"{k8s_namespace}/before" not in informer.items, "the deletion")
        assert informer.lists == 1  # all of it came by the watch
        fresh = {f"{k8s_namespace}/{p['metadata']['name']}": p for p in api.get(pods)["items"]}
        assert {k: o["metadata"]["resourceVersion"] for k, o in informer.items.items()} == {
            k: o["metadata"]["resourceVersion"] for k, o in fresh.items()
        }
    finally:
        await informer.close()
        await client.close()
    assert not informer.running


async def test_the_readers_own_objects_are_kept_without_signalling(
    k8s_cluster: ControlPlane, k8s_namespace: str
) -> None:
    """``quiet`` objects (a manager's own pods and claims) are followed but do not move ``version`` or
    set ``changed``: the manager knows of them from its records, so they cause no sample of their own;
    anyone else's still do, and so does one of its own turning into someone else's."""
    api = k8s_cluster.client()
    pods = f"/api/v1/namespaces/{k8s_namespace}/pods"
    client = await KubeClient.create(k8s_cluster.kubeconfig)
    informer = Informer(client, pods, quiet=lambda o: (o["metadata"].get("labels") or {}).get("mine") == "yes")
    try:
        await informer.start()
        informer.changed.clear()
        version = informer.version
        api.post(pods, _pod("own", k8s_namespace, mine="yes"))
        await _until(lambda: f"{k8s_namespace}/own" in informer.items, "the own pod")
        api.patch(f"{pods}/own", {"metadata": {"labels": {"colour": "blue"}}})
        await _until(
            lambda: informer.items[f"{k8s_namespace}/own"]["metadata"]["labels"].get("colour") == "blue", "the label"
        )
        api.request("DELETE", f"{pods}/own", {"gracePeriodSeconds": 0})
        await _until(lambda: f"{k8s_namespace}/own" not in informer.items, "the deletion")
        assert informer.version == version and not informer.changed.is_set()
        api.post(pods, _pod("theirs", k8s_namespace))
        await _until(lambda: informer.changed.is_set(), "a signal for someone else's pod")
        informer.changed.clear()
        api.post(pods, _pod("given", k8s_namespace, mine="yes"))
        await _until(lambda: f"{k8s_namespace}/given" in informer.items, "the second own pod")
        assert not informer.changed.is_set()
        api.patch(f"{pods}/given", {"metadata": {"labels": {"mine": "no"}}})
        await _until(lambda: informer.changed.is_set(), "a signal once it is not ours")
    finally:
        await informer.close()
        await client.close()


async def test_follow_watches_again_from_where_it_was_without_listing(
    k8s_cluster: ControlPlane, k8s_namespace: str
) -> None:
    """Watches the server ends (``timeout_s=1``) are opened again from the last version: a pod created
    after several of them arrives, and the collection was listed once."""
    api = k8s_cluster.client()
    pods = f"/api/v1/namespaces/{k8s_namespace}/pods"
    client = await KubeClient.create(k8s_cluster.kubeconfig)
    follower = _Recorder(client, pods)
    task = follower.start(timeout_s=1)
    try:
        await _until(lambda: follower.opened[-1:] == [True], "a watch")
        await asyncio.sleep(2.5)  # at least two watches ended by the server meanwhile
        name = f"p-{uuid.uuid4().hex[:6]}"
        api.post(pods, _pod(name, k8s_namespace))
        await _until(lambda: ("ADDED", name) in follower.seen, "the pod through a watch opened again")
        assert follower.opened.count(True) >= 3 and len(follower.lists) == 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


def test_follow_lists_again_when_the_server_no_longer_has_its_version(
    k8s_cluster: ControlPlane, tmp_path: Path
) -> None:
    """410 Gone, for real: an API server without a watch cache (watches are served by etcd), etcd
    compacted past the version the follower is at while its watch was down; it lists again and goes
    on from the new list, missing nothing."""
    cp = ControlPlane.start(
        k8s_cluster.bin_dir, tmp_path, controller_manager=False, apiserver_args=["--watch-cache=false"]
    )
    try:
        asyncio.run(_gone(cp))
    finally:
        cp.stop(check=False)


async def _gone(cp: ControlPlane) -> None:
    api = cp.client()
    pods = "/api/v1/namespaces/default/pods"
    api.post(pods, _pod("first", "default"))
    old = str(api.get(pods)["metadata"]["resourceVersion"])
    api.post(pods, _pod("second", "default"))
    # etcd keeps the revision it is compacted at: a second write after ``old`` puts ``old + 1`` below it.
    api.post("/api/v1/namespaces/default/configmaps", {"metadata": {"name": "later"}})
    _compact(cp)
    client = await KubeClient.create(cp.kubeconfig)
    follower = _Recorder(client, pods)
    task = follower.start(since=old)  # as after a watch that broke at ``old``
    try:
        await _until(
            lambda: len(follower.lists) == 1 and follower.opened[-1:] == [True], "a list, then a watch", state=follower
        )
        assert follower.listed == [{"first", "second"}]
        api.post(pods, _pod("third", "default"))
        await _until(lambda: ("ADDED", "third") in follower.seen, "the pod after the list")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


def _compact(cp: ControlPlane) -> None:
    """Compact etcd at its current revision (etcd's JSON gateway)."""

    def call(path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            cp.etcd_url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            out: dict[str, Any] = json.load(resp)
        return out

    revision = call("/v3/kv/range", {"key": base64.b64encode(b"/registry/").decode()})["header"]["revision"]
    call("/v3/kv/compaction", {"revision": revision, "physical": True})


class _Recorder:
    """``follow`` with callbacks that record what it was given."""

    def __init__(self, client: KubeClient, path: str) -> None:
        self.client = client
        self.path = path
        self.lists: list[str] = []
        self.listed: list[set[str]] = []
        self.seen: list[tuple[str, str]] = []
        self.opened: list[bool] = []

    def __repr__(self) -> str:
        return f"lists {self.lists}, watches {self.opened}, seen {self.seen}"

    def start(self, **kw: Any) -> asyncio.Task[None]:
        return asyncio.get_running_loop().create_task(
            follow(
                lambda: self.client, self.path, self.relist, self.take, what="pods", watching=self.opened.append, **kw
            )
        )

    async def relist(self) -> str:
        page = await self.client.list(self.path)
        self.listed.append({str(p["metadata"]["name"]) for p in page["items"]})
        self.lists.append(str(page["metadata"]["resourceVersion"]))
        return self.lists[-1]

    def take(self, kind: str, obj: Obj) -> None:
        self.seen.append((kind, str((obj.get("metadata") or {}).get("name"))))
