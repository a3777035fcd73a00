"""The reverse proxy from a client to its node: bodies streamed both ways, nothing buffered.

Hot path: the node's record comes from the in-memory address cache, activity is
recorded in memory; a proxied request normally costs no Redis command at all.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from manager import cluster, metrics, sessions
from manager.runtime import Runtime
from shared.errors import InvalidNode, NodeNotFound, NodeNotResponding, NodeNotRunning, NoLiveManager
from shared.models import NodeRecord, NodeStatus

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate", b"host", cluster.TOKEN_HEADER.encode(),
})
_TOKEN = cluster.TOKEN_HEADER.encode()
_VIA = cluster.VIA_HEADER.encode()
SMALL_BODY = 65536  # responses up to this size with a known length are sent in one piece


def _request_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    raw = scope["headers"]
    extra: set[bytes] = set()
    for k, v in raw:
        if k == b"connection":
            extra.update(t.strip().lower() for t in v.split(b","))
    return [(k, v) for k, v in raw if k not in HOP_BY_HOP and k not in extra]


def _has_body(scope: Scope) -> bool:
    for k, v in scope["headers"]:
        if k == b"content-length":
            return v != b"0"
        if k == b"transfer-encoding":
            return True
    return False


class Proxy:
    """Proxies one request to the cookie's node; built once per app."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        p = rt.cfg.proxy
        self._timeouts: dict[str, httpx.Timeout] = {
            path: httpx.Timeout(t, connect=p.connect_timeout_seconds) for path, t in p.path_timeouts.items()}
        self._default_timeout = httpx.Timeout(p.timeout_seconds, connect=p.connect_timeout_seconds)
        self._replica_header = (cluster.REPLICA_HEADER.encode(), rt.replica.replica_id.encode())
        self._counters: dict[tuple[str, int], Any] = {}

    async def resolve(self, node_id: str | None) -> NodeRecord:
        """The node's record: cache first, then Redis; 403 for no or unknown cookie."""
        if not node_id:
            raise InvalidNode(node_id)
        rec = self.rt.cache.get(node_id)
        if rec is None:
            rec = await self.rt.store.get_node(node_id)
            if rec is None or rec.status == NodeStatus.RELEASED:
                raise InvalidNode(node_id)
            self.rt.cache.put(rec)
        return rec

    async def _revive(self, rec: NodeRecord) -> NodeRecord:
        """The node did not answer or is not running: restart it (or say why not)."""
        self.rt.cache.invalidate(rec.id)
        fresh = await self.rt.store.get_node(rec.id)
        if fresh is None or fresh.status == NodeStatus.RELEASED:
            raise InvalidNode(rec.id)
        if not self.rt.cfg.node.restart_stopped and fresh.status != NodeStatus.RUNNING:
            raise NodeNotRunning(rec.id)
        try:
            fresh = await sessions.ensure_running(self.rt, rec.id)
        except NodeNotFound:
            raise InvalidNode(rec.id) from None
        self.rt.cache.put(fresh)
        return fresh

    async def _base_url(self, rec: NodeRecord, scope: Scope,
                        headers: list[tuple[bytes, bytes]]) -> tuple[str, bool]:
        """Where to send: the node itself, or a replica of its owner when the node is not routable."""
        rt = self.rt
        if (rec.manager_id == rt.manager_id or not rt.cfg.cluster.proxy_through_owner.get(rec.manager_id)
                or any(k == _VIA for k, _ in scope["headers"])):  # forwarded once already: never loop
            return rec.address, False
        replicas = await cluster.owner_replicas(rt, rec.manager_id)
        if not replicas:
            raise NoLiveManager(rec.manager_id)
        metrics.FORWARDED.labels("proxy").inc()
        headers.append((_TOKEN, rt.cfg.internal_token.encode()))
        headers.append((_VIA, rt.replica.replica_id.encode()))
        return replicas[0].url, True

    async def handle(self, request: Request) -> Response:
        scope = request.scope
        rt = self.rt
        path = scope["path"]
        t0 = time.perf_counter()
        rec = await self.resolve(request.cookies.get("node_id"))
        if rec.status != NodeStatus.RUNNING:
            rec = await self._revive(rec)
        headers = _request_headers(scope)
        base, via_owner = await self._base_url(rec, scope, headers)
        qs = scope.get("query_string") or b""
        suffix = path + ("?" + qs.decode("latin-1") if qs else "")
        timeout = self._timeouts.get(path, self._default_timeout)
        body_counter = [0]
        has_body = _has_body(scope)
        rt.inflight += 1
        try:
            try:
                upstream = await self._send(scope["method"], base + suffix, headers, request, has_body,
                                            timeout, body_counter)
            except httpx.ConnectError:
                if via_owner or body_counter[0]:
                    raise
                # the node moved or stopped since we cached it: refresh, revive, retry once
                rec = await self._revive(rec)
                upstream = await self._send(scope["method"], rec.address + suffix, headers, request, has_body,
                                            timeout, body_counter)
        except httpx.HTTPError:
            rt.inflight -= 1
            self._count(path, 503)
            raise NodeNotResponding() from None
        except BaseException:
            rt.inflight -= 1
            raise
        if not via_owner:
            rt.activity.record(rec.id, rec.manager_id)
        metrics.PROXY_SECONDS.labels(path).observe(time.perf_counter() - t0)
        metrics.PROXY_BYTES_IN.inc(body_counter[0])
        self._count(path, upstream.status_code)
        return _Upstream(upstream, self._replica_header, rt)

    async def _send(self, method: str, url: str, headers: list[tuple[bytes, bytes]], request: Request,
                    has_body: bool, timeout: httpx.Timeout, counter: list[int]) -> httpx.Response:
        content = _counting(request, counter) if has_body else None
        req = self.rt.http.build_request(method, url, headers=headers, content=content, timeout=timeout)
        return await self.rt.http.send(req, stream=True)

    def _count(self, path: str, code: int) -> None:
        key = (path, code // 100)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = metrics.PROXY_REQUESTS.labels(path, metrics.status_class(code))
        child.inc()


async def _counting(request: Request, counter: list[int]) -> Any:
    async for chunk in request.stream():
        counter[0] += len(chunk)
        yield chunk


class _Upstream(Response):
    """Sends a node's response back as it arrives; small known-length bodies in one piece."""

    def __init__(self, upstream: httpx.Response, replica_header: tuple[bytes, bytes], rt: Runtime) -> None:
        self.upstream = upstream
        self.status_code = upstream.status_code
        self.rt = rt
        self.raw_headers = [(k, v) for k, v in upstream.headers.raw if k.lower() not in HOP_BY_HOP]
        self.raw_headers.append(replica_header)
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        up = self.upstream
        sent = 0
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            length = up.headers.get("content-length")
            if length is not None and int(length) <= SMALL_BODY:
                body = await up.aread()
                sent = len(body)
                await send({"type": "http.response.body", "body": body})
                return
            # large or unknown length: stream, and stop reading the node if the client goes away
            disconnected = asyncio.Event()

            async def watch() -> None:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        disconnected.set()
                        return

            watcher = asyncio.create_task(watch())
            try:
                async for chunk in up.aiter_raw():
                    if disconnected.is_set():
                        return
                    sent += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                watcher.cancel()
        except httpx.HTTPError:
            # the node dropped the connection mid-body: nothing sane to send, end the response
            return
        finally:
            await up.aclose()
            self.rt.inflight -= 1
            metrics.PROXY_BYTES_OUT.inc(sent)
