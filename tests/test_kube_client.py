"""The Kubernetes client's retries (computegroups.retry) against a local HTTP server; the Event objects'
rules (reason, type, the fields read back) and the write limiter's bucket, without a cluster.

The server answers as the API server does when it sheds load: 429 with ``Retry-After``, or 5xx.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from computegroups.errors import StateError
from computegroups.events import Event
from computegroups.kube.client import RETRY_MAX_S, KubeClient, KubeError, env_proxy
from computegroups.state.k8s_events import (
    DETAIL_ANN,
    MESSAGE_LIMIT,
    TokenBucket,
    event_object,
    event_of,
    event_reason,
    event_type,
)
from computegroups.state.kubernetes import KubernetesStateStore


class _Api(BaseHTTPRequestHandler):
    """Answers ``script`` (status, Retry-After) in turn, then 200 with a small object; records each request."""

    script: list[tuple[int, str | None]] = []
    seen: list[str] = []

    def _answer(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(f"{self.command} {self.path.split('?')[0]}")
        status, after = type(self).script.pop(0) if type(self).script else (200, None)
        body: dict[str, Any] = {"kind": "Thing", "metadata": {"name": "x"}}
        if status != 200:
            body = {"kind": "Status", "status": "Failure", "message": "slow down", "reason": "TooManyRequests"}
        data = json.dumps(body).encode()
        self.send_response(status)
        if after is not None:
            self.send_header("Retry-After", after)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _answer

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Path, type[_Api]]]:
    handler = type("Api", (_Api,), {"script": [], "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}],
                "users": [{"name": "u", "user": {"token": "t"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
                "current-context": "x",
            }
        )
    )
    try:
        yield kubeconfig, handler
    finally:
        server.shutdown()
        server.server_close()


async def test_a_429_waits_as_long_as_the_server_asks(api: tuple[Path, type[_Api]], waits: list[float]) -> None:
    kubeconfig, handler = api
    handler.script = [(429, "1"), (429, "0")]
    client = await KubeClient.create(kubeconfig)
    try:
        got = await client.post("/api/v1/namespaces/n/things", {"kind": "Thing"})
    finally:
        await client.close()
    assert got["metadata"]["name"] == "x"
    assert handler.seen == ["POST /api/v1/namespaces/n/things"] * 3
    assert waits == [1.0, 0.0]  # the server's waits, not the backoff's
    assert client.requests["create"] == 3  # each try is counted


async def test_5xx_is_retried_for_reads_only(api: tuple[Path, type[_Api]], waits: list[float]) -> None:
    kubeconfig, handler = api
    client = await KubeClient.create(kubeconfig)
    try:
        handler.script = [(503, None), (500, None)]
        assert (await client.get("/api/v1/nodes/x"))["kind"] == "Thing"
        assert len(waits) == 2 and all(0 < w <= RETRY_MAX_S for w in waits)  # backed off
        handler.script = [(503, None)]
        with pytest.raises(KubeError) as err:
            await client.post("/api/v1/namespaces/n/things", {})
    finally:
        await client.close()
    assert err.value.status == 503 and err.value.verb == "create" and not err.value.transient
    assert len(handler.seen) == 4 and len(waits) == 2  # a write is sent once: it may have been applied


async def test_the_retries_are_bounded(api: tuple[Path, type[_Api]], waits: list[float]) -> None:
    kubeconfig, handler = api
    handler.script = [(429, "0")] * 20
    client = await KubeClient.create(kubeconfig)
    try:
        with pytest.raises(KubeError) as err:
            await client.get("/api/v1/nodes")
    finally:
        await client.close()
    assert err.value.status == 429 and err.value.transient and err.value.retry_after_s == 0.0
    assert len(handler.seen) == 12 and len(waits) == 11


async def test_the_environments_proxy_is_read_once_and_used(
    api: tuple[Path, type[_Api]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``HTTP_PROXY`` is honoured (read when the client is made, not on every request), ``NO_PROXY`` too."""
    kubeconfig, handler = api
    port = json.loads(kubeconfig.read_text())["clusters"][0]["cluster"]["server"].rsplit(":", 1)[1]
    config = json.loads(kubeconfig.read_text())
    config["clusters"][0]["cluster"]["server"] = "http://api.example.invalid:6443"
    proxied = tmp_path / "proxied"
    proxied.write_text(json.dumps(config))
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert env_proxy("http://api.example.invalid:6443") == f"http://127.0.0.1:{port}"
    client = await KubeClient.create(proxied)
    try:
        monkeypatch.delenv("HTTP_PROXY")  # already read
        assert (await client.get("/api/v1/namespaces/x"))["kind"] == "Thing"
        assert handler.seen == ["GET http://api.example.invalid:6443/api/v1/namespaces/x"]  # the proxy's form
    finally:
        await client.close()
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("NO_PROXY", "example.invalid")
    assert env_proxy("http://api.example.invalid:6443") is None
    assert env_proxy("") is None


def test_reasons_and_types() -> None:
    assert event_reason("device-unhealthy") == "DeviceUnhealthy"
    assert event_reason("allocated") == "Allocated"
    assert event_reason("dynamo-planner-restart") == "DynamoPlannerRestart"
    assert [event_type(k) for k in ("refused", "provider-error", "device-unhealthy", "dynamo-shortfall")] == [
        "Warning"
    ] * 4
    assert [event_type(k) for k in ("allocated", "released", "device-healthy", "preempted")] == ["Normal"] * 4


@pytest.mark.parametrize(
    "event",
    [
        Event("allocated", "g-1", "node-a", "decode", "", at=1767225600.123456),
        Event("refused", None, None, "big", "InsufficientResourcesError: no node can take 16 GPU(s)", at=1.5),
        Event("device-unhealthy", None, "node-a", None, "x" * (MESSAGE_LIMIT + 10), at=2.25),
        Event("released", "g 2/odd", "n", "", "done", at=3.0),
    ],
)
def test_an_event_object_reads_back_as_the_event(event: Event) -> None:
    ref = {"apiVersion": "computegroups.dev/v1alpha1", "kind": "ComputeGroup", "name": "g", "namespace": "ns"}
    obj = event_object(event, ref, name="g.1", namespace="ns", store="default", count=1, first=event.at, instance="i")
    assert len(obj["message"]) <= MESSAGE_LIMIT and obj["message"]
    assert (DETAIL_ANN in obj["metadata"]["annotations"]) == (obj["message"] != event.detail)
    obj["metadata"]["resourceVersion"] = "42"  # as the API server returns it
    back = event_of(obj)
    assert back is not None and back.seq == 42
    assert (back.kind, back.group_id, back.node_id, back.component, back.detail, back.at) == (
        event.kind,
        event.group_id,
        event.node_id,
        event.component,
        event.detail,
        event.at,
    )


def test_the_bucket_lets_a_burst_through_then_its_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(3, 2.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_s() == pytest.approx(0.5)
    now[0] = 0.5
    assert bucket.take() and not bucket.take()
    now[0] = 100.0  # refilled, but never above the burst
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


@pytest.mark.parametrize("burst, rate", [(0, 1.0), (5, 0.0), (5, -1.0), (2.5, 1.0)])
def test_a_limiter_that_lets_nothing_through_is_refused(burst: int, rate: float) -> None:
    with pytest.raises(StateError, match="event limiter"):
        KubernetesStateStore(event_burst=burst, event_rate=rate)
