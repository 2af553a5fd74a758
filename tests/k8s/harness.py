"""A real, throw-away Kubernetes control plane for tests.

Runs upstream etcd, kube-apiserver, kube-controller-manager, kube-scheduler
and KWOK (fake nodes and pods) as local processes bound to 127.0.0.1 on free ports.  The binaries are
built from the pinned upstream Go modules by ``scripts/k8s-testenv/build`` and
cached under ``~/.cache/computegroups/k8s/<version-key>/bin`` (override the
root with ``COMPUTEGROUPS_K8S_CACHE``, or point ``COMPUTEGROUPS_K8S_BIN_DIR``
at a directory that already holds the four binaries).

Only the Python standard library is used (``urllib`` + ``ssl`` + ``json``) so
the harness does not couple to the Kubernetes client library that the code
under test uses.

Typical use (the pytest fixtures in ``conftest.py`` do this for you)::

    with ControlPlane.start() as cp:
        api = cp.client()
        cp.make_gpu_node("gpu-node-0", gpus=8)
        token = cp.service_account_token("default", "computegroups")
        as_sa = cp.client(token=token)
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid as _uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "scripts" / "k8s-testenv" / "build"
BINARIES = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")

#: Annotation KWOK uses to recognise the nodes it should manage.
KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
#: Taint KWOK's documentation suggests for fake nodes (opt-in here, see make_gpu_node).
KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}

GPU_RESOURCE = "nvidia.com/gpu"
GPU_DRA_DRIVER = "gpu.nvidia.com"
#: The consumable capacity a shareable device publishes: 1000 shares a GPU (a share asks its part).
GPU_SHARES = "shares"

#: A decoded Kubernetes object / API response.
Obj = dict[str, Any]


class BinariesUnavailable(RuntimeError):
    """The control-plane binaries are not built (and could not be built)."""


class ControlPlaneError(RuntimeError):
    """A component failed to start or to stop."""


# --------------------------------------------------------------------------
# Binaries
# --------------------------------------------------------------------------


def _bin_dir_from_env() -> Path | None:
    d = os.environ.get("COMPUTEGROUPS_K8S_BIN_DIR")
    return Path(d) if d else None


def _complete(bin_dir: Path) -> bool:
    return all(os.access(bin_dir / b, os.X_OK) for b in BINARIES)


def pinned_k8s_version() -> str:
    """The Kubernetes version ``scripts/k8s-testenv/build`` pins (``K8S_VERSION=``), e.g. ``v1.36.3``."""
    m = re.search(r"^K8S_VERSION=(\S+)$", BUILD_SCRIPT.read_text(), re.MULTILINE)
    if m is None:
        raise BinariesUnavailable(f"no K8S_VERSION= line in {BUILD_SCRIPT}")
    return m.group(1)


def find_binaries(build: bool = False) -> Path:
    """Return the directory holding etcd, kube-apiserver, kube-scheduler, kwok.

    With ``build=True`` a missing cache is built (``scripts/k8s-testenv/build``;
    minutes when cold).  Raises :class:`BinariesUnavailable` otherwise.
    """
    env_dir = _bin_dir_from_env()
    if env_dir is not None:
        if _complete(env_dir):
            return env_dir
        raise BinariesUnavailable(f"COMPUTEGROUPS_K8S_BIN_DIR={env_dir} lacks one of {', '.join(BINARIES)}")
    if not BUILD_SCRIPT.exists():
        raise BinariesUnavailable(f"{BUILD_SCRIPT} not found")
    bin_dir = Path(
        subprocess.run(
            ["bash", str(BUILD_SCRIPT), "--print-bin-dir"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    if _complete(bin_dir) and (bin_dir.parent / ".complete").exists():
        return bin_dir
    if not build:
        raise BinariesUnavailable(
            f"Kubernetes test binaries are not built ({bin_dir} is missing or incomplete); "
            f"run {BUILD_SCRIPT.relative_to(REPO_ROOT)}"
        )
    proc = subprocess.run(["bash", str(BUILD_SCRIPT)], capture_output=True, text=True)
    if proc.returncode != 0 or not _complete(bin_dir):
        raise BinariesUnavailable(f"{BUILD_SCRIPT} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return bin_dir


# --------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ControlPlaneError(f"{' '.join(cmd)} failed: {proc.stderr}")


def generate_pki(d: Path) -> dict[str, Path]:
    """CA, serving cert for 127.0.0.1/localhost, and a service-account key pair.

    Uses the ``openssl`` CLI (no Python dependency)."""
    d.mkdir(parents=True, exist_ok=True)
    if shutil.which("openssl") is None:
        raise ControlPlaneError("the openssl command is required to generate test certificates")
    _run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=computegroups-test-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        ],
        d,
    )
    (d / "serving.ext").write_text(
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1\n"
    )
    _run(
        [
            "openssl",
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "apiserver.key",
            "-out",
            "apiserver.csr",
            "-subj",
            "/CN=kube-apiserver",
        ],
        d,
    )
    _run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-out",
            "apiserver.crt",
            "-extfile",
            "serving.ext",
        ],
        d,
    )
    _run(["openssl", "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", "sa.key"], d)
    _run(["openssl", "pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"], d)
    return {n: d / n for n in ("ca.crt", "ca.key", "apiserver.crt", "apiserver.key", "sa.key", "sa.pub")}


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, user: str = "user") -> Path:
    """Write a kubeconfig (JSON is valid YAML) that authenticates with a bearer token."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "computegroups-test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "computegroups-test", "user": user}}],
        "current-context": user,
    }
    path.write_text(json.dumps(cfg, indent=2))
    path.chmod(0o600)
    return path


# --------------------------------------------------------------------------
# HTTP client
# --------------------------------------------------------------------------


class ApiError(Exception):
    def __init__(self, status: int, body: Any, method: str, path: str):
        self.status = status
        self.body = body
        msg = body.get("message") if isinstance(body, dict) else body
        super().__init__(f"{method} {path} -> {status}: {msg}")


@dataclass
class Client:
    """Minimal JSON client for the Kubernetes API (stdlib only)."""

    server: str
    token: str
    ca_file: Path
    timeout: float = 30.0
    _ctx: ssl.SSLContext = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ctx = ssl.create_default_context(cafile=str(self.ca_file))

    def _open(
        self,
        method: str,
        path: str,
        body: Any = None,
        content_type: str | None = None,
        params: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> IO[bytes]:
        url = self.server + path
        if params:
            url += ("&" if "?" in url else "?") + urllib.parse.urlencode(params)
        data = None
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type or "application/json"
        req = urllib.request.Request(url, data=data, method=method, headers=headers)
        resp: IO[bytes] = urllib.request.urlopen(req, context=self._ctx, timeout=timeout or self.timeout)
        return resp

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str | None = None,
        params: dict[str, Any] | None = None,
    ) -> Any:
        """Return the decoded JSON body; raise :class:`ApiError` on HTTP errors."""
        try:
            with self._open(method, path, body, content_type, params) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                decoded = json.loads(raw)
            except ValueError:
                decoded = raw.decode(errors="replace")
            raise ApiError(e.code, decoded, method, path) from None
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def status(self, method: str, path: str, body: Any = None, **kw: Any) -> int:
        """Like :meth:`request` but return the HTTP status instead of raising."""
        try:
            self.request(method, path, body, **kw)
            return 200
        except ApiError as e:
            return e.status

    def get(self, path: str, **params: Any) -> Obj:
        return cast(Obj, self.request("GET", path, params=params or None))

    def post(self, path: str, body: Any) -> Obj:
        return cast(Obj, self.request("POST", path, body))

    def put(self, path: str, body: Any) -> Obj:
        return cast(Obj, self.request("PUT", path, body))

    def patch(self, path: str, body: Any, patch_type: str = "merge") -> Obj:
        ct = {
            "merge": "application/merge-patch+json",
            "strategic": "application/strategic-merge-patch+json",
            "json": "application/json-patch+json",
            "apply": "application/apply-patch+yaml",
        }[patch_type]
        return cast(Obj, self.request("PATCH", path, body, content_type=ct))

    def delete(self, path: str) -> Obj:
        return cast(Obj, self.request("DELETE", path))

    def watch(
        self, path: str, resource_version: str | None = None, timeout: float = 30.0, **params: Any
    ) -> Iterator[dict[str, Any]]:
        """Yield watch events (``{"type": ..., "object": ...}``) for up to ``timeout`` s."""
        params = dict(params, watch="true", timeoutSeconds=int(max(1, timeout)))
        if resource_version is not None:
            params["resourceVersion"] = resource_version
        try:
            resp = self._open("GET", path, params=params, timeout=timeout + 10)
        except urllib.error.HTTPError as e:
            raise ApiError(e.code, e.read().decode(errors="replace"), "WATCH", path) from None
        with resp:
            for line in resp:
                line = line.strip()
                if line:
                    yield json.loads(line)

    def wait_for(
        self,
        path: str,
        predicate: Callable[[Obj], Any],
        timeout: float = 60.0,
        interval: float = 0.2,
        what: str = "condition",
    ) -> Obj:
        """Poll ``GET path`` until ``predicate(obj)`` is truthy; return the object."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                obj = self.get(path)
                last = obj
                if predicate(obj):
                    return obj
            except ApiError as e:
                if e.status != 404:
                    raise
                last = e
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"timed out after {timeout}s waiting for {what} on {path}; "
                    f"last: {json.dumps(last, default=str)[:2000]}"
                )
            time.sleep(interval)


# --------------------------------------------------------------------------
# Control plane
# --------------------------------------------------------------------------


@dataclass
class _Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


def _die_with_parent() -> None:
    """preexec_fn: ask Linux to SIGKILL the child when the process that started
    it dies, so even a SIGKILLed pytest leaves no control plane behind."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: rely on stop()
        pass


def _log_tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "<no log>"


def _pids_referencing(marker: str) -> list[int]:
    """PIDs whose command line mentions ``marker`` (our unique work directory)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":  # zombie: already dead
            continue
        if marker.encode() in cmdline:
            pids.append(int(entry))
    return pids


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager + kube-scheduler + kwok on 127.0.0.1.

    Attributes useful to tests: ``server`` (https URL), ``ca_file``,
    ``admin_token``, ``kubeconfig`` (admin kubeconfig path), ``workdir``,
    ``bin_dir``.
    """

    ADMIN_USER = "computegroups-admin"
    SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

    #: Controllers kube-controller-manager runs: the defaults minus those that need
    #: real kubelets, a cloud or pod networking.  In particular the node lifecycle
    #: controller is off, so fake nodes never go NotReady/tainted behind KWOK's back.
    KCM_CONTROLLERS = (
        "*",
        "-node-lifecycle-controller",
        "-cloud-node-lifecycle-controller",
        "-node-ipam-controller",
        "-node-route-controller",
        "-service-lb-controller",
        "-persistentvolume-attach-detach-controller",
    )

    def __init__(
        self, bin_dir: Path, workdir: Path, controller_manager: bool = True, apiserver_args: Sequence[str] = ()
    ):
        self.bin_dir = Path(bin_dir)
        self.controller_manager = controller_manager
        self.apiserver_args = list(apiserver_args)
        self.workdir = Path(workdir)
        self.procs: list[_Proc] = []
        self.timings: dict[str, float] = {}
        self.admin_token = _uuid.uuid4().hex
        self._scheduler_token = _uuid.uuid4().hex
        self._kwok_token = _uuid.uuid4().hex
        self._kcm_token = _uuid.uuid4().hex
        etcd_client, etcd_peer, api, sched, kwok, kcm = _free_ports(6)
        self.etcd_url = f"http://127.0.0.1:{etcd_client}"
        self._etcd_peer = f"http://127.0.0.1:{etcd_peer}"
        self.api_port = api
        self.server = f"https://127.0.0.1:{api}"
        self._sched_port = sched
        self._kwok_port = kwok
        self._kcm_port = kcm
        self.kubeconfig = self.workdir / "admin.kubeconfig"
        self.ca_file = self.workdir / "pki" / "ca.crt"

    # -- lifecycle --------------------------------------------------------

    @classmethod
    def start(
        cls,
        bin_dir: Path | None = None,
        workdir: Path | None = None,
        timeout: float = 120.0,
        controller_manager: bool = True,
        apiserver_args: Sequence[str] = (),
    ) -> ControlPlane:
        """Start all components and wait until each is ready.

        ``controller_manager=False`` skips kube-controller-manager (then no
        namespace/garbage-collector/Job/ResourceClaim controllers run, and the
        ServiceAccount admission plugin is disabled because nothing would create
        the per-namespace ``default`` ServiceAccount). ``apiserver_args`` are added to
        kube-apiserver's (a later flag wins: ``--watch-cache=false``)."""
        if bin_dir is None:
            bin_dir = find_binaries()
        if workdir is None:
            workdir = Path(tempfile.mkdtemp(prefix="cg-k8s-"))
        cp = cls(bin_dir, workdir, controller_manager=controller_manager, apiserver_args=apiserver_args)
        try:
            cp._start(timeout)
        except BaseException:
            cp.stop(check=False)
            raise
        return cp

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _spawn(self, name: str, args: list[str]) -> _Proc:
        logs = self.workdir / "logs"
        logs.mkdir(exist_ok=True)
        log = logs / f"{name}.log"
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                [str(self.bin_dir / name), *args],
                stdin=subprocess.DEVNULL,
                stdout=fh,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,  # own process group
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        p = _Proc(name, popen, log)
        self.procs.append(p)
        return p

    def _where(self) -> str:
        return f"work dir {self.workdir}, kept if COMPUTEGROUPS_K8S_KEEP=1"

    def _wait(self, proc: _Proc, check: Callable[[], Any], timeout: float) -> None:
        t0 = time.monotonic()
        deadline = t0 + timeout
        last_err: Any = None
        while time.monotonic() < deadline:
            if proc.popen.poll() is not None:
                raise ControlPlaneError(
                    f"{proc.name} exited with {proc.popen.returncode} ({self._where()}); "
                    f"log tail:\n{_log_tail(proc.log)}"
                )
            try:
                if check():
                    self.timings[proc.name] = time.monotonic() - t0
                    return
            except Exception as e:
                last_err = e
            time.sleep(0.1)
        raise ControlPlaneError(
            f"{proc.name} not ready after {timeout}s (last error: {last_err}; {self._where()}); "
            f"log tail:\n{_log_tail(proc.log)}"
        )

    def _start(self, timeout: float) -> None:
        t0 = time.monotonic()
        w = self.workdir
        pki = generate_pki(w / "pki")
        (w / "tokens.csv").write_text(
            f'{self.admin_token},{self.ADMIN_USER},uid-admin,"system:masters"\n'
            f"{self._scheduler_token},system:kube-scheduler,uid-kube-scheduler\n"
            f'{self._kwok_token},kwok-controller,uid-kwok,"system:masters"\n'
            f"{self._kcm_token},system:kube-controller-manager,uid-kube-controller-manager\n"
        )
        (w / "tokens.csv").chmod(0o600)

        etcd = self._spawn(
            "etcd",
            [
                "--name=default",
                f"--data-dir={w / 'etcd'}",
                f"--listen-client-urls={self.etcd_url}",
                f"--advertise-client-urls={self.etcd_url}",
                f"--listen-peer-urls={self._etcd_peer}",
                f"--initial-advertise-peer-urls={self._etcd_peer}",
                f"--initial-cluster=default={self._etcd_peer}",
                "--initial-cluster-state=new",
                "--unsafe-no-fsync",
                "--log-level=warn",
                "--quota-backend-bytes=2147483648",
            ],
        )
        self._wait(
            etcd,
            lambda: json.load(urllib.request.urlopen(self.etcd_url + "/health", timeout=2)).get("health") == "true",
            timeout,
        )

        api = self._spawn(
            "kube-apiserver",
            [
                f"--etcd-servers={self.etcd_url}",
                "--etcd-prefix=/registry",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={w / 'apiserver-certs'}",
                f"--tls-cert-file={pki['apiserver.crt']}",
                f"--tls-private-key-file={pki['apiserver.key']}",
                f"--client-ca-file={pki['ca.crt']}",
                f"--token-auth-file={w / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC",
                "--anonymous-auth=false",
                f"--service-account-issuer={self.SA_ISSUER}",
                f"--service-account-key-file={pki['sa.pub']}",
                f"--service-account-signing-key-file={pki['sa.key']}",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--allow-privileged=true",
                # The node lifecycle controller is not run (KWOK plays kubelet), so nothing
                # would lift the node.kubernetes.io/not-ready taint that TaintNodesByCondition
                # puts on every new node.  Without kube-controller-manager nothing creates
                # the per-namespace "default" ServiceAccount either.
                "--disable-admission-plugins="
                + ("TaintNodesByCondition" if self.controller_manager else "ServiceAccount,TaintNodesByCondition"),
                "--endpoint-reconciler-type=none",
                "--watch-cache=true",
                "--v=1",
                *self.apiserver_args,
            ],
        )
        admin = self.client()
        self._wait(api, lambda: admin.request("GET", "/readyz") == "ok", timeout)
        write_kubeconfig(self.kubeconfig, self.server, self.ca_file, self.admin_token, self.ADMIN_USER)

        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        if self.controller_manager:
            kcm_kc = write_kubeconfig(
                w / "controller-manager.kubeconfig",
                self.server,
                self.ca_file,
                self._kcm_token,
                "system:kube-controller-manager",
            )
            kcm = self._spawn(
                "kube-controller-manager",
                [
                    f"--kubeconfig={kcm_kc}",
                    f"--authentication-kubeconfig={kcm_kc}",
                    f"--authorization-kubeconfig={kcm_kc}",
                    "--leader-elect=false",
                    "--bind-address=127.0.0.1",
                    f"--secure-port={self._kcm_port}",
                    f"--cert-dir={w / 'controller-manager-certs'}",
                    "--use-service-account-credentials=true",
                    f"--service-account-private-key-file={pki['sa.key']}",
                    f"--root-ca-file={pki['ca.crt']}",
                    f"--cluster-signing-cert-file={pki['ca.crt']}",
                    f"--cluster-signing-key-file={pki['ca.key']}",
                    f"--controllers={','.join(self.KCM_CONTROLLERS)}",
                    "--kube-api-qps=200",
                    "--kube-api-burst=400",
                    "--v=1",
                ],
            )
            self._wait(
                kcm,
                lambda: (
                    urllib.request.urlopen(
                        f"https://127.0.0.1:{self._kcm_port}/healthz", context=insecure, timeout=2
                    ).read()
                    == b"ok"
                    # The serviceaccount controller has caught up once "default" exists.
                    and admin.status("GET", "/api/v1/namespaces/default/serviceaccounts/default") == 200
                ),
                timeout,
            )

        sched_kc = write_kubeconfig(
            w / "scheduler.kubeconfig", self.server, self.ca_file, self._scheduler_token, "system:kube-scheduler"
        )
        sched = self._spawn(
            "kube-scheduler",
            [
                f"--kubeconfig={sched_kc}",
                f"--authentication-kubeconfig={sched_kc}",
                f"--authorization-kubeconfig={sched_kc}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={self._sched_port}",
                f"--cert-dir={w / 'scheduler-certs'}",
                "--v=1",
            ],
        )
        self._wait(
            sched,
            lambda: (
                urllib.request.urlopen(
                    f"https://127.0.0.1:{self._sched_port}/readyz", context=insecure, timeout=2
                ).read()
                == b"ok"
            ),
            timeout,
        )

        kwok_kc = write_kubeconfig(
            w / "kwok.kubeconfig", self.server, self.ca_file, self._kwok_token, "kwok-controller"
        )
        kwok = self._spawn(
            "kwok",
            [
                f"--kubeconfig={kwok_kc}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
                "--cidr=10.244.0.1/16",
                "--node-ip=10.1.0.1",
                f"--server-address=127.0.0.1:{self._kwok_port}",
                "--node-lease-duration-seconds=40",
            ],
        )
        self._wait(
            kwok,
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{self._kwok_port}/healthz", timeout=2).status == 200,
            timeout,
        )
        self.timings["total"] = time.monotonic() - t0

    def stop(self, check: bool = True, timeout: float = 15.0) -> None:
        """Terminate every component (whole process groups), newest first, each
        gone before the next is asked: kube-apiserver 1.36 does not finish its
        graceful shutdown once etcd is gone (it waits out the SIGKILL). Each
        component's stop time is in ``timings["stop <name>"]``.

        With ``check=True`` raise :class:`ControlPlaneError` if any process
        that references our work directory survives."""
        deadline = time.monotonic() + timeout
        for p in reversed(self.procs):
            t0 = time.monotonic()
            if p.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGTERM)
            try:
                p.popen.wait(max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait(5)
            self.timings[f"stop {p.name}"] = time.monotonic() - t0
            # Anything left in the group (children) goes too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.popen.pid, signal.SIGKILL)
        leftovers = _pids_referencing(str(self.workdir))
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if not os.environ.get("COMPUTEGROUPS_K8S_KEEP"):
            shutil.rmtree(self.workdir, ignore_errors=True)
        if check and leftovers:
            raise ControlPlaneError(f"leftover control-plane processes had to be killed: {leftovers}")

    def leftover_processes(self) -> list[int]:
        return _pids_referencing(str(self.workdir))

    # -- API helpers ------------------------------------------------------

    def client(self, token: str | None = None) -> Client:
        return Client(self.server, token or self.admin_token, self.ca_file)

    def ensure_namespace(self, name: str, wait_default_sa: bool = True) -> Obj:
        """Create a namespace (or return it).  With kube-controller-manager running
        and ``wait_default_sa``, also wait for its ``default`` ServiceAccount, so
        that pods can be created right away (as after ``kubectl create ns`` in a
        settled cluster)."""
        api = self.client()
        try:
            ns = api.post("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        except ApiError as e:
            if e.status != 409:
                raise
            ns = api.get(f"/api/v1/namespaces/{name}")
        if self.controller_manager and wait_default_sa:
            api.wait_for(
                f"/api/v1/namespaces/{name}/serviceaccounts/default", lambda _: True, timeout=30, what="default SA"
            )
        return ns

    def ensure_service_account(self, namespace: str, name: str) -> Obj:
        self.ensure_namespace(namespace)
        api = self.client()
        try:
            return api.post(
                f"/api/v1/namespaces/{namespace}/serviceaccounts",
                {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}},
            )
        except ApiError as e:
            if e.status != 409:
                raise
            return api.get(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}")

    def service_account_token(
        self,
        namespace: str,
        name: str,
        expiration_seconds: int = 3600,
        audiences: list[str] | None = None,
        create: bool = True,
    ) -> str:
        """Issue a token for a ServiceAccount via the TokenRequest API."""
        if create:
            self.ensure_service_account(namespace, name)
        spec: dict[str, Any] = {"expirationSeconds": expiration_seconds}
        if audiences:
            spec["audiences"] = audiences
        resp = self.client().post(
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
        )
        return str(resp["status"]["token"])

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path | None = None, **kw: Any) -> Path:
        """Write a kubeconfig that authenticates as ``system:serviceaccount:<ns>:<name>``."""
        token = self.service_account_token(namespace, name, **kw)
        path = path or self.workdir / f"sa-{namespace}-{name}.kubeconfig"
        return write_kubeconfig(
            Path(path), self.server, self.ca_file, token, f"system:serviceaccount:{namespace}:{name}"
        )

    def ensure_gpu_device_class(self, name: str = GPU_DRA_DRIVER) -> Obj:
        """A DeviceClass selecting every device of the ``gpu.nvidia.com`` driver."""
        api = self.client()
        body = {
            "apiVersion": "resource.k8s.io/v1",
            "kind": "DeviceClass",
            "metadata": {"name": name},
            "spec": {"selectors": [{"cel": {"expression": f'device.driver == "{GPU_DRA_DRIVER}"'}}]},
        }
        try:
            return api.post("/apis/resource.k8s.io/v1/deviceclasses", body)
        except ApiError as e:
            if e.status != 409:
                raise
            return api.get(f"/apis/resource.k8s.io/v1/deviceclasses/{name}")

    def make_gpu_node(
        self,
        name: str,
        gpus: int = 8,
        product: str = "NVIDIA-H100-80GB-HBM3",
        memory_mib: int = 81559,
        clique: str | None = None,
        dra: bool = True,
        *,
        shareable: bool = True,
        cpu: str = "128",
        memory: str = "2Ti",
        pods: str = "110",
        labels: dict[str, str] | None = None,
        taint: bool = False,
        wait_ready: bool = True,
        timeout: float = 60.0,
    ) -> Obj:
        """Create a KWOK-managed fake GPU node (and its DRA ResourceSlice).

        The node carries the GPU Feature Discovery labels, ``nvidia.com/gpu``
        capacity/allocatable and, with ``dra=True``, a ``resource.k8s.io/v1``
        ResourceSlice for driver ``gpu.nvidia.com`` with one device per GPU
        (``shareable``: devices that take DRA consumable-capacity shares, see
        :func:`gpu_resource_slice`). ``taint=True`` adds KWOK's suggested ``kwok.x-k8s.io/node=fake:NoSchedule``
        taint (off by default so unmodified workloads can land on the node).
        Returns the node object (Ready, when ``wait_ready``)."""
        api = self.client()
        node_labels = {
            "kubernetes.io/hostname": name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            "type": "kwok",
            "nvidia.com/gpu.present": "true" if gpus else "false",
            "nvidia.com/gpu.product": product,
            "nvidia.com/gpu.memory": str(memory_mib),
            "nvidia.com/gpu.count": str(gpus),
            "nvidia.com/gpu.family": gpu_architecture(product).lower().replace(" ", "-"),  # a label value
        }
        if clique is not None:
            node_labels["nvidia.com/gpu.clique"] = clique
        node_labels.update(labels or {})
        resources = {"cpu": cpu, "memory": memory, "pods": pods, "ephemeral-storage": "1Ti", GPU_RESOURCE: str(gpus)}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": name,
                "labels": node_labels,
                "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            },
            "spec": {"taints": [KWOK_TAINT] if taint else []},
            "status": {
                "capacity": resources,
                "allocatable": dict(resources),
                "nodeInfo": {
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "kubeletVersion": "fake",
                    "kubeProxyVersion": "fake",
                },
            },
        }
        created = api.post("/api/v1/nodes", node)
        if dra and gpus:
            api.post(
                "/apis/resource.k8s.io/v1/resourceslices",
                gpu_resource_slice(name, gpus, product, memory_mib, clique, shareable=shareable),
            )
        if not wait_ready:
            return created
        return api.wait_for(f"/api/v1/nodes/{name}", node_is_ready, timeout=timeout, what="node Ready")

    def delete_node(self, name: str) -> None:
        api = self.client()
        with contextlib.suppress(ApiError):
            api.request(
                "DELETE", "/apis/resource.k8s.io/v1/resourceslices", params={"fieldSelector": f"spec.nodeName={name}"}
            )
        with contextlib.suppress(ApiError):
            api.delete(f"/api/v1/nodes/{name}")


# --------------------------------------------------------------------------
# Object builders
# --------------------------------------------------------------------------


def gpu_architecture(product: str) -> str:
    p = product.upper()
    for needle, arch in (
        ("GB200", "Blackwell"),
        ("B200", "Blackwell"),
        ("B100", "Blackwell"),
        ("GH200", "Hopper"),
        ("H200", "Hopper"),
        ("H100", "Hopper"),
        ("H800", "Hopper"),
        ("A100", "Ampere"),
        ("A800", "Ampere"),
        ("L40", "Ada Lovelace"),
        ("L4", "Ada Lovelace"),
        ("V100", "Volta"),
    ):
        if needle in p:
            return arch
    return "Unknown"


def gpu_uuid(node: str, index: int) -> str:
    return "GPU-" + str(_uuid.uuid5(_uuid.NAMESPACE_DNS, f"{node}/{index}"))


def gpu_resource_slice(
    node: str,
    gpus: int,
    product: str = "NVIDIA-H100-80GB-HBM3",
    memory_mib: int = 81559,
    clique: str | None = None,
    *,
    shareable: bool = True,
) -> Obj:
    """A ``resource.k8s.io/v1`` ResourceSlice shaped like the NVIDIA DRA driver's.

    GPUs ``0..n/2-1`` are on NUMA node 0, the rest on 1 (``resource.kubernetes.io/numaNode``).
    ``shareable``: each device allows multiple allocations (DRA consumable capacity) and
    publishes ``shares: 1000`` with a request policy (1 to 1000; a request that names no
    shares takes all 1000, so a whole-GPU claim stays exclusive); its memory is consumable too.
    """
    arch = gpu_architecture(product)
    devices = []
    for i in range(gpus):
        attrs: dict[str, dict[str, Any]] = {
            "type": {"string": "gpu"},
            "index": {"int": i},
            "uuid": {"string": gpu_uuid(node, i)},
            "productName": {"string": product},
            "architecture": {"string": arch},
            "brand": {"string": "Nvidia"},
            "driverVersion": {"version": "570.124.6"},
            "cudaDriverVersion": {"version": "12.8.0"},
            "resource.kubernetes.io/pcieRoot": {"string": f"pci0000:{(i // 2) * 0x20 + 0x10:02x}"},
            "resource.kubernetes.io/numaNode": {"int": i * 2 // gpus},
        }
        if clique is not None:
            attrs["cliqueId"] = {"string": clique}
        device: Obj = {"name": f"gpu-{i}", "attributes": attrs, "capacity": {"memory": {"value": f"{memory_mib}Mi"}}}
        if shareable:
            device["allowMultipleAllocations"] = True
            device["capacity"][GPU_SHARES] = {
                "value": "1000",
                "requestPolicy": {"default": "1000", "validRange": {"min": "1", "max": "1000"}},
            }
        devices.append(device)
    return {
        "apiVersion": "resource.k8s.io/v1",
        "kind": "ResourceSlice",
        "metadata": {"name": f"{node}-{GPU_DRA_DRIVER}"},
        "spec": {
            "driver": GPU_DRA_DRIVER,
            "nodeName": node,
            "pool": {"name": node, "generation": 1, "resourceSliceCount": 1},
            "devices": devices,
        },
    }


def node_is_ready(node: Obj) -> bool:
    for c in node.get("status", {}).get("conditions", []) or []:
        if c.get("type") == "Ready":
            return bool(c.get("status") == "True")
    return False


def pod_phase(pod: Obj) -> str | None:
    phase = pod.get("status", {}).get("phase")
    return str(phase) if phase is not None else None


def decode_jwt_claims(token: str) -> Obj:
    """Decode (without verifying) the claims of a JWT such as a ServiceAccount token."""
    payload = token.split(".")[1]
    payload += "=" * (-len(payload) % 4)
    claims: Obj = json.loads(base64.urlsafe_b64decode(payload))
    return claims
