"""The custom-resource store's commit path and reads, counted in API requests; two managers contending.

A reader within the ledger's log sees exactly the committed changes from one GET (no list); a reader
that fell behind reloads in full with one list that leaves deletion tombstones out; every object is
labelled with its state, so live groups can be listed alone; a commit of one group is two writes,
one of them (the group object) after the commit; while the ledger's watch is open, no GET.
Two managers in two processes allocating and releasing for a while: no GPU held twice, each at least
a third of the commits, no ConflictError.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest

from computegroups import ComputeGroupManager, InsufficientResourcesError
from computegroups.errors import StateError
from computegroups.model import AllocationState, DeviceShare, GroupRecord
from computegroups.state.kubernetes import LOG_ENTRIES, KubernetesStateStore

from .harness import ControlPlane
from .test_provider_kubernetes import deploy, make_nodes, provider, race

pytestmark = pytest.mark.k8s


@pytest.fixture
def sa(k8s_cluster: ControlPlane, k8s_namespace: str) -> Path:
    return deploy(k8s_cluster, k8s_namespace)


def rec(gid: str, index: int, state: AllocationState = AllocationState.ALLOCATED) -> GroupRecord:
    return GroupRecord(gid, "n0", state, "c", (DeviceShare(index % 8, f"u{index % 8}", 1000, 80),))


def writes(store: KubernetesStateStore) -> int:
    r = store.client.requests
    return r["create"] + r["update"] + r["patch"] + r["delete"]


async def test_a_reader_sees_exactly_the_commits_without_listing(k8s_namespace: str, sa: Path) -> None:
    a = KubernetesStateStore(sa, namespace=k8s_namespace, name="inc")
    b = KubernetesStateStore(sa, namespace=k8s_namespace, name="inc")
    await a.open()
    await b.open()
    try:
        rev = (await a.changes_since(-1)).revision
        seen = (await b.changes_since(-1)).revision
        a.client.requests.clear()
        b.client.requests.clear()
        want: dict[str, GroupRecord] = {}
        unseen: dict[str, GroupRecord] = {}  # committed since the reader last read
        history: list[tuple[int, list[GroupRecord], list[str]]] = []
        for n in range(12):
            before = writes(a)
            if n % 3 == 2:  # release the group allocated two steps before
                gone = want[f"g{n - 2}"].replace(state=AllocationState.RELEASED)
                rev = await a.commit(rev, [gone])
                want[gone.id] = unseen[gone.id] = gone
                history.append((rev, [gone], []))
            else:
                r = rec(f"g{n}", n)
                rev = await a.commit(rev, [r])
                want[r.id] = unseen[r.id] = r
                history.append((rev, [r], []))
            await a.flush()  # the group object is written after the commit, by the store's background writer
            assert writes(a) - before == 2  # the ledger and the one group object
            if n % 4 == 3:  # the reader catches up now and then, several commits at once
                got = await b.changes_since(seen)
                assert got.revision == rev and not got.full and not got.deletes
                assert {r.id: r for r in got.upserts} == unseen
                seen = got.revision
                unseen.clear()
        rev = await a.commit(rev, [], ["g0"])
        history.append((rev, [], ["g0"]))
        got = await b.changes_since(seen)
        assert got.revision == rev and list(got.deletes) == ["g0"] and not got.upserts
        # From the oldest revision the ledger's log reaches back to, in one read: the net changes since.
        oldest = rev - LOG_ENTRIES
        first = await b.changes_since(oldest)
        net: dict[str, GroupRecord | None] = {}
        for r_, ups, dels in history:
            if r_ > oldest:
                net.update({u.id: u for u in ups})
                net.update(dict.fromkeys(dels))
        assert not first.full and first.revision == rev
        assert {r.id: r for r in first.upserts} == {k: v for k, v in net.items() if v is not None}
        assert list(first.deletes) == ["g0"]
        assert (await b.changes_since(oldest - 1)).full  # one further back: a reload, the reader's only list
        assert a.client.requests["list"] == 0 and b.client.requests["list"] == 1
        assert a.client.requests["get"] == 0  # each commit reused the ledger its own last write returned
        assert b.client.requests["get"] == 7 and writes(b) == 0  # one GET per read (two for the reload)
    finally:
        await a.close()
        await b.close()


async def test_change_sets_are_strings_and_ledgers_of_the_older_format_are_read(k8s_namespace: str, sa: Path) -> None:
    """Each log entry carries its change set as one JSON string (a fraction of the API server's cost of
    the same records as objects); entries of the older format (fields) are still read, and an entry
    that is not a change set is a StateError, not a wrong view."""
    a = KubernetesStateStore(sa, namespace=k8s_namespace, name="fmt")
    b = KubernetesStateStore(sa, namespace=k8s_namespace, name="fmt")
    await a.open()
    await b.open()
    try:
        rev = await a.commit((await a.changes_since(-1)).revision, [rec("g1", 1)])
        path = f"/apis/computegroups.dev/v1alpha1/namespaces/{k8s_namespace}/computegroupledgers/fmt"
        ledger = await a.client.get(path)
        (entry,) = ledger["spec"]["log"]
        assert isinstance(entry["changes"], str) and "upserts" not in entry
        assert (await b.changes_since(rev - 1)).upserts == [rec("g1", 1)]
        # The older format: the change set as fields of the entry.
        old = {"revision": rev + 1, "upserts": [rec("g2", 2).to_json()], "deletes": ["g1"]}
        ledger["spec"] = {**ledger["spec"], "revision": rev + 1, "log": [*ledger["spec"]["log"], old]}
        ledger = await a.client.put(path, ledger)
        got = await b.changes_since(rev)
        assert got.revision == rev + 1 and got.upserts == [rec("g2", 2)] and list(got.deletes) == ["g1"]
        bad = {"revision": rev + 2, "changes": '["not", "a", "change set"]'}
        ledger["spec"] = {**ledger["spec"], "revision": rev + 2, "log": [*ledger["spec"]["log"], bad]}
        await a.client.put(path, ledger)
        with pytest.raises(StateError, match=f"change set {rev + 2} is unreadable"):
            await b.changes_since(rev + 1)
    finally:
        await a.close()
        await b.close()


async def test_a_reader_that_fell_behind_reloads_in_full(
    k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path
) -> None:
    a = KubernetesStateStore(sa, namespace=k8s_namespace, name="behind")
    b = KubernetesStateStore(sa, namespace=k8s_namespace, name="behind")
    await a.open()
    await b.open()
    try:
        rev = (await a.changes_since(-1)).revision
        seen = (await b.changes_since(-1)).revision
        live: dict[str, GroupRecord] = {}
        released: dict[str, GroupRecord] = {}
        for n in range(LOG_ENTRIES + 20):
            r = rec(f"g{n}", n)
            if n % 4 == 1:  # released again at once
                rev = await a.commit(rev, [r])
                r = released[r.id] = r.replace(state=AllocationState.RELEASED)
            elif n % 4 == 3:  # deleted
                rev = await a.commit(rev, [r])
                rev = await a.commit(rev, [], [r.id])
                continue
            rev = await a.commit(rev, [r])
            if r.state is AllocationState.ALLOCATED:
                live[r.id] = r
        b.client.requests.clear()
        got = await b.changes_since(seen)
        assert got.full and got.revision == rev
        assert {r.id: r for r in got.upserts} == live | released  # released groups: the manager's tombstones
        assert b.client.requests["list"] == 1  # of the objects but deletion tombstones
        # What is stored: every object labelled with its state; the live selector lists exactly the live ones.
        await a.flush()  # the objects of the last commits are written after them
        api = k8s_cluster.client()
        path = f"/apis/computegroups.dev/v1alpha1/namespaces/{k8s_namespace}/computegroups"
        every = [i for i in api.get(path)["items"] if i["metadata"]["labels"]["computegroups.dev/store"] == "behind"]
        states = {i["spec"]["id"]: i["metadata"]["labels"]["computegroups.dev/state"] for i in every}
        assert {g for g, s in states.items() if s == "released"} == set(released)
        assert {s for g, s in states.items() if g not in live} <= {"released", "deleted"}
        assert "released" in states.values() and "deleted" in states.values()
        listed = api.get(
            path, labelSelector="computegroups.dev/store=behind,computegroups.dev/state notin (released,deleted)"
        )["items"]
        assert sorted(i["spec"]["id"] for i in listed) == sorted(live)
    finally:
        await a.close()
        await b.close()


WORKER = """
import asyncio, json, os, sys, time
from computegroups import ComputeGroupManager, ConflictError, InsufficientResourcesError
from computegroups import KubernetesComputeResourceProvider

async def main(kubeconfig, ns, selector, who, sync, seconds):
    p = KubernetesComputeResourceProvider(kubeconfig, namespace=ns, node_selector=selector)
    held, spans, commits, conflicts, full = [], [], 0, [], 0
    async with ComputeGroupManager(p, p.state_store()) as mgr:
        open(os.path.join(sync, who), "w").close()
        while not os.path.exists(os.path.join(sync, "go")):
            await asyncio.sleep(0.01)
        end = time.monotonic() + float(seconds)
        n = 0
        while time.monotonic() < end:
            n += 1
            try:
                if len(held) < 3:
                    g = await mgr.allocate_compute_group(f"{who}-{n}", {"gpus": 1 + n % 2})
                    held.append((g.id, g.node_id, list(g.resources["gpu_indices"]), time.monotonic()))
                else:
                    gid, node, idx, since = held.pop(0)
                    until = time.monotonic()
                    await mgr.deallocate_compute_group(gid)
                    spans.append([node, idx, since, until])
                commits += 1
            except InsufficientResourcesError:
                full += 1
                if held:
                    gid, node, idx, since = held.pop(0)
                    until = time.monotonic()
                    await mgr.deallocate_compute_group(gid)
                    spans.append([node, idx, since, until])
                    commits += 1
            except ConflictError as exc:
                conflicts.append(str(exc))
        for gid, node, idx, since in held:
            until = time.monotonic()
            await mgr.deallocate_compute_group(gid)
            spans.append([node, idx, since, until])
    print(json.dumps({"commits": commits, "spans": spans, "conflicts": conflicts, "full": full}))

asyncio.run(main(*sys.argv[1:]))
"""


def test_two_managers_contending_both_progress(
    k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path, tmp_path: Path
) -> None:
    """~20 s of allocate/release from two processes on one 8-GPU node: no GPU held twice (the spans each
    process saw holding a GPU never overlap), each process at least a third of the commits, no ConflictError."""
    _, selector = make_nodes(k8s_cluster, 1, dra=False)
    outs = race(WORKER, [str(sa), k8s_namespace, selector], tmp_path, "20")
    assert [o["conflicts"] for o in outs] == [[], []]
    commits = [o["commits"] for o in outs]
    assert min(commits) * 3 >= sum(commits), commits
    held: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for o in outs:
        for node, idx, since, until in o["spans"]:
            for i in idx:
                held.setdefault((node, i), []).append((since, until))
    for gpu, spans in held.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end <= start, f"GPU {gpu} held by two groups at once"
    print(f"commits per manager: {commits}; full: {[o['full'] for o in outs]}")


async def test_decisions_start_from_the_watch_and_reads_are_confirmed(
    k8s_cluster: ControlPlane, k8s_namespace: str, sa: Path
) -> None:
    """While the ledger's watch is open, a commit sends no GET first; a read right after another
    manager's commit sees it (a read is confirmed by a GET, however far the watch has got)."""
    _, selector = make_nodes(k8s_cluster, 1, dra=False)
    one, two = provider(sa, k8s_namespace, selector), provider(sa, k8s_namespace, selector)
    async with ComputeGroupManager(one, one.state_store()) as a, ComputeGroupManager(two, two.state_store()) as b:
        for _ in range(200):  # until both watches are open
            if a.store.changes_seen(a.revision) is not None and b.store.changes_seen(b.revision) is not None:
                break
            await asyncio.sleep(0.05)
        gets = a.store.client.requests["get"]
        held = [await a.allocate_compute_group(f"w{n}", {"gpus": 1}) for n in range(3)]
        await a.deallocate_compute_group(held[0].id)
        assert a.store.client.requests["get"] == gets  # four commits, no read: the watch had the ledger
        for g in held[1:]:  # at once, in the other manager: the read is exact
            assert (await b.get_compute_group(g.id)).component == g.component
        assert (await b.get_compute_group(held[0].id)).allocation_state == "released"
        taken = {(g.node_id, i) for g in held[1:] for i in g.resources["gpu_indices"]}
        mine = [await b.allocate_compute_group(f"v{n}", {"gpus": 1}) for n in range(6)]
        assert not taken & {(g.node_id, i) for g in mine for i in g.resources["gpu_indices"]}
        with pytest.raises(InsufficientResourcesError):  # the node is full now, as a's read finds
            await a.allocate_compute_group("late", {"gpus": 1})
        await b.store.flush()
        objects = k8s_cluster.client().get(
            f"/apis/computegroups.dev/v1alpha1/namespaces/{k8s_namespace}/computegroups",
            labelSelector="computegroups.dev/state=allocated",
        )["items"]
        assert {o["spec"]["id"] for o in objects} == {g.id for g in held[1:] + mine}
