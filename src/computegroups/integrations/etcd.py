"""A small etcd v3 client over etcd's JSON gateway (``/v3/kv/*``, ``/v3/lease/*``, ``/v3/watch``).

Standard library only: each call is one HTTP POST (``http.client``), run in a
worker thread by the ``a``-prefixed coroutines. Keys and values are ``str`` here
and base64 on the wire, as the gateway wants. A watch is a streaming POST whose
response is one JSON object per line; :meth:`EtcdClient.watch_prefix` yields the
events and can be closed from another thread.

Errors: everything that goes wrong talking to etcd leaves as :class:`EtcdError`
(a :class:`~computegroups.errors.ProviderError`), ``raise ... from`` the cause.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from computegroups.errors import ProviderError

__all__ = ["EtcdClient", "EtcdError", "KeyValue", "Watch", "WatchEvent", "prefix_end"]


class EtcdError(ProviderError):
    """etcd could not be reached or refused a request; the message says which URL and why."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: str | None) -> str:
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


class EtcdClient:
    """Talks to one etcd endpoint (``http://host:port``) over its JSON gateway."""

    def __init__(self, url: str, *, timeout_s: float = 5.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme != "http" or not parts.hostname:
            raise EtcdError(f"etcd: {url!r} is not an http://host:port URL (TLS is not supported)")
        self.url = f"http://{parts.hostname}:{parts.port or 2379}"
        self._host = parts.hostname
        self._port = parts.port or 2379
        self.timeout_s = timeout_s

    # -- plumbing -----------------------------------------------------------------------
    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeout_s)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise EtcdError(f"etcd {self.url}{path}: {exc}") from exc
        finally:
            conn.close()
        try:
            answer: dict[str, Any] = json.loads(data or b"{}")
        except ValueError as exc:
            raise EtcdError(f"etcd {self.url}{path}: not JSON: {data[:200]!r}") from exc
        if resp.status != 200 or ("error" in answer and "result" not in answer and "header" not in answer):
            raise EtcdError(f"etcd {self.url}{path}: HTTP {resp.status}: {answer.get('message') or answer}")
        return answer

    # -- keys ---------------------------------------------------------------------------
    def get_prefix(self, prefix: str) -> tuple[dict[str, KeyValue], int]:
        """Every key under ``prefix`` and the store's revision, read atomically."""
        answer = self._post("/v3/kv/range", {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))})
        kvs: dict[str, KeyValue] = {}
        for kv in answer.get("kvs", []):
            key = _unb64(kv.get("key"))
            kvs[key] = KeyValue(key, _unb64(kv.get("value")), int(kv.get("mod_revision", 0)), int(kv.get("lease", 0)))
        return kvs, int(answer.get("header", {}).get("revision", 0))

    def get(self, key: str) -> str | None:
        """The value of ``key``, None if absent."""
        answer = self._post("/v3/kv/range", {"key": _b64(key)})
        kvs = answer.get("kvs", [])
        return _unb64(kvs[0].get("value")) if kvs else None

    def put(self, key: str, value: str, *, lease: int = 0) -> int:
        """Set ``key``; with ``lease`` it is deleted when the lease ends. Returns the new revision."""
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return int(self._post("/v3/kv/put", body).get("header", {}).get("revision", 0))

    def delete(self, key: str) -> int:
        """Delete ``key``; returns how many keys were deleted (0 or 1)."""
        return int(self._post("/v3/kv/deleterange", {"key": _b64(key)}).get("deleted", 0))

    # -- leases -------------------------------------------------------------------------
    def lease_grant(self, ttl_s: int) -> int:
        """A new lease of ``ttl_s`` seconds; returns its id."""
        return int(self._post("/v3/lease/grant", {"TTL": int(ttl_s)})["ID"])

    def lease_keepalive(self, lease: int) -> int:
        """Renew a lease; returns its TTL (0 or less: the lease has expired)."""
        answer = self._post("/v3/lease/keepalive", {"ID": str(lease)})
        return int(answer.get("result", {}).get("TTL", 0))

    def lease_ttl(self, lease: int) -> int:
        """Seconds left on a lease (-1: it has ended, or never existed)."""
        answer = self._post("/v3/lease/timetolive", {"ID": str(lease)})
        return int(answer.get("TTL", -1))

    def lease_revoke(self, lease: int) -> None:
        """End a lease now, deleting its keys (no error if it has already ended)."""
        with contextlib.suppress(EtcdError):
            self._post("/v3/lease/revoke", {"ID": str(lease)})

    # -- watching -----------------------------------------------------------------------
    def watch_prefix(self, prefix: str, start_revision: int) -> Watch:
        """Changes under ``prefix`` from ``start_revision`` on: iterate (blocking, in a thread); ``close()`` ends it."""
        return Watch(self, prefix, start_revision)

    # -- async --------------------------------------------------------------------------
    async def aget_prefix(self, prefix: str) -> tuple[dict[str, KeyValue], int]:
        return await asyncio.to_thread(self.get_prefix, prefix)

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
        self._conn: http.client.HTTPConnection | None = None
        self._closed = False

    def close(self) -> None:
        """End the stream; a blocked iteration returns."""
        self._closed = True
        conn = self._conn
        if conn is not None and conn.sock is not None:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)

    def __iter__(self) -> Iterator[WatchEvent]:
        url = f"{self._client.url}/v3/watch"
        conn = http.client.HTTPConnection(self._client._host, self._client._port, timeout=self._client.timeout_s)
        self._conn = conn
        try:
            conn.request("POST", "/v3/watch", json.dumps(self._body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise EtcdError(f"etcd {url}: HTTP {resp.status}")
            if conn.sock is not None:
                conn.sock.settimeout(None)  # events may be minutes apart; close() unblocks
            while not self._closed:
                line = resp.readline()
                if not line:
                    return
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
        except (OSError, http.client.HTTPException, ValueError) as exc:
            if self._closed:
                return
            raise EtcdError(f"etcd {url}: {exc}") from exc
        finally:
            conn.close()
