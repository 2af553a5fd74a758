"""etcd v3 for the Dynamo integration: ``etcd3gw`` (etcd's JSON gateway) with TLS, auth and retries.

``etcd3gw`` (OpenStack's client of the gateway) makes the requests, on a ``requests``
session set up here: one pool of kept-alive connections, TLS verified against
``ca_file`` (the system's CAs without one; ``REQUESTS_CA_BUNDLE`` does not override a
``ca_file``), a client certificate with ``cert_file``/``key_file``. With ``user`` and
``password`` every request carries an etcd auth token, fetched on first use from
``/v3/auth/authenticate`` and fetched again when etcd answers 401 (the token expired,
or etcd restarted and forgot it).

Each call is retried with backoff and jitter (:mod:`computegroups.retry`) while it
fails in a way that may pass: the connection refused or dropped, a timeout, HTTP 429
or 503 (honouring ``Retry-After``, as a proxy in front of etcd may send), an etcd
with no leader. A bad certificate, a refused password or a malformed answer is raised
at once. The ``a``-prefixed coroutines run the calls in a worker thread.

Keys and values are ``str`` here and base64 on the wire, as the gateway wants. A watch
is a streaming POST whose response is one JSON object per line;
:meth:`EtcdClient.watch_prefix` yields the events and can be closed from another
thread (``etcd3gw``'s own watch cannot tell its caller that the stream ended, so the
stream is read here, on the library's session).

Errors: everything that goes wrong talking to etcd leaves as :class:`EtcdError`
(a :class:`~computegroups.errors.ProviderError`) naming the URL and why, ``raise ...
from`` the cause.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception, InternalServerError

from computegroups.errors import ProviderError
from computegroups.retry import retry_after_s, retrying

__all__ = ["EtcdClient", "EtcdError", "KeyValue", "Watch", "WatchEvent", "prefix_end"]

T = TypeVar("T")

#: Answers that may pass if asked again.
_TRANSIENT_STATUS = frozenset({408, 429, 502, 503, 504})


class EtcdError(ProviderError):
    """etcd could not be reached or refused a request; the message says which URL and why.

    ``transient``: the same call may succeed later (retried by the client before it is
    raised); ``retry_after_s``: the wait the server asked for, if it did.
    """

    def __init__(
        self, message: str, *, transient: bool = False, retry_after_s: float | None = None, key: str | None = None
    ) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after_s = retry_after_s
        #: The :class:`EtcdClient` argument at fault, for a setting refused before anything was sent.
        self.key = key


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: str | bytes | None) -> str:
    return base64.b64decode(data or "").decode(errors="replace")


def prefix_end(prefix: str) -> str:
    """The ``range_end`` that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw).decode("latin-1")
        raw.pop()
    return "\0"


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key: its value, the revision of its last change and its lease (0: none)."""

    key: str
    value: str
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """A change under a watched prefix: ``put`` (with the new value) or ``delete``."""

    kind: str
    key: str
    value: str
    revision: int


def _message(text: str | None) -> str:
    """The ``message`` of a gateway error body (JSON), else the text itself, on one line."""
    text = text or ""
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict) and (body.get("message") or body.get("error")):
        text = str(body.get("message") or body.get("error"))
    return " ".join(text.split())[:300]


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The ``ssl`` error under a failed request (requests and urllib3 wrap it a few times), if any."""
    todo: list[Any] = [exc]
    for _ in range(20):
        if not todo:
            break
        e = todo.pop(0)
        if isinstance(e, ssl.SSLError):
            return e
        if isinstance(e, BaseException):
            todo += [*e.args, getattr(e, "reason", None), e.__cause__, e.__context__]
    return None


def _is_tls_failure(exc: BaseException) -> bool:
    return _tls_failure(exc) is not None


def _describe(exc: BaseException) -> str:
    """Why a request failed, on one line: a TLS failure by its reason, anything else as requests says it."""
    tls = _tls_failure(exc)
    if tls is not None:
        detail = getattr(tls, "verify_message", None) or str(tls)
        return f"TLS handshake failed: {tls.reason or type(tls).__name__}: {detail}"
    return f"{type(exc).__name__}: {exc}"


def _check_file(key: str, what: str, path: str | None) -> str | None:
    if path is None:
        return None
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise EtcdError(f"etcd: {what} {path!r} is not a readable file", key=key)
    return path


class _Session(requests.Session):
    """A session whose own CA bundle wins over ``REQUESTS_CA_BUNDLE``/``CURL_CA_BUNDLE``.

    requests lets those variables replace a session's ``verify`` (psf/requests#3829), which
    would verify etcd's certificate against the system's CAs instead of ``ca_file``.
    """

    def __init__(self, ca_file: str | None, cert: tuple[str, str] | None) -> None:
        super().__init__()
        if ca_file is not None:
            self.verify = ca_file
        self.cert = cert

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any, cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if verify is None and self.verify is not True:
            settings["verify"] = self.verify
        return settings


class _TokenAuth(requests.auth.AuthBase):
    """etcd's token auth over the gateway: ``Authorization: <token>``, renewed once on a 401."""

    def __init__(self, url: str, user: str, password: str, session: Callable[[], requests.Session]) -> None:
        self.url = url
        self.user = user
        self._password = password
        self._session = session
        self._token: str | None = None
        self._lock = threading.Lock()

    def token(self, *, renew: bool = False) -> str:
        with self._lock:
            if renew or self._token is None:
                self._token = self._authenticate()
            return self._token

    def _authenticate(self) -> str:
        where = f"{self.url}/v3/auth/authenticate"
        try:
            with self._session() as session:
                resp = session.post(where, json={"name": self.user, "password": self._password}, timeout=10)
        except requests.exceptions.RequestException as exc:
            raise EtcdError(f"etcd {where}: {_describe(exc)}", transient=not _is_tls_failure(exc)) from exc
        if resp.status_code != 200:
            raise EtcdError(
                f"etcd {where}: authentication as {self.user!r} refused (HTTP {resp.status_code}): "
                f"{_message(resp.text)}",
                transient=resp.status_code in _TRANSIENT_STATUS,
                retry_after_s=retry_after_s(resp.headers.get("Retry-After")),
            )
        try:
            return str(resp.json()["token"])
        except (ValueError, KeyError, TypeError) as exc:
            raise EtcdError(f"etcd {where}: no token in the answer: {resp.text[:200]!r}") from exc

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = self.token()
        r.register_hook("response", self._renew_on_401)  # type: ignore[no-untyped-call]
        return r

    def _renew_on_401(self, resp: requests.Response, **kwargs: Any) -> requests.Response:
        if resp.status_code != 401 or resp.request.headers.get("X-Computegroups-Reauth"):
            return resp
        resp.close()
        again = resp.request.copy()
        again.headers["Authorization"] = self.token(renew=True)
        again.headers["X-Computegroups-Reauth"] = "1"
        connection = resp.connection
        new: requests.Response = connection.send(again, **kwargs)
        new.history.append(resp)
        new.request = again
        return new


def _refuse_busy(resp: requests.Response, **_: Any) -> None:
    """A session hook: 429/503 become a transient EtcdError carrying ``Retry-After``."""
    if resp.status_code in (429, 503):
        raise EtcdError(
            f"etcd {resp.url}: HTTP {resp.status_code}: {_message(resp.text)}",
            transient=True,
            retry_after_s=retry_after_s(resp.headers.get("Retry-After")),
        )


class EtcdClient:
    """Talks to one etcd endpoint (``http://host:port`` or ``https://host:port``) over its JSON gateway.

    ``ca_file``: the CA bundle that signed etcd's certificate (https; default: the system's);
    ``cert_file``/``key_file``: a client certificate, for an etcd run with
    ``--client-cert-auth``; ``user``/``password``: etcd's own auth (``etcdctl auth enable``).
    ``retry_attempts``/``retry_timeout_s``: how long a call is retried while it fails transiently.
    Bad values raise :class:`EtcdError` here, before anything is sent.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 5.0,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        user: str | None = None,
        password: str | None = None,
        retry_attempts: int = 4,
        retry_timeout_s: float = 15.0,
    ) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        try:
            port = parts.port or 2379
        except ValueError as exc:
            raise EtcdError(f"etcd: {url!r}: {exc}", key="url") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise EtcdError(f"etcd: {url!r} is not an http://host:port or https://host:port URL", key="url")
        if (cert_file is None) != (key_file is None):
            raise EtcdError(
                f"etcd {url}: a client certificate needs both its file and its key file",
                key="key_file" if key_file is None else "cert_file",
            )
        if parts.scheme == "http" and (ca_file or cert_file):
            raise EtcdError(
                f"etcd: {url!r}: a CA or client certificate needs an https:// URL",
                key="ca_file" if ca_file else "cert_file",
            )
        if (user is None) != (password is None) or user == "":
            raise EtcdError(
                f"etcd {url}: auth needs both a user name and a password", key="password" if user else "user"
            )
        host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
        self.url = f"{parts.scheme}://{host}:{port}"
        self.timeout_s = timeout_s
        self.user = user
        self.ca_file, self.cert_file, self.key_file = ca_file, cert_file, key_file
        self._password = password
        self.retry_attempts = max(1, int(retry_attempts))
        self.retry_timeout_s = float(retry_timeout_s)
        _check_file("ca_file", "CA file", ca_file)
        _check_file("cert_file", "client certificate", cert_file)
        _check_file("key_file", "client key", key_file)
        self._gw = Etcd3Client(
            host=parts.hostname,
            port=port,
            protocol=parts.scheme,
            timeout=timeout_s,
            api_path="/v3/",  # etcd >= 3.4 (Dynamo needs 3.5): no discovery round trip
            session=self._new_session(),
        )
        self._gw.session.hooks["response"].append(_refuse_busy)
        if user is not None and password is not None:
            self._gw.session.auth = _TokenAuth(self.url, user, password, self._new_session)

    def dynamo_env(self) -> dict[str, str]:
        """This client's TLS and auth settings as the variables Dynamo's runtime reads (``ETCD_AUTH_*``)."""
        pairs = {
            "ETCD_AUTH_CA": self.ca_file,
            "ETCD_AUTH_CLIENT_CERT": self.cert_file,
            "ETCD_AUTH_CLIENT_KEY": self.key_file,
            "ETCD_AUTH_USERNAME": self.user,
            "ETCD_AUTH_PASSWORD": self._password,
        }
        return {k: v for k, v in pairs.items() if v}

    def _new_session(self) -> requests.Session:
        """A session with this client's TLS settings and no auth (also used to fetch a token)."""
        cert = (self.cert_file, self.key_file) if self.cert_file and self.key_file else None
        return _Session(self.ca_file, cert)

    # -- plumbing -----------------------------------------------------------------------
    def _once(self, path: str, call: Callable[[], T]) -> T:
        where = f"{self.url}/v3/{path}"
        try:
            return call()
        except EtcdError:
            raise
        except ConnectionFailedError as exc:
            why = _describe(exc.__context__) if exc.__context__ is not None else _message(exc.detail_text)
            raise EtcdError(f"etcd {where}: {why or 'connection failed'}", transient=not _is_tls_failure(exc)) from exc
        except ConnectionTimeoutError as exc:
            raise EtcdError(f"etcd {where}: timed out: {_message(exc.detail_text)}", transient=True) from exc
        except InternalServerError as exc:
            # etcd answers 500 for "no leader" and "request timed out" while it elects one.
            raise EtcdError(f"etcd {where}: HTTP 500: {_message(exc.detail_text)}", transient=True) from exc
        except Etcd3Exception as exc:
            why = " ".join(str(a) for a in exc.args)
            raise EtcdError(f"etcd {where}: {why + ': ' if why else ''}{_message(exc.detail_text)}") from exc
        except requests.exceptions.RequestException as exc:
            raise EtcdError(f"etcd {where}: {_describe(exc)}", transient=not _is_tls_failure(exc)) from exc
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not the JSON the API defines
            raise EtcdError(f"etcd {where}: unexpected answer: {exc}") from exc

    def _call(self, path: str, call: Callable[[], T]) -> T:
        for attempt in retrying(attempts=self.retry_attempts, timeout_s=self.retry_timeout_s):
            with attempt:
                return self._once(path, call)
        raise AssertionError("unreachable")  # stamina raises the last error

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = self._gw.get_url(path)
        return self._call(path, lambda: dict(self._gw.post(url, json=body)))

    def check(self) -> int:
        """Reach etcd once, not retried (authenticating, with auth): its revision now; EtcdError if it cannot."""
        url = self._gw.get_url("maintenance/status")
        answer = self._once("maintenance/status", lambda: dict(self._gw.post(url, json={})))  # once: callers retry
        return int(answer.get("header", {}).get("revision", 0))

    # -- keys ---------------------------------------------------------------------------
    def get_prefix(self, prefix: str) -> tuple[dict[str, KeyValue], int]:
        """Every key under ``prefix`` and the store's revision, read atomically."""
        answer = self._post("kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        kvs: dict[str, KeyValue] = {}
        for kv in answer.get("kvs", []):
            key = _unb64(kv.get("key"))
            kvs[key] = KeyValue(key, _unb64(kv.get("value")), int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))
        return kvs, int(answer.get("header", {}).get("revision", 0))

    def get(self, key: str) -> str | None:
        """The value of ``key``, None if absent."""
        values = self._call("kv/range", lambda: self._gw.get(key))
        return values[0].decode(errors="replace") if values else None

    def put(self, key: str, value: str, *, lease: int = 0) -> int:
        """Set ``key``; with ``lease`` it is deleted when the lease ends. Returns the new revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._post("kv/put", body).get("header", {}).get("revision", 0))

    def delete(self, key: str) -> int:
        """Delete ``key``; returns how many keys were deleted (0 or 1)."""
        return int(self._post("kv/deleterange", {"key": _b64(key)}).get("deleted", 0))

    # -- leases -------------------------------------------------------------------------
    def lease_grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; returns its id."""
        return self._call("lease/grant", lambda: self._gw.lease(int(ttl_s)).id)

    def lease_keepalive(self, lease: int) -> int:
        """Renew a lease; returns its TTL (0 or less: the lease has expired)."""
        answer = self._post("lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    def lease_ttl(self, lease: int) -> int:
        """Seconds left on a lease (-1: it has ended, or never existed)."""
        answer = self._post("lease/timetolive", {"ID": str(lease)})
        return int(answer.get("TTL", -1))

    def lease_revoke(self, lease: int) -> None:
        """End a lease now, deleting its keys (no error if it has already ended)."""
        with contextlib.suppress(EtcdError):
            self._post("lease/revoke", {"ID": str(lease)})

    # -- watching -----------------------------------------------------------------------
    def watch_prefix(self, prefix: str, start_revision: int) -> Watch:
        """Changes under ``prefix`` from ``start_revision`` on: iterate (blocking, in a thread); ``close()`` ends it."""
        return Watch(self, prefix, start_revision)

    # -- async --------------------------------------------------------------------------
    async def aget_prefix(self, prefix: str) -> tuple[dict[str, KeyValue], int]:
        return await asyncio.to_thread(self.get_prefix, prefix)

    async def aget(self, key: str) -> str | None:
        return await asyncio.to_thread(self.get, key)

    async def aput(self, key: str, value: str, *, lease: int = 0) -> int:
        return await asyncio.to_thread(self.put, key, value, lease=lease)

    async def adelete(self, key: str) -> int:
        return await asyncio.to_thread(self.delete, key)

    async def alease_grant(self, ttl_s: int) -> int:
        return await asyncio.to_thread(self.lease_grant, ttl_s)

    async def alease_keepalive(self, lease: int) -> int:
        return await asyncio.to_thread(self.lease_keepalive, lease)

    async def alease_ttl(self, lease: int) -> int:
        return await asyncio.to_thread(self.lease_ttl, lease)

    async def alease_revoke(self, lease: int) -> None:
        await asyncio.to_thread(self.lease_revoke, lease)

    async def acheck(self) -> int:
        return await asyncio.to_thread(self.check)


class Watch:
    """One watch stream (a streaming POST to ``/v3/watch``). Iterating blocks; ``close()`` from any thread ends it."""

    def __init__(self, client: EtcdClient, prefix: str, start_revision: int) -> None:
        self._client = client
        self._body = {
            "create_request": {
                "key": _b64(prefix),
                "range_end": _b64(prefix_end(prefix)),
                "start_revision": str(start_revision),
            }
        }
        self._resp: requests.Response | None = None
        self._closed = False

    def close(self) -> None:
        """End the stream; a blocked iteration returns."""
        self._closed = True
        resp = self._resp
        if resp is None:
            return
        sock = getattr(getattr(resp.raw, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(Exception):
            resp.close()

    def __iter__(self) -> Iterator[WatchEvent]:
        client = self._client
        url = f"{client.url}/v3/watch"
        gw = client._gw

        def open_stream() -> requests.Response:
            # The connection is bounded; the stream is not (events may be minutes apart; close() unblocks).
            resp = gw.session.post(gw.get_url("watch"), json=self._body, stream=True, timeout=(client.timeout_s, None))
            if resp.status_code != 200:
                text = resp.text
                resp.close()
                raise EtcdError(f"etcd {url}: HTTP {resp.status_code}: {_message(text)}")
            return resp

        try:
            self._resp = client._call("watch", open_stream)
            if self._closed:
                return
            for line in self._resp.iter_lines():
                if self._closed:
                    return
                if not line.strip():
                    continue
                result = json.loads(line).get("result", {})
                if result.get("canceled"):
                    raise EtcdError(f"etcd {url}: watch canceled: {result.get('cancel_reason', '')}")
                for ev in result.get("events", []):
                    kv = ev.get("kv", {})
                    yield WatchEvent(
                        "delete" if ev.get("type") == "DELETE" else "put",
                        _unb64(kv.get("key")),
                        _unb64(kv.get("value")),
                        int(kv.get("mod_revision", 0)),
                    )
        except EtcdError:
            if self._closed:
                return
            raise
        except (OSError, requests.exceptions.RequestException, ValueError, AttributeError) as exc:
            if self._closed:
                return
            raise EtcdError(f"etcd {url}: {type(exc).__name__}: {exc}", transient=True) from exc
        finally:
            if self._resp is not None:
                with contextlib.suppress(Exception):
                    self._resp.close()
