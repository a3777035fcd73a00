"""The reverse proxy from a client to its node: bodies streamed both ways, nothing buffered.

Hot path: the node's record comes from the in-memory address cache, activity is
recorded in memory; a proxied request normally costs no Redis command at all, and
goes over a pooled keep-alive connection of manager/proxy/upstream.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from manager.edge.client_auth import ClientIds, ClientKeys
from manager.edge.protocol import CORK_EXTENSION
from manager.proxy.forwarding import HeaderRules
from manager.proxy.upstream import (
    ConnectFailed,
    HostLost,
    Limits,
    ResponseTooLarge,
    UpstreamError,
    UpstreamPool,
    UpstreamTimeout,
)
from manager.proxy.upstream import Response as UpstreamResponse
from manager.replica.runtime import Runtime
from manager.session.resolve import Resolver, Target, node_cookie
from nodeops.forward import TOKEN_HEADER, VIA_HEADER
from shared import metrics
from shared.errors import (
    HostUnreachable,
    ManagerError,
    NodeNotResponding,
    NodeReadTimeout,
    NodeResponseTooLarge,
    UpstreamLost,
)
from shared.models import NODE_SECRET_HEADER, NodeRecord, NodeStatus

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"transfer-encoding", b"upgrade",
    b"proxy-authorization", b"proxy-authenticate", b"host", TOKEN_HEADER.encode(),
    NODE_SECRET_HEADER.encode(),  # a client never sets or sees a node's secret
    # the manager's own server answers 100-continue to the client; forwarded, the node's interim
    # answer would be one more response on the upstream connection
    b"expect",
})
_VIA = VIA_HEADER.encode()
_SECRET = NODE_SECRET_HEADER.encode()
SMALL_BODY = 65536  # responses up to this size with a known length are sent in one piece
T = TypeVar("T")


class Reply(Protocol):
    """The edge's direct answer (manager/edge/protocol.py): a whole response in one write."""

    async def __call__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None: ...

    def abort(self) -> None: ...

    def whole_body(self) -> bytes | None: ...


def _request_headers(scope: Scope) -> tuple[list[tuple[bytes, bytes]], bool]:
    """The headers that go on to the node, and whether the request came through another replica."""
    raw = scope["headers"]
    extra: set[bytes] = set()
    via = False
    for k, v in raw:
        if k == _VIA:
            via = True
        elif k == b"connection":
            extra.update(t.strip().lower() for t in v.split(b","))
        elif k == b"transfer-encoding":
            # the body is re-framed (chunked) on the way out: a length beside it would be a second,
            # different framing of the same bytes (our server refuses both together; never rely on it)
            extra.add(b"content-length")
    if extra:
        return [(k, v) for k, v in raw if k not in HOP_BY_HOP and k not in extra], via
    return [(k, v) for k, v in raw if k not in HOP_BY_HOP], via


def _has_body(scope: Scope) -> bool:
    for k, v in scope["headers"]:
        if k == b"content-length":
            return v != b"0"
        if k == b"transfer-encoding":
            return True
    return False


class Proxy:
    """Proxies one request to the cookie's node; built once per app."""

    def __init__(self, rt: Runtime, resolver: Resolver) -> None:
        self.rt = rt
        self.resolver = resolver
        cfg = rt.cfg
        self.client_keys = ClientKeys(cfg.api_keys, cfg.client_auth.header, cfg.client_auth.cookie)
        self.rules = HeaderRules(cfg)
        self.client_ids = ClientIds(self.client_keys, cfg.quota)
        p = rt.cfg.proxy
        self.pool = UpstreamPool(max_idle_per_host=p.max_connections, keepalive_seconds=p.keepalive_seconds,
                                 limits=Limits(p.max_response_head_bytes, p.max_response_headers,
                                               p.max_read_body_bytes))
        # a host's circuit opening ends the requests in flight to it at once
        def abort_host(host: str, why: str) -> None:
            self.pool.abort_host(host, why)

        rt.circuits.on_open.append(abort_host)
        self._connect_timeout = p.connect_timeout_seconds
        self._timeouts = dict(p.path_timeouts)
        self._default_timeout = p.timeout_seconds
        self._counters: dict[tuple[str, int], Any] = {}
        self._histograms: dict[str, Any] = {}

    async def handle(self, request: Request) -> Response:
        """The node's answer to a request of the ASGI app, streamed back as it comes."""
        return await self.forward(request.scope, node_cookie(request.cookies), request.receive)

    async def forward(self, scope: Scope, node_id: str | None, receive: Receive,
                      whole_body: bytes | None = None) -> NodeAnswer:
        """Sends the request (its body read from receive as it arrives, or whole_body when the edge
        has all of it already) to the cookie's node; the node's answer once its head is in, to be
        sent as an ASGI response or by reply_small (the edge's direct path), either of which ends the
        session's activity."""
        rt = self.rt
        path = scope["path"]
        t0 = time.perf_counter()
        rec = await self.resolver.record(node_id)
        if self.client_keys:  # before anything is done for it: another key's session is unknown here
            self.client_keys.check_bound(rec.client, scope, rec.id)
        if rec.status != NodeStatus.RUNNING:
            rec = await self.resolver.revive(rec)
        headers, via = _request_headers(scope)
        to = await self.resolver.target(rec, via)
        if not to.via_owner:  # the owner's replica checks the client's key itself, then drops it
            headers = self.for_node(headers)
        headers += [(k.encode(), v.encode()) for k, v in to.headers]
        rt.circuits.check(to.host)  # a host known to be down: fail now, not after a connect timeout
        qs = scope.get("query_string") or b""
        target = scope.get("raw_path") or path.encode()
        if qs:
            target += b"?" + qs
        counter = [0]
        body: AsyncIterator[bytes] | bytes | None = None
        if _has_body(scope):
            if whole_body is None:
                body = _counting(receive, counter)
            else:
                body, counter[0] = whole_body, len(whole_body)
        activity = rt.activity
        activity.begin(rec.id, rec.manager_id)  # ended with the response (or the error) below
        try:
            # a retry after a failed connect sends the same body: that connect consumed none of it
            upstream = await self._exchange(rec, to, scope["method"], target, headers, lambda: body, path, _as_is,
                                            self._timeouts.get(path, self._default_timeout))
        except BaseException:
            activity.end(rec.id)
            raise
        hist = self._histograms.get(path)
        if hist is None:
            hist = self._histograms[path] = metrics.PROXY_SECONDS.labels(path)
        hist.observe(time.perf_counter() - t0)
        if counter[0]:
            metrics.DEFERRED.inc(metrics.PROXY_BYTES_IN, counter[0])
        self._count(path, upstream.status_code)
        return NodeAnswer(upstream, rt, rec.id, self.rules)

    def for_node(self, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        """A request's headers as a node may see them: no key, cookie or token of the manager's."""
        if self.client_keys:
            headers = self.client_keys.strip(headers)
        return self.rules.to_node(headers)

    async def call(self, node_id: str, path: str, body: bytes, content_type: str = "application/json",
                   extra: list[tuple[bytes, bytes]] | None = None, timeout: float | None = None) -> tuple[int, bytes]:
        """One buffered POST to a session's node (the MCP gateway's tool calls, the admin's workspace
        listing): same resolver, secret, timeouts, pool, activity and error mapping as a proxied
        request; returns status and body."""
        rt = self.rt
        t0 = time.perf_counter()
        rec = await self.resolver.live(node_id)
        to = await self.resolver.target(rec, False)
        headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                   *(extra or ()), *((k.encode(), v.encode()) for k, v in to.headers)]
        if to.via_owner:  # the owner's proxy finds the node by the session's cookie
            headers.append((b"cookie", b"node_id=" + node_id.encode()))
        if timeout is None:
            timeout = self._timeouts.get(path, self._default_timeout)
        rt.circuits.check(to.host)
        rt.activity.begin(rec.id, rec.manager_id)
        try:
            status, data = await self._exchange(rec, to, "POST", path.encode(), headers, lambda: _one(body), path,
                                                _read_all, timeout)
        finally:
            rt.activity.end(rec.id)
        metrics.PROXY_SECONDS.labels(path).observe(time.perf_counter() - t0)
        self._count(path, status)
        return status, data

    async def _exchange(self, rec: NodeRecord, to: Target, method: str, target: bytes,
                        headers: list[tuple[bytes, bytes]], body: Callable[[], AsyncIterator[bytes] | bytes | None],
                        path: str, finish: Callable[[UpstreamResponse], Awaitable[T]], timeout: float | None) -> T:
        """One request to the node over the pool, finished by finish (handle: the response as it
        comes; call: read whole); sent once more to the engine-confirmed address when the connect
        failed, and every upstream failure answered by upstream_error, the one mapping."""
        rt = self.rt
        host, port = to.host, to.port
        try:
            try:
                result = await finish(await self.pool.request(method, host, port, target, headers, body(),
                                                              self._connect_timeout, timeout))
            except ConnectFailed as exc:
                if exc.timed_out and rec.manager_id != rt.manager_id:
                    # another host's node did not answer at all: its host is down or cut off (any
                    # other failure asks the owner below, whose replicas' failures open the circuit)
                    rt.circuits.failure(host, port, rec.manager_id, str(exc))
                    raise HostUnreachable(host, rec.manager_id, str(exc)) from None
                if to.via_owner:
                    raise
                # the node moved or stopped since we cached it: refresh, revive, retry once
                # (nothing was sent: a failed connect consumed none of the request)
                rec = await self.resolver.revive(rec)
                again = await self.resolver.target(rec, True)  # the engine-confirmed address again
                host, port = again.host, again.port
                # a session brought back from its workspace alone may have a new secret
                headers = [h for h in headers if h[0] != _SECRET] + [(_SECRET, rt.store.secrets.of(rec).encode())]
                result = await finish(await self.pool.request(method, host, port, target, headers, body(),
                                                              self._connect_timeout, timeout))
        except (UpstreamError, HostUnreachable) as exc:
            # a local node's address is a container's, not a host's: only another host's loss counts
            if isinstance(exc, HostLost) and rec.manager_id != rt.manager_id:
                rt.circuits.failure(host, port, rec.manager_id, str(exc))
            err = upstream_error(exc, timeout)
            self._count(path, err.status_code)
            raise err from None
        if rt.circuits.is_open(host):
            rt.circuits.success(host)  # the half-open probe went through
        return result

    def _count(self, path: str, code: int) -> None:
        key = (path, code // 100)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = metrics.PROXY_REQUESTS.labels(path, metrics.status_class(code))
        child.inc()

    def close(self) -> None:
        self.pool.close()


def upstream_error(exc: UpstreamError | HostUnreachable, timeout: float | None) -> ManagerError:
    """What the client is answered when its node's connection fails: the proxy path's one mapping."""
    if isinstance(exc, HostUnreachable):
        return exc
    if isinstance(exc, UpstreamTimeout):
        return NodeReadTimeout(timeout)
    if isinstance(exc, HostLost):
        return UpstreamLost(f"{exc}; the request may or may not have been carried out")
    if isinstance(exc, ResponseTooLarge):
        return NodeResponseTooLarge(str(exc))
    return NodeNotResponding()  # refused, reset, or a connect through the owner that failed


async def _as_is(up: UpstreamResponse) -> UpstreamResponse:
    return up  # streamed back by NodeAnswer, which closes it


async def _read_all(up: UpstreamResponse) -> tuple[int, bytes]:
    try:
        return up.status_code, await up.read()
    finally:
        up.close()


async def _one(body: bytes) -> AsyncIterator[bytes]:
    yield body


async def _counting(receive: Receive, counter: list[int]) -> AsyncIterator[bytes]:
    """The request's body as it arrives, counted: Request.stream() without its layer of generator
    (one more step per chunk on every proxied body)."""
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            if chunk:
                counter[0] += len(chunk)
                yield chunk
            if not message.get("more_body", False):
                return
        elif message["type"] == "http.disconnect":
            raise ClientDisconnect()


class NodeAnswer(Response):
    """Sends a node's response back as it arrives; small known-length bodies in one piece."""

    def __init__(self, upstream: UpstreamResponse, rt: Runtime, node_id: str, rules: HeaderRules) -> None:
        self.upstream = upstream
        self.node_id = node_id
        self.status_code = upstream.status_code
        self.rt = rt
        self.raw_headers = rules.from_node(upstream.headers, HOP_BY_HOP)
        self.background = None

    async def reply_small(self, scope: Scope, reply: Reply) -> bool:
        """The answer through the edge's reply (head and whole body in one write, no ASGI messages)
        when it is small, of known length and not to a HEAD; False, with nothing done, otherwise."""
        up = self.upstream
        length = up.content_length()
        if length is None or length > SMALL_BODY or scope["method"] == "HEAD":
            return False
        sent = 0
        try:
            # not before the whole body has come from the node: a replica killed meanwhile has sent
            # nothing of the answer, so a balancer retries the request elsewhere (tests/test_balancer.py)
            body = await up.read()
            sent = len(body)
            await reply(self.status_code, self.raw_headers, body)
        except UpstreamError:
            # the node dropped the connection mid-body: nothing sane to send, end the connection as
            # the ASGI path does (a response begun and not completed)
            reply.abort()
        finally:
            up.close()
            self.rt.activity.end(self.node_id)
            if sent:
                metrics.DEFERRED.inc(metrics.PROXY_BYTES_OUT, sent)
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        up = self.upstream
        sent = 0
        try:
            length = up.content_length()
            small = length is not None and length <= SMALL_BODY
            if small and scope["method"] != "HEAD":
                cork = scope.get("extensions", {}).get(CORK_EXTENSION)
                # the head goes out with the body, one write, not two; and not before the whole body
                # has come from the node: a replica killed meanwhile has sent nothing of the answer,
                # so a balancer retries the request elsewhere (tests/test_balancer.py)
                if cork is not None:
                    cork["cork"]()
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            if small:
                body = await up.read()
                sent = len(body)
                await send({"type": "http.response.body", "body": body})
                return
            # large or unknown length: stream, and drop the node's connection if the client goes away
            async def watch() -> None:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        up.abort()  # wakes the reader below with an UpstreamError
                        return

            watcher = asyncio.create_task(watch())
            try:
                async for chunk in up.iter_raw():
                    sent += len(chunk)
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            finally:
                watcher.cancel()
        except UpstreamError:
            # the node dropped the connection mid-body: nothing sane to send, end the response
            return
        finally:
            up.close()
            self.rt.activity.end(self.node_id)
            metrics.DEFERRED.inc(metrics.PROXY_BYTES_OUT, sent)
