"""The manager's HTTP/1.1 server protocol: uvicorn's httptools protocol with what one client
connection may hold bounded: the request head in size and time, the body in time, and how many
connections the replica and one client address hold at once.

uvicorn's httptools parser buffers a request head whole before anything can refuse it
(``h11_max_incomplete_event_size`` applies to h11 only) and times out idle keep-alive
connections but not a head arriving a byte at a time. Like nginx's
``large_client_header_buffers``, ``client_header_timeout`` and ``client_body_timeout``, this
counts head bytes as they arrive and answers 431 past the limit, 408 when a head is not complete
in time or a body stops arriving; either way the connection is closed at once. A connection
past ``proxy.max_client_connections`` (or ``max_connections_per_address`` from one address) is
answered 503 and closed as it opens, so held connections can never use up the file descriptors
that /alive and every other client need. An upgrade other than WebSocket (``h2c``) is never
taken: a request without a body is answered over HTTP/1.1 and the connection closed after it,
one with a body refused with 400 (the parser stops at the upgrade: its body would never come).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
from collections.abc import Iterable
from typing import Any

import httptools
import msgspec
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from manager.edge.responses import REPLICA_HEADER
from nodeops.forward import VIA_HEADER

ABORT_EXTENSION = "tsm.abort"  # in a WebSocket's scope: {"abort": drop the client's connection now}
# in an HTTP request's scope: {"cork": hold the response head back until the body's first write}
CORK_EXTENSION = "tsm.cork"
_replica = b""  # "x-tsm-replica: <id>\r\n" once the app knows its replica id (each worker its own)
_replica_pair = (REPLICA_HEADER.encode(), b"")
BODY_IN_WHOLE = 65536  # a proxied request's body up to this (uvicorn's read buffer) is waited for whole
# what the raw path takes, by the request's first bytes (HEAD: the cycle's way)
_RAW_METHODS = {b"GET ": "GET", b"POST ": "POST"}
# headers that change what the edge does with a request (framing, 100-continue, an upgrade, a hop
# through another replica): such a request goes httptools' way
_RAW_NOT = frozenset({b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer", VIA_HEADER.encode(),
                      b"connection"})  # (but connection: keep-alive)


def set_replica(replica_id: str) -> None:
    """The replica named on answers given here, before or without the app (as on every other)."""
    global _replica, _replica_pair
    _replica = REPLICA_HEADER.encode() + b": " + replica_id.encode() + b"\r\n"
    _replica_pair = (REPLICA_HEADER.encode(), replica_id.encode())


_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large",
            503: b"Service Unavailable"}


class Limits:
    """The connection bounds of one server process (0: unbounded)."""

    def __init__(self, header_timeout: float = 15.0, body_timeout: float = 60.0, max_connections: int = 0,
                 max_per_address: int = 0, exempt: Iterable[str] = ()) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        # balancers (quota.trusted_proxies): one address carrying many clients, under the replica's cap only
        self.exempt = [ipaddress.ip_network(c, strict=False) for c in exempt]
        self._exempt_seen: dict[str, bool] = {}
        self.by_address: collections.Counter[str] = collections.Counter()

    def capped(self, address: str) -> bool:
        """Whether connections from this address count against max_per_address."""
        if not self.max_per_address:
            return False
        if not self.exempt:
            return True
        known = self._exempt_seen.get(address)
        if known is None:
            try:
                ip = ipaddress.ip_address(address)
                known = any(ip in net for net in self.exempt)
            except ValueError:
                known = False
            if len(self._exempt_seen) > 4096:
                self._exempt_seen.clear()
            self._exempt_seen[address] = known
        return not known


class _Cork:
    """The connection's transport as a response sees it. After cork(), the next write (the head) is
    held and goes out with the write after it (the body) as one: one system call and one segment
    instead of two, as nginx's writev. Only for a body that follows at once (the proxy's small
    answers); a held head also goes out at close, and when the response completes without a body."""

    __slots__ = ("_armed", "_held", "_t")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._t = transport
        self._armed = False
        self._held: bytes | None = None

    def cork(self) -> None:
        self._armed = True

    def write(self, data: bytes) -> None:
        if self._armed:
            self._armed = False
            self._held = data
            return
        if self._held is not None:
            data, self._held = self._held + data, None
        self._t.write(data)

    def flush(self) -> None:
        self._armed = False
        if self._held is not None:
            held, self._held = self._held, None
            self._t.write(held)

    def close(self) -> None:
        self.flush()
        self._t.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class _Direct:
    """A whole response written by the edge itself, head and body in one write: what the ASGI
    messages of RequestResponseCycle.send do for such an answer (default headers, the replica's,
    connection: close when the connection ends, header checks, completion), without the messages,
    their per-header pass and the app's wrappers. The proxy's small answers use it
    (manager/entry.py: ManagerApp.direct).

    A request the app takes by callbacks (ManagerApp.fast) has no task until it needs one:
    hand_off(app) runs an ASGI app in the cycle then (a streamed answer, an error's), retry() the
    direct handler from the start."""

    __slots__ = ("_cycle", "_handler", "_start")

    def __init__(self, cycle: RequestResponseCycle, start: Any = None, handler: Any = None) -> None:
        self._cycle = cycle
        self._start = start  # the protocol's task start (uvicorn's _start_asgi_task)
        self._handler = handler  # the app's direct handler, for retry()

    @property
    def write_paused(self) -> bool:
        """The client is not reading: an answer must wait for its drain (__call__ does)."""
        return self._cycle.flow.write_paused and not self._cycle.disconnected

    async def __call__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        cycle = self._cycle
        if cycle.flow.write_paused and not cycle.disconnected:
            await cycle.flow.drain()  # a client that does not read gets no more than uvicorn would
        self.send_now(status, headers, body)

    def send_now(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """__call__ without the wait for a client that does not read (see write_paused)."""
        cycle = self._cycle
        if cycle.disconnected:
            return
        if cycle.response_started:
            raise RuntimeError("a direct reply after the response started")
        # one search over all names and one over all values, the checks uvicorn makes header by header
        # (its own default headers need none)
        if HEADER_RE.search(b"".join([k for k, _ in headers])) or \
                HEADER_VALUE_RE.search(b"".join([v for _, v in headers])):
            raise RuntimeError("Invalid HTTP header name or value.")
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        out = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status]
        for k, v in cycle.default_headers:
            out += (k, b": ", v, b"\r\n")
        for k, v in headers:
            out += (k, b": ", v, b"\r\n")
        out.append(_replica)
        if not cycle.keep_alive:
            out.append(b"connection: close\r\n")
        out += (b"\r\n", body)
        cycle.transport.write(b"".join(out))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            cycle.transport.close()
        cycle.on_response()

    def whole_body(self) -> bytes | None:
        """The request's body when all of it is here (then taken: receive() gives it no more, as
        after reading it), else None: it is read from receive() as it arrives."""
        cycle = self._cycle
        if cycle.more_body or cycle.disconnected or cycle.waiting_for_100_continue:
            return None  # (receive() answers 100 Continue first: the client may wait for it)
        body = bytes(cycle.body)
        cycle.body = bytearray()
        return body

    def abort(self) -> None:
        """Nothing will be answered: the connection is closed, and the cycle sends no 500 after."""
        cycle = self._cycle
        cycle.disconnected = True
        cycle.message_event.set()
        cycle.transport.close()

    def cut(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """An answer the node dropped half-way: its head alone, then the connection closed, so the
        client sees it cut short (as a streamed answer is, and nginx's); a head uvicorn would refuse
        is not sent at all."""
        self._cycle.keep_alive = False
        try:
            self.send_now(status, headers, b"")
        except RuntimeError:
            self.abort()

    def hand_off(self, app: Any) -> None:
        """The rest of a request taken by callbacks goes to an ASGI app, run in the cycle's task as
        any other (its answer stamped with the replica, a crash answered 500)."""
        replica = _replica_pair

        async def run(scope: Any, receive: Any, send: Any) -> None:
            async def stamped(message: Any) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", ()), replica]
                await send(message)

            await app(scope, receive, stamped)

        self._start(self._cycle, run)

    def retry(self) -> None:
        """A request taken by callbacks that can go again from the start goes by the direct handler."""
        handler, reply = self._handler, self

        def app(scope: Any, receive: Any, send: Any) -> Any:
            return handler(scope, receive, send, reply)

        self._start(self._cycle, app)


class RawHead:
    """A raw request's head as parsed (the request line's parts and its headers), remembered by its
    bytes: a keep-alive client sends the same head with every request (wrk's, XAgent's for one tool),
    and what a parse, the app's checks and the node's header block make of it are pure functions of
    those bytes and the process's fixed config. Never changed once made; a layer above keeps what it
    derives from it in its slots (the app its checks and session, the proxy the node's header block),
    so that a known head is one dict lookup instead of a parse and three passes over its headers."""

    __slots__ = ("app_ok", "body_len", "headers", "method", "node_block", "node_id", "node_known", "path", "qs",
                 "raw_path", "target")

    def __init__(self, method: str, raw_path: bytes, path: str, headers: list[tuple[bytes, bytes]], qs: bytes,
                 body_len: int) -> None:
        self.method = method
        self.raw_path = raw_path
        self.path = path
        self.headers = headers  # (read only: a cycle made for it gets a copy)
        self.qs = qs
        self.target = raw_path + b"?" + qs if qs else raw_path
        self.body_len = body_len  # its Content-Length (0 without one): a known head's body is exactly this
        self.app_ok: bool | None = None  # ManagerApp.raw's checks of it, once made
        self.node_id: str | None = None  # the session its cookie names (with app_ok)
        # the proxy's: its header lines as the node is sent them (None: not taken straight), once known
        self.node_block: bytes | None = None
        self.node_known = False


# heads remembered per app, and the longest (a client's own make hundreds of bytes): a client sending
# a new head each time costs at most ~4 MiB of keys, and a new one past the count starts afresh
RAW_HEADS_MAX = 2048
RAW_HEAD_BYTES_MAX = 2048


class _RawParse:
    """The raw path's own parser of a whole request, with the callbacks uvicorn's makes (names
    lowered, values without trailing blanks), and no scope."""

    __slots__ = ("begun", "body", "ended", "headers", "parser", "url")

    def __init__(self) -> None:
        self.begun = self.ended = 0
        self.url = self.body = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.parser = httptools.HttpRequestParser(self)

    def on_message_begin(self) -> None:
        self.begun += 1

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value.rstrip(b" \t")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.ended += 1


class EdgeHttpProtocol(HttpToolsProtocol):
    """One client connection; the head limit is uvicorn's h11_max_incomplete_event_size."""

    def __init__(self, config: Any, server_state: Any, app_state: Any, _loop: Any = None,
                 limits: Limits | None = None) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self._limits = limits or Limits()
        self._head_limit = config.h11_max_incomplete_event_size or 65536
        self._head_timeout = self._limits.header_timeout
        self._in_head = True
        self._head_bytes = 0
        self._tail = b""
        self._head_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_seen = 0.0
        self._refused = False
        self._bad_upgrade = False
        self._address: str | None = None
        self._cork: _Cork | None = None
        self._waiting: tuple[RequestResponseCycle, Any, _Direct] | None = None  # for its whole body
        # the raw path (_raw): the app that takes requests parsed here, the request in flight (method,
        # target, path, headers, body), bytes that came meanwhile, and what its answers need
        self._raw_app: Any = None
        self._rp: _RawParse | None = None
        self._raw_req: RawHead | None = None
        self._raw_heads: dict[bytes, RawHead] = {}  # the app's memory of heads (RawHead), once known
        self._held = b""
        self._held_paused = False
        self._clean = True  # no request partly parsed by httptools
        self._raw_seen = 0.0  # when the last raw answer went out (the keep-alive check's idle time)
        self._ka_mine = False  # the keep-alive timer is _raw_keepalive, not uvicorn's
        self._raw_close = False  # shutting down: close once the request in flight is answered
        self._dh_of: Any = None
        self._dh = b""  # server_state.default_headers (the date) as head lines

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._cork = _Cork(transport)
        lim = self._limits
        address = self.client[0] if self.client else ""
        if lim.max_connections and len(self.connections) > lim.max_connections:
            self._refuse(503, f"this replica holds its maximum of {lim.max_connections} connections "
                              "(proxy.max_client_connections); retry shortly")
            return
        capped = lim.capped(address)
        if capped and lim.by_address[address] >= lim.max_per_address:
            self._refuse(503, f"{lim.max_per_address} connections from your address are open "
                              "(proxy.max_connections_per_address); reuse them or retry shortly")
            return
        if capped:
            self._address = address
            lim.by_address[address] += 1
        self._arm()
        app = self.app
        # (an access log, a root path or a concurrency limit are the cycle's: the raw path has none)
        if getattr(app, "raw", None) is not None and not self.root_path and self.limit_concurrency is None \
                and not self.access_log and not (self.server and self.server[1] == app.console_port):
            self._raw_app = app
            self._raw_heads = app.raw_heads

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._disarm_body()
        self._release_address()
        super().connection_lost(exc)

    def _release_address(self) -> None:
        if self._address is not None:
            by = self._limits.by_address
            by[self._address] -= 1
            if by[self._address] <= 0:
                del by[self._address]
            self._address = None

    def handle_websocket_upgrade(self) -> None:
        self._disarm_body()
        super().handle_websocket_upgrade()
        ws = self.transport.get_protocol()
        scope = getattr(ws, "scope", None)
        if isinstance(scope, dict):
            # a socket closed for not reading keeps what it was sent in its buffer until the client
            # reads: the proxy can drop it instead (ASGI has no word for that)
            scope.setdefault("extensions", {})[ABORT_EXTENSION] = {"abort": self.transport.abort}
        # the socket now belongs to the WebSocket protocol: it gives the address's slot back
        if self._address is not None:
            lost = ws.connection_lost

            def connection_lost(exc: Exception | None, _release: Any = self._release_address) -> None:
                _release()
                lost(exc)

            ws.connection_lost = connection_lost  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:
        if self._raw_req is not None or self._held:
            self._hold(data)  # after the request in flight is answered
            return
        if self._raw_app is not None and self._in_head and self._clean and self._waiting is None \
                and not self.pipeline and (self.cycle is None or self.cycle.response_complete) \
                and not self.flow.write_paused and self._raw(data):
            return
        self._read(data)
        waiting = self._waiting
        if waiting is not None and waiting[0].more_body:
            # a body not all here with its head (or a read before) is streamed to the node as it
            # comes, by the task's path: never held back from it
            self._waiting = None
            if not waiting[0].disconnected:
                waiting[2].retry()

    def _raw(self, data: bytes) -> bool:
        """The raw path: a read that is exactly one whole request (GET or POST, HTTP/1.1, no escape in
        its path, no framing of its own, 100-continue or upgrade), on a connection with nothing else under
        way, is parsed by a parser of its own (httptools too, so read exactly as the cycle's would)
        and sent to its node by the app (ManagerApp.raw) with no scope, cycle or timer; answered by
        raw_answer, or through the cycle raw_reply makes when the answer needs one. False, with
        nothing done: the request goes httptools' way as before."""
        if len(data) > self._head_limit:
            return False  # (the cycle's way counts its head and refuses one too large)
        at = data.find(b"\r\n\r\n") + 4
        if at > 4:
            known = self._raw_heads.get(data[:at])
            # a head seen before, with exactly its body: what the parse below made of it then
            if known is not None and len(data) - at == known.body_len:
                return self._raw_go(known, data[at:] if known.body_len else b"")
        method = _RAW_METHODS.get(data[:4]) or _RAW_METHODS.get(data[:5])
        if method is None:
            return False
        rp = self._rp
        if rp is None:
            rp = self._rp = _RawParse()
        rp.begun = rp.ended = 0
        rp.url = rp.body = b""
        headers = rp.headers = []
        parser = rp.parser
        try:
            parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._rp = None  # (its state is the failure's: a new one next time)
            return False
        if rp.begun != 1 or rp.ended != 1:
            if rp.begun != rp.ended:
                self._rp = None  # stopped within a request
            return False
        target = rp.url
        raw_path, _, qs = target.partition(b"?")  # (what httptools.parse_url makes of such a target)
        line = len(method) + 1 + len(target)  # the request line as parsed: "METHOD target HTTP/1.1"
        if data[line:line + 11] != b" HTTP/1.1\r\n" or target[:1] != b"/" or target[:2] == b"//" \
                or b"%" in raw_path or b"#" in target:
            return False
        for k, v in headers:
            if k in _RAW_NOT and (k != b"connection" or v.lower() != b"keep-alive"):
                return False  # (connection: close, or naming headers to drop)
        body = rp.body
        if len(body) > BODY_IN_WHOLE:
            return False
        try:
            path = raw_path.decode("ascii")
        except UnicodeDecodeError:
            return False
        head = RawHead(method, raw_path, path, headers, qs, len(body))
        # remembered only where the parse's head ended at the first blank line, as a lookup finds it
        # (were bare LFs ever parsed, such a head could end before a CRLF pair inside the body)
        if at == len(data) - len(body) and at <= RAW_HEAD_BYTES_MAX:
            if len(self._raw_heads) >= RAW_HEADS_MAX:
                self._raw_heads.clear()
            self._raw_heads[data[:at]] = head
        return self._raw_go(head, body)

    def _raw_go(self, head: RawHead, body: bytes) -> bool:
        self._raw_req = head
        if not self._raw_app.raw(self, head, body):
            self._raw_req = None
            return False
        if self._head_timer is not None:
            self._disarm()
        if self.timeout_keep_alive_task is not None and not self._ka_mine:
            self._unset_keepalive_if_required()  # uvicorn's would close the connection under the request
        return True

    def raw_answer(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, block: bytes = b"") -> bool:
        """The raw request's whole answer in one write, as _Direct.send_now writes it; False, with
        nothing done, when it needs the cycle's way (a client not reading). The caller vouches for the
        headers: what send_now checks (uvicorn's HEADER_RE, HEADER_VALUE_RE) they pass, as any that
        httptools parsed do (tests/unit/test_raw_path.py holds httptools to that)."""
        transport = self.transport
        if self._raw_req is None:
            return False
        if transport.is_closing():
            self._raw_done()  # the client left: nobody to answer
            return True
        if self.flow.write_paused:
            return False
        dh = self.server_state.default_headers
        if dh is not self._dh_of:  # a new list each second (the date)
            self._dh_of, self._dh = dh, b"".join([k + b": " + v + b"\r\n" for k, v in dh])
        out = [STATUS_LINE.get(status) or b"HTTP/1.1 %d \r\n" % status, self._dh]
        if block:  # headers' lines, made once for a remembered head (manager/proxy/upstream.py KnownHead)
            out.append(block)
        else:
            for k, v in headers:
                out += (k, b": ", v, b"\r\n")
        out.append(_replica)
        if self._raw_close:
            out.append(b"connection: close\r\n")
        out += (b"\r\n", body)
        transport.write(b"".join(out))
        self._raw_done()
        return True

    def _raw_done(self) -> None:
        self._raw_req = None
        self.server_state.total_requests += 1
        if self._raw_close:
            self.transport.close()
            return
        self._raw_seen = self.loop.time()
        if self.timeout_keep_alive_task is None:
            # one timer per connection, not one per request: re-armed for what is left when it fires
            self._ka_mine = True
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self._raw_keepalive)
        if self._held:
            self.loop.call_soon(self._release_held)

    def _raw_keepalive(self) -> None:
        self.timeout_keep_alive_task = None
        self._ka_mine = False
        if self.transport.is_closing():
            return
        # a raw request in flight, or one raw_reply handed to a cycle still answering (its end arms
        # uvicorn's timer): counted from the raw request before, that answer was cut mid-stream
        busy = self._raw_req is not None or (self.cycle is not None and not self.cycle.response_complete)
        idle = 0.0 if busy else self.loop.time() - self._raw_seen
        if idle < self.timeout_keep_alive:
            self._ka_mine = True
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive - idle, self._raw_keepalive)
            return
        self.timeout_keep_alive_handler()

    def _hold(self, data: bytes) -> None:
        self._held += data
        if len(self._held) > BODY_IN_WHOLE and not self._held_paused:
            self._held_paused = True
            self.transport.pause_reading()

    def _release_held(self) -> None:
        """What came while a raw request was in flight, read now in order (the next request)."""
        data, self._held = self._held, b""
        if self._held_paused:
            self._held_paused = False
            self.transport.resume_reading()
        if data and not self.transport.is_closing():
            self.data_received(data)

    def raw_reply(self) -> _Direct:
        """The raw request's cycle, made as uvicorn makes it, and the direct reply through it: for an
        answer the raw path does not write (streamed, failed, retried, to a client not reading)."""
        assert self._raw_req is not None
        head = self._raw_req
        self._raw_req = None
        headers = list(head.headers)  # (the app may change its scope's; the remembered head stays)
        scope: Any = {
            "type": "http", "asgi": {"version": self.asgi_version, "spec_version": "2.3"}, "http_version": "1.1",
            "server": self.server, "client": self.client, "scheme": self.scheme, "root_path": self.root_path,
            "headers": headers, "state": self.app_state.copy(), "method": head.method, "path": head.path,
            "raw_path": head.raw_path, "query_string": head.qs}
        cork = self._cork
        if cork is not None:
            scope["extensions"] = {CORK_EXTENSION: {"cork": cork.cork}}
        self.scope, self.headers = scope, headers
        cycle = RequestResponseCycle(
            scope=scope, transport=cork or self.transport, flow=self.flow, logger=self.logger,  # type: ignore[arg-type]
            access_logger=self.access_logger, access_log=self.access_log,
            default_headers=self.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=False, keep_alive=not self._raw_close, on_response=self.on_response_complete)
        cycle.more_body = False  # its body went to the node with its head
        if self.transport.is_closing():
            cycle.disconnected = True
        self.cycle = cycle
        reply = _Direct(cycle, super()._start_asgi_task, self._raw_app.direct(scope))
        # what came meanwhile is parsed now, queued behind this cycle as any pipelined request
        data, self._held = self._held, b""
        if self._held_paused:
            self._held_paused = False
            self.transport.resume_reading()
        if data and not self.transport.is_closing():
            self._read(data)
        return reply

    def shutdown(self) -> None:
        if self._raw_req is not None:
            self._raw_close = True  # answered first, then closed
            return
        super().shutdown()

    def on_message_begin(self) -> None:
        self._clean = False
        super().on_message_begin()

    def _read(self, data: bytes) -> None:
        if self._refused:
            return
        if self._in_head:
            if self._head_timer is None:
                self._arm()  # the first byte of a kept-alive connection's next request
            if self._head_bytes + len(data) <= self._head_limit:
                # within the bound even if every byte were head: counted whole, no search for the
                # head's end (the count is reset once the head is parsed, whatever followed it)
                self._head_bytes += len(data)
                self._tail = data[-3:] if len(data) >= 3 else (self._tail + data)[-3:]
                super().data_received(data)
                return
            seen = self._tail + data
            crlf, lf = seen.find(b"\r\n\r\n"), seen.find(b"\n\n")
            ends = [i + n for i, n in ((crlf, 4), (lf, 2)) if i >= 0]
            # count only head bytes: what follows the blank line is body or the next request
            self._head_bytes += len(data) if not ends else max(0, min(ends) - len(self._tail))
            if self._head_bytes > self._head_limit:
                self._refuse(431, f"request head too large (over {self._head_limit} bytes)")
                return
            self._tail = seen[-3:]
        elif self._body_timer is not None:
            self._body_seen = self.loop.time()
        super().data_received(data)

    def _unsupported_upgrade_warning(self) -> None:
        # the parser stops at an upgrade (h2c): whatever follows the head is the other protocol's.
        # A request without a body is answered over HTTP/1.1, then the connection closed; one with
        # a body was never started (on_headers_complete): its body would never arrive
        if self._bad_upgrade:
            self._refuse(400, "upgrade to anything but websocket is not supported on a request with a "
                              "body: send it without an Upgrade header")
            return
        if self.cycle is not None:
            self.cycle.keep_alive = False  # nothing more can be parsed on this connection
        self.transport.pause_reading()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        self._tail = b""
        self._disarm()
        if self.parser.should_upgrade() and not self._should_upgrade() and _has_body(self.headers):
            self._bad_upgrade = True  # refused once the parser stops at the upgrade (above)
            return
        cork = self._cork
        if cork is not None:
            cork.flush()  # nothing held may wait for another request's answer
            self.scope.setdefault("extensions", {})[CORK_EXTENSION] = {"cork": cork.cork}  # type: ignore[typeddict-item]
        super().on_headers_complete()
        if cork is not None and self.cycle is not None:
            self.cycle.transport = cork  # type: ignore[assignment]
        if self._limits.body_timeout and self.cycle is not None and self.cycle.more_body and _has_body(self.headers):
            self._body_seen = self.loop.time()
            self._body_timer = self.loop.call_later(self._limits.body_timeout, self._body_check)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # a request the app can answer without its ASGI stack (a proxied route) runs its direct
        # handler in the same cycle: uvicorn's reading, body, keep-alive and 500 on a crash alike
        direct = getattr(app, "direct", None)
        handler = direct(cycle.scope) if direct is not None else None
        if handler is not None:
            start = super()._start_asgi_task
            reply = _Direct(cycle, start, handler)
            fast = getattr(app, "fast", None)
            # one the app may take by callbacks, with no task at all (ManagerApp.fast), when its body
            # is all here by the end of the read that brought its head: a small one of known length,
            # no 100-continue to answer first
            if fast is not None and not cycle.waiting_for_100_continue and cycle.scope["method"] != "HEAD" \
                    and 0 <= _body_length(cycle.scope["headers"]) <= BODY_IN_WHOLE:
                self._waiting = (cycle, fast, reply)
                if not cycle.more_body:
                    self._take_off()
                return

            def app(scope: Any, receive: Any, send: Any) -> Any:
                return handler(scope, receive, send, reply)

        super()._start_asgi_task(cycle, app)

    def _take_off(self) -> None:
        """The waiting request's body is whole: the app takes it by callbacks, or a task does."""
        waiting, self._waiting = self._waiting, None
        if waiting is None:
            return
        cycle, fast, reply = waiting
        if cycle.disconnected or cycle.response_complete:
            return  # the client left (or the edge answered) while its body came: nobody to proxy for
        try:
            taken = fast(cycle.scope, reply)
        except Exception:  # never a crash here: the task's path answers whatever it is
            self.logger.exception("fast path failed before sending; the request goes the task's way")
            taken = False
        if not taken:
            reply.retry()

    def on_message_complete(self) -> None:
        self._clean = True
        if self._bad_upgrade:
            return
        self._disarm_body()
        super().on_message_complete()
        self._in_head = True
        waiting = self._waiting
        if waiting is not None and waiting[0] is self.cycle and not self.cycle.more_body:
            self._take_off()

    def on_response_complete(self) -> None:
        if self._cork is not None:
            self._cork.flush()  # a response without a body write (HEAD) sends its head now
        super().on_response_complete()
        self._ka_mine = False  # (uvicorn's timer, if it armed one)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self._head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _disarm_body(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_check(self) -> None:
        """No body byte for body_timeout seconds while we were reading: the client is gone or
        trickling; time spent paused by our own flow control (the node reads slowly) never counts."""
        self._body_timer = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        idle = now - self._body_seen
        if self.flow.read_paused:
            self._body_seen = now
            idle = 0.0
        if idle < self._limits.body_timeout:
            self._body_timer = self.loop.call_later(self._limits.body_timeout - idle, self._body_check)
            return
        self._refuse(408, f"request body stalled for {self._limits.body_timeout:g} s (proxy.body_timeout_seconds)",
                     abandon=True)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._in_head and not self.transport.is_closing():
            self._refuse(408, f"request head not received within {self._head_timeout} s")

    def _refuse(self, status: int, detail: str, abandon: bool = False) -> None:
        """Answer and close; when a response is already under way, just close after it. abandon: the
        request's body will never be read whole (stalled, or behind an upgrade the parser stopped at):
        the app sees a disconnect, and a response under way is cut off, since it cannot end cleanly."""
        self._disarm()
        self._disarm_body()
        self._in_head = False
        self._refused = True
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not abandon:
                cycle.keep_alive = False
                self.transport.pause_reading()
                return
            if cycle.response_started:
                self.transport.abort()
                return
            # the app still waits for the body: it sees a disconnect, and its answer goes nowhere
            cycle.disconnected = True
            cycle.message_event.set()
        body = msgspec.json.encode({"detail": detail})
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"%sconnection: close\r\n\r\n%s" % (status, _REASONS[status], len(body),
                                                                  _replica, body))
        self.transport.close()


def _body_length(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """A request body's declared length (0 without one); -1 when chunked or unreadable."""
    for k, v in headers:
        if k == b"content-length":
            try:
                return int(v)
            except ValueError:
                return -1
        if k == b"transfer-encoding":
            return -1
    return 0


def _has_body(headers: list[tuple[bytes, bytes]]) -> bool:
    for k, v in headers:
        if k == b"content-length":
            return v.strip() not in (b"0", b"")
        if k == b"transfer-encoding":
            return True
    return False
