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

from manager.edge import errors_http
from manager.edge.client_auth import ClientIds, ClientKeys
from manager.edge.protocol import CORK_EXTENSION, RawHead
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

    def send_now(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None: ...

    @property
    def write_paused(self) -> bool: ...

    def abort(self) -> None: ...

    def cut(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    def whole_body(self) -> bytes | None: ...

    def hand_off(self, app: Any) -> None: ...

    def retry(self) -> None: ...


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
        # node id -> (its cached record, the confirmed address entry, (host, port), the head's host and
        # secret lines, its container id): what start() sends a session's requests by while both entries
        # are the ones cached
        self._routes: dict[str, tuple[NodeRecord, Any, tuple[str, int], bytes, str]] = {}

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
        if counter[0]:
            metrics.DEFERRED.inc(metrics.PROXY_BYTES_IN, counter[0])
        self._observe(path, t0, upstream.status_code)
        return NodeAnswer(upstream, rt, rec.id, self.rules)

    def start(self, scope: Scope, node_id: str | None, reply: Reply) -> bool:
        """Sends a request whose body is all here to its node with no task and no await: what
        forward() does when everything it needs is cached (the session's record, running, its
        confirmed address, an idle connection to it), then answered by callbacks (_Flight). False,
        with nothing done, when anything is not: forward() takes it then."""
        target = scope.get("raw_path") or scope["path"].encode()
        qs = scope.get("query_string")
        if qs:
            target += b"?" + qs
        return self._launch(scope["method"], target, scope["path"], scope["headers"], node_id, scope, reply, None, b"")

    def start_raw(self, head: RawHead, body: bytes, edge: RawEdge) -> bool:
        """start() for a request the edge parsed itself (manager/edge/protocol.py, the raw path): no
        scope and no cycle unless its answer needs one (_RawFlight); False, with nothing done, when
        start() would refuse it."""
        if not head.node_known:  # the head's lines as the node is sent them: a pure function of it, made once
            head.node_block, head.node_known = self._node_block(head.headers), True
        block = head.node_block
        if block is None:
            return False
        return self._launch(head.method, head.target, head.path, head.headers, head.node_id, None, None, edge, body,
                            block)

    def _node_block(self, headers: list[tuple[bytes, bytes]]) -> bytes | None:
        """The request's header lines as its node is sent them (no hop-by-hop header, no credential
        of the manager's); None when the request is not for start(): re-framed, naming headers to drop,
        or through another replica (forward()'s checks)."""
        kept = []
        for k, v in headers:
            if k in HOP_BY_HOP:
                if k == b"transfer-encoding" or (k == b"connection" and v.strip().lower() not in _PLAIN):
                    return None
                continue
            if k == _VIA:
                return None
            kept.append((k, v))
        lines: list[bytes] = []
        for k, v in self.for_node(kept) if self.client_keys else self.rules.to_node(kept):
            lines += (k, b": ", v, b"\r\n")
        return b"".join(lines)

    def _launch(self, method: str, target: bytes, path: str, headers: list[tuple[bytes, bytes]],
                node_id: str | None, scope: Scope | None, reply: Reply | None, edge: RawEdge | None,
                body: bytes, block: bytes | None = None) -> bool:
        rt = self.rt
        if node_id is None:
            return False
        rec = rt.cache.get(node_id)
        if rec is None or rec.status != _RUNNING:  # (not `is`: a record may hold the plain string)
            return False
        if self.client_keys:
            try:
                # (the key's checks read only the headers: the raw path's are all there is)
                self.client_keys.check_bound(rec.client, scope or {"headers": headers}, rec.id)
            except ManagerError:
                return False
        route = self._routes.get(rec.id)
        if route is None or route[0] is not rec or rt.addresses.get(route[4]) is not route[1]:
            route = self._route(rec)
            if route is None:
                return False
        key = route[2]
        if rt.circuits.is_open(key[0]):
            return False
        if block is None:
            block = self._node_block(headers)
            if block is None:
                return False
        conn = self.pool.idle(key)
        if conn is None:
            return False
        flight: _Flight
        if reply is not None:
            body = reply.whole_body() or b""
            flight = _Flight(self, reply, rec, key, path, bool(body))
        else:
            flight = _RawFlight(self, edge, rec, key, path, bool(body))  # type: ignore[arg-type]
        rt.activity.begin(rec.id, rec.manager_id)  # ended when the flight lands or hands off
        if body:
            metrics.DEFERRED.inc(metrics.PROXY_BYTES_IN, len(body))
        self.pool.send(conn, b"".join((method.encode(), b" ", target, route[3], block, b"\r\n", body)), flight,
                       self._timeouts.get(path, self._default_timeout))
        return True

    def _route(self, rec: NodeRecord) -> tuple[NodeRecord, Any, tuple[str, int], bytes, str] | None:
        """What start() needs of a node it may reach straight (target() without an await): its
        address as the engine (or its owner) confirmed it, and its secret; None otherwise."""
        rt = self.rt
        if rec.manager_id != rt.manager_id and rt.cfg.cluster.proxy_through_owner.get(rec.manager_id):
            return None
        confirmed = rt.addresses.get(rec.cid) if rec.cid else None
        if confirmed is None or confirmed != (rec.id, (rec.host, rec.port)):
            return None
        host_line = b" HTTP/1.1\r\nhost: %s:%d\r\n%s: %s\r\n" % (
            rec.host.encode(), rec.port, _SECRET, rt.store.secrets.of(rec).encode())
        if len(self._routes) > 100_000:
            self._routes.clear()
        route = self._routes[rec.id] = (rec, confirmed, (rec.host, rec.port), host_line, rec.cid)
        return route

    def failed(self, rec: NodeRecord, host: str, port: int, exc: UpstreamError, path: str,
               timeout: float | None) -> ManagerError:
        """What a failed exchange with the node is answered (its circuit told when its host is lost)."""
        # a local node's address is a container's, not a host's: only another host's loss counts
        if isinstance(exc, HostLost) and rec.manager_id != self.rt.manager_id:
            self.rt.circuits.failure(host, port, rec.manager_id, str(exc))
        err = upstream_error(exc, timeout)
        self._count(path, err.status_code)
        return err

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
        except HostUnreachable as exc:
            self._count(path, exc.status_code)
            raise exc from None
        except UpstreamError as exc:
            raise self.failed(rec, host, port, exc, path, timeout) from None
        if rt.circuits.is_open(host):
            rt.circuits.success(host)  # the half-open probe went through
        return result

    def _observe(self, path: str, t0: float, status: int) -> None:
        hist = self._histograms.get(path)
        if hist is None:
            hist = self._histograms[path] = metrics.PROXY_SECONDS.labels(path)
        if metrics.MULTIPROCESS:  # another worker's /metrics sums this one's files: counted at once
            hist.observe(time.perf_counter() - t0)
        else:
            metrics.DEFERRED.observe(hist, time.perf_counter() - t0)
        self._count(path, status)

    def _answered(self, path: str, t0: float, status: int, sent: int) -> None:
        """_observe, and the answer's bytes counted (PROXY_BYTES_OUT)."""
        if metrics.MULTIPROCESS:
            self._observe(path, t0, status)
            if sent:
                metrics.DEFERRED.inc(metrics.PROXY_BYTES_OUT, sent)
            return
        hist = self._histograms.get(path)
        if hist is None:
            hist = self._histograms[path] = metrics.PROXY_SECONDS.labels(path)
        key = (path, status // 100)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = metrics.PROXY_REQUESTS.labels(path, metrics.status_class(status))
        metrics.DEFERRED.answered(hist, time.perf_counter() - t0, child, metrics.PROXY_BYTES_OUT, sent)

    def _count(self, path: str, code: int) -> None:
        key = (path, code // 100)
        child = self._counters.get(key)
        if child is None:
            child = self._counters[key] = metrics.PROXY_REQUESTS.labels(path, metrics.status_class(code))
        if metrics.MULTIPROCESS:
            child.inc()
        else:
            metrics.DEFERRED.inc(child)  # in plain ints, into the counter before /metrics renders

    def close(self) -> None:
        self.pool.close()


_PLAIN = (b"keep-alive", b"close")
_RUNNING = NodeStatus.RUNNING


class _Flight:
    """A request start() sent: its node's answer by callbacks (manager/proxy/upstream.py Flight).
    A small answer of known length goes out by the edge's reply once whole, as reply_small sends
    it; any other is handed to a task as forward()'s NodeAnswer; a failure answered as forward()'s."""

    __slots__ = ("has_body", "key", "path", "proxy", "rec", "reply", "t0")

    def __init__(self, proxy: Proxy, reply: Reply | None, rec: NodeRecord, key: tuple[str, int],
                 path: str, has_body: bool) -> None:
        self.proxy = proxy
        self.reply = reply
        self.rec = rec
        self.key = key
        self.path = path
        self.has_body = has_body
        self.t0 = time.perf_counter()

    def _reply(self) -> Reply:
        return self.reply  # type: ignore[return-value]

    def head(self, conn: Any) -> None:
        length: int | None = 0
        if conn.known is not None:
            length = conn.known.length  # (a remembered head's one Content-Length, found when it was parsed)
        elif conn.status not in (204, 304):  # (no body whatever the headers say: Response's rule)
            length = None
            for k, v in conn.headers:
                if k == b"content-length":
                    length = int(v) if v.isdigit() else None
                    break
        limit = conn.limits.read_bytes
        if length is not None and length <= SMALL_BODY and not (limit and length > limit):
            return  # taken whole when it has all come (landed)
        conn.hand_off()
        up = UpstreamResponse(conn, conn.timeout, False)
        proxy = self.proxy
        proxy._observe(self.path, self.t0, up.status_code)
        answer = NodeAnswer(up, proxy.rt, self.rec.id, proxy.rules)
        reply = self._reply()

        async def stream(scope: Scope, receive: Receive, send: Send) -> None:
            if not await answer.reply_small(scope, reply):
                await answer(scope, receive, send)

        reply.hand_off(stream)

    def landed(self, conn: Any) -> None:
        proxy, rec = self.proxy, self.rec
        error = conn.error
        if error is not None and not conn.complete:  # (bytes after a whole answer: it stands, as read() gives it)
            conn.abort()
            proxy.rt.activity.end(rec.id)
            reply = self._reply()
            if conn.status:
                # the node dropped the connection mid-body: cut short, as reply_small's
                proxy._observe(self.path, self.t0, conn.status)
                reply.cut(conn.status, proxy.rules.from_node(conn.headers, HOP_BY_HOP))
                return
            if not conn.got_bytes and not self.has_body and not isinstance(error, (HostLost, UpstreamTimeout)):
                # a kept-alive connection the node had just closed: forward() goes again, as the
                # pool's request() retries one (nothing of the request was consumed)
                reply.retry()
                return
            err = proxy.failed(rec, self.key[0], self.key[1], error, self.path,
                               proxy._timeouts.get(self.path, proxy._default_timeout))
            reply.hand_off(_error_app(err))
            return
        status, headers = conn.status, conn.headers
        body = b"".join(conn.chunks) if len(conn.chunks) != 1 else conn.chunks[0]
        conn.chunks.clear()
        conn.buffered = 0
        if conn.reusable():
            proxy.pool._put(conn)
        else:
            conn.abort()
        proxy.rt.activity.end(rec.id)
        proxy._answered(self.path, self.t0, status, len(body))
        known = conn.known
        if known is None:
            self._deliver(status, proxy.rules.from_node(headers, HOP_BY_HOP), body, b"")
            return
        client = known.client
        if client is None:  # a remembered head's headers as the client gets them: made once
            client = known.client = proxy.rules.from_node(headers, HOP_BY_HOP)
            known.block = b"".join([k + b": " + v + b"\r\n" for k, v in client])
        self._deliver(status, client, body, known.block)

    def _deliver(self, status: int, raw: list[tuple[bytes, bytes]], body: bytes, block: bytes) -> None:
        """The node's whole small answer to the client (block: raw as head lines, when known)."""
        reply = self._reply()
        if not reply.write_paused:
            try:
                reply.send_now(status, raw, body)
                return
            except RuntimeError as exc:  # a header uvicorn would refuse: its task answers 500
                reply.hand_off(_raising(exc))
                return

        async def later(scope: Scope, receive: Receive, send: Send) -> None:
            await reply(status, raw, body)  # after the client has read what it was sent before

        reply.hand_off(later)


class RawEdge(Protocol):
    """The edge's side of a request it parsed itself (manager/edge/protocol.py EdgeHttpProtocol)."""

    def raw_answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, block: bytes = b"") -> bool:
        ...

    def raw_reply(self) -> Reply: ...


class _RawFlight(_Flight):
    """A request of the edge's raw path: a small whole answer is written by the edge itself
    (raw_answer: no scope, cycle or ASGI message); for anything else (a streamed answer, a failure,
    a retry, a client not reading, a header uvicorn would refuse) the edge makes the request's
    uvicorn cycle then (raw_reply) and it goes on as start()'s."""

    __slots__ = ("edge",)

    def __init__(self, proxy: Proxy, edge: RawEdge, rec: NodeRecord, key: tuple[str, int], path: str,
                 has_body: bool) -> None:
        super().__init__(proxy, None, rec, key, path, has_body)
        self.edge = edge

    def _reply(self) -> Reply:
        if self.reply is None:
            self.reply = self.edge.raw_reply()
        return self.reply

    def _deliver(self, status: int, raw: list[tuple[bytes, bytes]], body: bytes, block: bytes) -> None:
        # the node's headers came through httptools, which refuses what uvicorn would; the proxy's
        # own added ones were checked once (HeaderRules.added_valid)
        if self.reply is None and self.proxy.rules.added_valid and self.edge.raw_answer(status, raw, body, block):
            return
        super()._deliver(status, raw, body, block)


def _error_app(err: ManagerError) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        response = await errors_http.handle(Request(scope, receive), err)
        await response(scope, receive, send)

    return app


def _raising(exc: Exception) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise exc

    return app


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
            # the node dropped the connection mid-body: the client sees the answer cut short (its
            # head, then the close), as the ASGI path leaves a response begun and not completed. A
            # proxy in front (another replica, cluster.proxy_through_owner) passes that on; with
            # nothing sent it would take the answer for never given, retry and answer 503
            reply.cut(self.status_code, self.raw_headers)
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
