"""The etcd client against a real etcd served over TLS and with auth enabled, and its retries.

TLS: a CA, a server and a client certificate made here with ``openssl``; etcd requires the
client certificate (``--client-cert-auth``). Auth: a ``root`` user and ``auth enable``.
Each is checked through the library (put, get, watch, leases) and through
``dynamo-actuate --once``, which reads the planner's decision and acknowledges it; a wrong
CA or password is one line and exit 2 naming the endpoint. Retries are checked against a
real HTTP server on loopback that answers as etcd's gateway does, or 429/503 with
``Retry-After``: the number of requests it saw and the waits asked for, never how long
anything took.

Skipped when the etcd binary is not built (scripts/k8s-testenv/build); failed instead
with COMPUTEGROUPS_REQUIRE_ETCD=1.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from computegroups.integrations.dynamo.actuator import root_key
from computegroups.integrations.etcd import EtcdClient, EtcdError
from computegroups.retry import RETRY_AFTER_MAX_S, backoff_s, retry_after_s
from computegroups.runtime.circus import CircusDaemon
from tests.test_dynamo import _free_ports, _start_etcd, _stop, _wait_healthy

PASSWORD = "s3cret-pw"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.crt", cwd=d,
    )  # fmt: skip


def _make_cert(d: Path, ca: str, name: str, ext: str) -> None:
    (d / f"{name}.ext").write_text(ext)
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt", cwd=d,
    )  # fmt: skip


@pytest.fixture(scope="module")
def tls_etcd() -> Iterator[dict[str, str]]:
    """An etcd on https that requires a client certificate; the files that reach it (and a CA that does not)."""
    work = Path(tempfile.mkdtemp(prefix="cg-etcd-tls-"))
    _make_ca(work, "ca")
    _make_ca(work, "other-ca")
    # clientAuth too: etcd's gateway dials etcd's own gRPC port with the server certificate.
    server_ext = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n"
    _make_cert(work, "ca", "server", server_ext)
    _make_cert(work, "ca", "client", "extendedKeyUsage=clientAuth\n")
    proc, url = _start_etcd(
        work,
        "https",
        f"--cert-file={work / 'server.crt'}",
        f"--key-file={work / 'server.key'}",
        f"--trusted-ca-file={work / 'ca.crt'}",
        "--client-cert-auth",
    )
    try:
        context = ssl.create_default_context(cafile=str(work / "ca.crt"))
        context.load_cert_chain(str(work / "client.crt"), str(work / "client.key"))
        _wait_healthy(proc, url, work, context)
        yield {
            "url": url,
            "ca": str(work / "ca.crt"),
            "cert": str(work / "client.crt"),
            "key": str(work / "client.key"),
            "other_ca": str(work / "other-ca.crt"),
        }
    finally:
        _stop(proc, work)


def _gateway(url: str, path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    headers = {"Content-Type": "application/json", **({"Authorization": token} if token else {})}
    req = urllib.request.Request(url + path, json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=10) as resp:
        answer: dict[str, Any] = json.load(resp)
    return answer


@pytest.fixture(scope="module")
def auth_etcd() -> Iterator[str]:
    """An etcd with auth enabled: user ``root`` (role root) with :data:`PASSWORD`."""
    work = Path(tempfile.mkdtemp(prefix="cg-etcd-auth-"))
    proc, url = _start_etcd(work, "http")
    try:
        _wait_healthy(proc, url, work, None)
        _gateway(url, "/v3/auth/user/add", {"name": "root", "password": PASSWORD})
        _gateway(url, "/v3/auth/user/grant", {"user": "root", "role": "root"})
        _gateway(url, "/v3/auth/enable", {})
        yield url
    finally:
        _stop(proc, work)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _exercise(etcd: EtcdClient) -> None:
    """Keys, a prefix read at one revision, a watch that sees a put, and a lease."""
    rev = etcd.put("cg-test/a", "1")
    assert etcd.get("cg-test/a") == "1" and etcd.get("cg-test/missing") is None
    kvs, revision = etcd.get_prefix("cg-test/")
    assert kvs["cg-test/a"].value == "1" and revision >= rev
    watch = etcd.watch_prefix("cg-test/", revision + 1)
    seen: list[str] = []
    reader = threading.Thread(target=lambda: seen.extend(f"{e.kind} {e.key}={e.value}" for e in watch))
    reader.start()
    etcd.put("cg-test/b", "2")
    deadline = time.monotonic() + 20
    while not seen and time.monotonic() < deadline:
        time.sleep(0.05)
    watch.close()
    reader.join(10)
    assert seen[:1] == ["put cg-test/b=2"] and not reader.is_alive()
    lease = etcd.lease_grant(30)
    etcd.put("cg-test/leased", "x", lease=lease)
    assert 0 < etcd.lease_ttl(lease) <= 30 and etcd.lease_keepalive(lease) > 0
    etcd.lease_revoke(lease)
    assert etcd.get("cg-test/leased") is None and etcd.lease_ttl(lease) == -1
    assert etcd.delete("cg-test/a") == 1


def _actuate_once(url: str, ns: str, tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    """``dynamo-actuate --once`` against ``url``: no workers wanted, so it only reads and acknowledges."""
    folder = Path(tempfile.mkdtemp(prefix="cg-c-", dir="/tmp"))
    try:
        cli = [sys.executable, "-m", "computegroups.cli", "--simulate", "--state", str(tmp_path / "s.db")]
        argv = ["dynamo-actuate", "--namespace", ns, "--etcd", url, "--decode-cmd", "true", "--once"]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ETCD_", "DYN_"))}
        return subprocess.run(
            [*cli, *argv, "--runtime-dir", str(folder), *flags],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            env=env,
        )
    finally:
        CircusDaemon(folder).quit()
        shutil.rmtree(folder, ignore_errors=True)


def _decide(etcd: EtcdClient, ns: str, decision_id: int) -> None:
    for key, value in (("num_prefill_workers", "0"), ("num_decode_workers", "0"), ("decision_id", str(decision_id))):
        etcd.put(root_key(ns) + key, value)


def _one_line_naming(out: subprocess.CompletedProcess[str], url: str) -> str:
    assert out.returncode == 2, out
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and url in lines[0], out.stderr
    return lines[0]


# -- TLS ------------------------------------------------------------------------------------
@pytest.mark.etcd
def test_tls_with_a_client_certificate(tls_etcd: dict[str, str]) -> None:
    t = tls_etcd
    _exercise(EtcdClient(t["url"], ca_file=t["ca"], cert_file=t["cert"], key_file=t["key"]))


@pytest.mark.etcd
def test_tls_refusals_name_the_endpoint_and_are_not_retried(tls_etcd: dict[str, str]) -> None:
    t = tls_etcd
    wrong_ca = EtcdClient(t["url"], ca_file=t["other_ca"], cert_file=t["cert"], key_file=t["key"])
    with pytest.raises(EtcdError) as info:
        wrong_ca.get("k")
    assert t["url"] in str(info.value) and "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert not info.value.transient
    with pytest.raises(EtcdError) as info:  # etcd wants a client certificate
        EtcdClient(t["url"], ca_file=t["ca"]).get("k")
    assert t["url"] in str(info.value) and not info.value.transient


@pytest.mark.etcd
def test_actuator_over_tls_reads_the_decision_and_acknowledges_it(tls_etcd: dict[str, str], tmp_path: Path) -> None:
    t = tls_etcd
    etcd = EtcdClient(t["url"], ca_file=t["ca"], cert_file=t["cert"], key_file=t["key"])
    _decide(etcd, "tls", 4)
    out = _actuate_once(
        t["url"], "tls", tmp_path, "--etcd-ca", t["ca"], "--etcd-cert", t["cert"], "--etcd-key", t["key"]
    )
    assert out.returncode == 0, out
    assert "decision_id=4" in out.stdout
    assert etcd.get(root_key("tls") + "scaled_decision_id") == "4"
    # A CA that did not sign etcd's certificate: one line, exit 2, nothing written.
    _decide(etcd, "tls", 5)
    out = _actuate_once(
        t["url"], "tls", tmp_path, "--etcd-ca", t["other_ca"], "--etcd-cert", t["cert"], "--etcd-key", t["key"]
    )
    assert "TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in _one_line_naming(out, t["url"])
    assert etcd.get(root_key("tls") + "scaled_decision_id") == "4"


# -- auth -----------------------------------------------------------------------------------
@pytest.mark.etcd
def test_auth_with_a_user_and_password(auth_etcd: str) -> None:
    _exercise(EtcdClient(auth_etcd, user="root", password=PASSWORD))
    with pytest.raises(EtcdError) as info:
        EtcdClient(auth_etcd, user="root", password="wrong").get("k")
    assert auth_etcd in str(info.value) and "root" in str(info.value) and not info.value.transient
    with pytest.raises(EtcdError) as info:  # no credentials at all
        EtcdClient(auth_etcd).get("k")
    assert auth_etcd in str(info.value)


@pytest.mark.etcd
def test_an_expired_token_is_renewed(auth_etcd: str) -> None:
    """etcd forgets a token (here: it is revoked by disabling and enabling auth); the client fetches a new one."""
    etcd = EtcdClient(auth_etcd, user="root", password=PASSWORD)
    etcd.put("cg-test/t", "1")
    old = etcd._gw.session.auth.token()  # type: ignore[union-attr]
    token = _gateway(auth_etcd, "/v3/auth/authenticate", {"name": "root", "password": PASSWORD})["token"]
    _gateway(auth_etcd, "/v3/auth/disable", {}, token)
    _gateway(auth_etcd, "/v3/auth/enable", {})
    assert etcd.get("cg-test/t") == "1"
    assert etcd._gw.session.auth.token() != old  # type: ignore[union-attr]


@pytest.mark.etcd
def test_actuator_with_auth_reads_the_decision_and_acknowledges_it(auth_etcd: str, tmp_path: Path) -> None:
    etcd = EtcdClient(auth_etcd, user="root", password=PASSWORD)
    _decide(etcd, "auth", 2)
    out = _actuate_once(auth_etcd, "auth", tmp_path, "--etcd-user", "root", "--etcd-password", PASSWORD)
    assert out.returncode == 0, out
    assert etcd.get(root_key("auth") + "scaled_decision_id") == "2"
    _decide(etcd, "auth", 3)
    out = _actuate_once(auth_etcd, "auth", tmp_path, "--etcd-user", "root", "--etcd-password", "wrong")
    line = _one_line_naming(out, auth_etcd)
    assert "authentication" in line and "wrong" not in line  # the password is never printed
    assert etcd.get(root_key("auth") + "scaled_decision_id") == "2"


# -- retries --------------------------------------------------------------------------------
class _Gateway(BaseHTTPRequestHandler):
    """Answers as etcd's gateway does once ``script`` (status, Retry-After) runs out; counts requests."""

    script: list[tuple[int, str | None]] = []
    seen: list[str] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).seen.append(self.path)
        status, after = type(self).script.pop(0) if type(self).script else (200, None)
        kv = {"key": _b64("k"), "value": _b64("v"), "mod_revision": "7"}
        body = {"header": {"revision": "7"}, "kvs": [kv]} if status == 200 else {"error": "busy", "message": "busy"}
        data = json.dumps(body).encode()
        self.send_response(status)
        if after is not None:
            self.send_header("Retry-After", after)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def gateway() -> Iterator[tuple[str, type[_Gateway]]]:
    handler = type("Gateway", (_Gateway,), {"script": [], "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


def test_429_with_retry_after_is_honoured(gateway: tuple[str, type[_Gateway]], waits: list[float]) -> None:
    url, handler = gateway
    handler.script = [(429, "1"), (503, "1")]
    kvs, revision = EtcdClient(url).get_prefix("k")
    assert kvs["k"].value == "v" and revision == 7
    assert handler.seen == ["/v3/kv/range"] * 3  # two refusals, then the answer
    assert waits == [1.0, 1.0]  # the server's wait, not the backoff's


def test_a_busy_server_is_tried_a_bounded_number_of_times(
    gateway: tuple[str, type[_Gateway]], waits: list[float]
) -> None:
    url, handler = gateway
    handler.script = [(503, None)] * 10
    with pytest.raises(EtcdError) as info:
        EtcdClient(url, retry_attempts=3).get_prefix("k")
    assert len(handler.seen) == 3 and len(waits) == 2
    assert url in str(info.value) and "503" in str(info.value) and info.value.transient
    assert all(0 < w <= 5.5 for w in waits)  # backoff with jitter, no Retry-After to honour


def test_a_refusal_that_would_repeat_is_not_retried(gateway: tuple[str, type[_Gateway]], waits: list[float]) -> None:
    url, handler = gateway
    handler.script = [(400, None)]
    with pytest.raises(EtcdError) as info:
        EtcdClient(url).get_prefix("k")
    assert len(handler.seen) == 1 and waits == [] and not info.value.transient


def test_nothing_listening_is_retried_then_named(waits: list[float]) -> None:
    (port,) = _free_ports(1)
    with pytest.raises(EtcdError) as info:
        EtcdClient(f"127.0.0.1:{port}", retry_attempts=2).get("k")
    assert f"http://127.0.0.1:{port}/v3/kv/range" in str(info.value) and len(waits) == 1


def test_retry_after_values() -> None:
    assert retry_after_s("3") == 3.0 and retry_after_s(" 0 ") == 0.0
    assert retry_after_s("-5") == 0.0 and retry_after_s("86400") == RETRY_AFTER_MAX_S
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert retry_after_s(None) is None and retry_after_s("soon") is None and retry_after_s("nan") is None


def test_backoff_doubles_is_capped_and_jitter_stays_within_bounds() -> None:
    plain = [backoff_s(n, initial_s=1.0, max_s=10.0) for n in range(1, 7)]
    assert plain == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert backoff_s(10_000, initial_s=1.0, max_s=60.0) == 60.0 and backoff_s(3, initial_s=0, max_s=5) == 0.0
    jittered = [backoff_s(2, initial_s=1.0, max_s=10.0, jitter=0.5) for _ in range(200)]
    assert all(2.0 <= w <= 3.0 for w in jittered) and len(set(jittered)) > 1


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"url": "ftp://127.0.0.1:2379"}, "url"),
        ({"url": "http://127.0.0.1:2379", "ca_file": "/etc/hostname"}, "ca_file"),
        ({"url": "https://127.0.0.1:2379", "ca_file": "/nonexistent"}, "ca_file"),
        ({"url": "https://127.0.0.1:2379", "cert_file": "/etc/hostname"}, "key_file"),
        ({"url": "http://127.0.0.1:2379", "user": "root"}, "password"),
        ({"url": "http://127.0.0.1:2379", "password": "x"}, "user"),
        ({"url": "http://127.0.0.1:99999"}, "url"),
    ],
)
def test_bad_settings_are_refused_before_anything_is_sent(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(EtcdError) as info:
        EtcdClient(**kwargs)
    assert info.value.key == key and not info.value.transient
