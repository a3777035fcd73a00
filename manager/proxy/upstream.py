"""A lean HTTP/1.1 client for the proxy's hot path: keep-alive connections per node,
httptools (C) parsing, bodies streamed both ways with flow control.

httpx spent most of a proxied request's time in its own layers (profiled at about 500
requests/s through the manager against 11,000 straight to the node); this does only
what a reverse proxy needs. httpx stays for everything else (probes, forwarding).

Framing rules, as nginx applies them to its upstreams: interim (1xx) responses are
absorbed; a connection goes back to the pool only when the whole request was written
and the whole response read to its framed end with nothing after it; any other ending
(early answer, reset, timeout, client gone, stray bytes) closes it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import socket
import time
import weakref
from collections.abc import AsyncIterator
from typing import Protocol

import httptools

from nodeops.circuit import host_unreachable_error
from shared import metrics

HIGH_WATER = 1 << 20  # pause reading the node when this much body waits for a slow client
IDLE_SECONDS = 3.0  # below the node's keep-alive, so a pooled connection is rarely stale


class UpstreamError(Exception):
    """The node could not be reached, dropped the connection or sent something unusable."""


class ConnectFailed(UpstreamError):
    """No connection could be opened: nothing was sent."""

    def __init__(self, detail: str, timed_out: bool = False) -> None:
        super().__init__(detail)
        # nothing answered at all: a host gone or cut off (a stopped container on a local bridge is
        # "no route to host" once ARP gives up, a closed port a refusal)
        self.timed_out = timed_out


class HostLost(UpstreamError):
    """The node's host stopped answering while a request was in flight (keep-alive probes went
    unanswered, or its circuit opened)."""


class UpstreamTimeout(UpstreamError):
    """The node did not answer within the read timeout."""


class ResponseTooLarge(UpstreamError):
    """The node's response went past a bound (head bytes, header count, a body read whole): the
    connection is dropped at once, whatever else the node meant to send."""


class Limits:
    """What a node's response may cost the manager; 0 means unbounded."""

    def __init__(self, head_bytes: int = 65536, header_count: int = 100, read_bytes: int = 16 << 20) -> None:
        self.head_bytes = head_bytes  # status line + headers, interim responses' each on their own
        self.header_count = header_count
        self.read_bytes = read_bytes  # a body the manager reads whole (Response.read)


def _keepalive(transport: asyncio.BaseTransport, idle: float) -> None:
    """A node connection notices a host that vanished (no reset, no answer) within idle + 3 s, not at
    the read timeout: keep-alive probes while it waits for an answer, and a bound on how long sent
    bytes may stay unacknowledged (a request written to a dead host retransmits for many minutes)."""
    sock = transport.get_extra_info("socket")
    if sock is None or idle <= 0:
        return
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, max(1, int(idle)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int((max(1, int(idle)) + 3) * 1000))


def _head_end(tail: bytes, data: bytes) -> int:
    """Bytes of data up to and including the blank line ending a head (tail: the 3 bytes before
    data), or -1; without copying data, since a first read often carries a whole body too."""
    if tail:
        joint = tail + data[:3]
        for sep in (b"\r\n\r\n", b"\n\n"):
            i = joint.find(sep)
            if i >= 0:
                return max(0, i + len(sep) - len(tail))
    ends = [i + n for i, n in ((data.find(b"\r\n\r\n"), 4), (data.find(b"\n\n"), 2)) if i >= 0]
    return min(ends) if ends else -1


class Flight(Protocol):
    """A request sent by UpstreamPool.send: told of its response by callbacks, not futures."""

    def head(self, conn: _Conn) -> None:
        """The final response's head is in (conn.status, conn.headers); conn.hand_off() and a
        Response(conn, ...) to take the rest as a stream."""

    def landed(self, conn: _Conn) -> None:
        """The whole response is in (conn.complete), or the exchange failed (conn.error)."""


class KnownHead:
    """A node's response head as parsed, remembered by its bytes (UpstreamPool.heads): a node answers
    one route with the same head (its date changes once a second), and what the parser makes of it
    is a pure function of those bytes. Only a final, kept-alive answer framed by one Content-Length
    is remembered; a first read that is such a head and no more than its body skips the parser, and
    the rest of the body is counted to that length as the parser would. Never changed once made; the
    proxy keeps what it derives from it (the client's headers) in its slots."""

    __slots__ = ("block", "client", "headers", "length", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], length: int) -> None:
        self.status = status
        self.headers = headers  # (read only: a parse makes a new list for the next response)
        self.length = length
        self.client: list[tuple[bytes, bytes]] | None = None  # the proxy's: the headers a client is sent
        self.block = b""  # the proxy's: those as head lines (with client)


# response heads remembered per pool, and the longest: a node sending a new head with each answer
# costs at most ~4 MiB of keys (and others a parse, as before: a lookup finds only what parsing finds)
KNOWN_HEADS_MAX = 2048
KNOWN_HEAD_BYTES_MAX = 2048


class _Stray(Exception):
    """Bytes after the framed end of a response: parsing stops there."""


class _Conn(asyncio.Protocol):
    def __init__(self, pool: UpstreamPool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.limits = pool.limits
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.in_use = False
        self.idle_since = 0.0
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpResponseParser(self)
        # the callback path's request in flight (UpstreamPool.send): told when the response is
        # whole or failed, instead of a task waiting on futures
        self.flight: Flight | None = None
        # the flight's read timeout: one timer per connection, not one per request; it is left armed
        # across requests and, when it fires, re-armed for the deadline of the flight then in the air
        self.timer: asyncio.TimerHandle | None = None
        self.deadline = 0.0
        self.timeout: float | None = None
        self.body_seen = False
        self.chunks: collections.deque[bytes] = collections.deque()
        self._reset()

    def _reset(self) -> None:
        """Ready for the next request. The parser goes on from where it stood: a connection is only
        reused after a response read to its framed end with nothing after it (reusable())."""
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        # head bytes counted as they arrive, before the parser sees them: httptools joins a header's
        # pieces by concatenation, quadratic in its size, so a huge head must never reach it whole
        self.in_head = True
        self.head_bytes = 0
        self.tail = b""
        # the final response's head: parsed (head_ok) or failed (head_exc); a future for a task to
        # wait on (head_done) only when one asks: the callback path needs none
        self.head_ok = False
        self.head_exc: BaseException | None = None
        self._head_fut: asyncio.Future[None] | None = None
        self.chunks.clear()  # (every reader takes what it reads out of it)
        self.buffered = 0
        self.interim = False
        self.complete = False
        self.request_sent = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused_reading = False
        self.got_bytes = False
        self.keep_alive = False
        self.heads = 0  # heads parsed for this request (interim ones too)
        self.rest = 0  # body bytes still to come after a remembered head (its Content-Length framing)
        self.known: KnownHead | None = None  # its final head, when remembered (UpstreamPool.heads)

    @property
    def head_done(self) -> asyncio.Future[None]:
        """Done once the final response's head is in (or the exchange failed before it)."""
        fut = self._head_fut
        if fut is None:
            fut = self._head_fut = self.loop.create_future()
            if self.head_ok:
                fut.set_result(None)
            elif self.head_exc is not None:
                fut.set_exception(self.head_exc)
                fut.exception()  # retrieved here; the caller re-raises it
        return fut

    def _head_over(self) -> bool:
        # (a task's wait may have ended the future itself: _expire)
        return self.head_ok or self.head_exc is not None or (self._head_fut is not None and self._head_fut.done())

    # --- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        _keepalive(transport, self.pool.keepalive_seconds)
        metrics.UPSTREAM_OPEN.inc()
        self.set_in_use(True)

    def data_received(self, data: bytes) -> None:
        if not self.in_use or self.complete:
            # bytes nobody asked for (idle in the pool, or after the framed end): whatever they
            # are, they must never become the next request's response
            self.abort()
            return
        if self.rest:  # a remembered head's body, still coming
            self._known_body(data)
            return
        first = not self.got_bytes
        if first and self.flight is not None:
            at = data.find(b"\r\n\r\n") + 4
            if at > 4:
                known = self.pool.heads.get(data[:at])
                # (a node's server often writes the head and the body apart: the body may come later)
                if known is not None and len(data) - at <= known.length:
                    self._known_answer(known, data[at:])
                    return
        self.got_bytes = True
        limit = self.limits.head_bytes
        if self.in_head and limit and self.head_bytes + len(data) <= limit:
            # within the bound even if every byte were head: counted whole, no search for the
            # head's end (whatever follows it is reset with the count once the head is parsed)
            self.head_bytes += len(data)
            self.tail = data[-3:] if len(data) >= 3 else (self.tail + data)[-3:]
        elif self.in_head and limit:
            end = _head_end(self.tail, data)
            # only head bytes count: what follows the blank line is body (or the final response
            # after an interim one, counted once the parser starts its head)
            self.head_bytes += len(data) if end < 0 else end
            if self.head_bytes > self.limits.head_bytes:
                self._fail(ResponseTooLarge(f"node response head over {self.limits.head_bytes} bytes "
                                            "(proxy.max_response_head_bytes)"), drop=True)
                return
            self.tail = data[-3:] if len(data) >= 3 else (self.tail + data)[-3:]
        try:
            self.parser.feed_data(data)
        except _Stray:
            self.abort()
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamError("node switched protocols on a plain request"))
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad response from node: {exc}"))
        if first and self.head_ok and self.heads == 1 and self.error is None:
            self._remember(data)
        if self.flight is not None:
            if self.complete:
                # told after the parser is done with this read: bytes after the response's end
                # (above) have dropped the connection before it could go back to the pool
                self._land()
            elif self.body_seen and self.timeout is not None:
                # the read timeout runs between reads of the body, as next_chunk's does
                self.body_seen = False
                self.deadline = self.loop.time() + self.timeout

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()  # (a failure in flight lands below)
            self.timer = None
        metrics.UPSTREAM_OPEN.dec()
        if self.in_use and not self.complete:
            if self.head_ok and self.error is None and not self._framed():
                self.complete = True  # a close-delimited body ends with the connection
                self._wake()
            elif host_unreachable_error(exc):
                self._fail(HostLost(f"host {self.key[0]} stopped answering: {exc!r}"))
            else:
                self._fail(UpstreamError("node closed the connection"))
        self.can_write.set()

    def _framed(self) -> bool:
        if self.status in (204, 304):
            return True
        return any(k in (b"content-length", b"transfer-encoding") for k, _ in self.headers)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    # --- httptools callbacks ------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete or (self._head_over() and not self.interim):
            raise _Stray
        self.headers = []
        self.in_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        if len(self.headers) > self.limits.header_count > 0:
            # failed here (httptools wraps what a callback raises): parsing stops, the connection drops
            self._fail(ResponseTooLarge(f"node response has over {self.limits.header_count} headers "
                                        "(proxy.max_response_headers)"), drop=True)
            raise _Stray

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        self.tail = b""
        self.heads += 1
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self.interim = True  # 100 Continue, 103 Early Hints: not the answer, wait for it
            return
        if self._head_over():
            # a second final response to one request: the node is out of step with us
            self._fail(UpstreamError("node sent more than one response"))
            return
        self._final_head(status, self.parser.should_keep_alive())  # (only meaningful before the body)

    def _final_head(self, status: int, keep_alive: bool) -> None:
        self.status = status
        self.keep_alive = keep_alive
        self.head_ok = True
        if self._head_fut is not None:
            self._head_fut.set_result(None)  # (not done: _head_over above)
        self.can_write.set()  # a writer blocked on flow control must notice the early answer
        if self.flight is not None:
            self.flight.head(self)  # an answer to stream is handed to a task here

    def on_body(self, body: bytes) -> None:
        self.body_seen = True
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused_reading and self.transport is not None:
            self.transport.pause_reading()
            self.paused_reading = True
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.complete = True
        self._wake()

    # --- remembered heads (KnownHead) -------------------------------------------------------
    def _known_answer(self, known: KnownHead, body: bytes) -> None:
        """A first read that is a remembered head and at most its body: what the parser's callbacks
        would do with it (the head, the body as it comes, the end), without the parser. The parser
        stands between messages, as after parsing one whole."""
        self.got_bytes = True
        self.heads = 1
        self.in_head = False
        self.known = known
        self.headers = known.headers
        self.rest = known.length
        self._final_head(known.status, True)  # (head() hands a large answer to a task: it reads the chunks)
        self._known_body(body)

    def _known_body(self, data: bytes) -> None:
        """Body bytes after a remembered head, framed by its Content-Length as the parser frames them:
        the answer ends at its length, and bytes after that end drop the connection (_Stray's way)."""
        stray = len(data) > self.rest
        if stray:
            data = data[:self.rest]
        if data:
            self.rest -= len(data)
            self.on_body(data)
        if not self.rest:
            self.on_message_complete()
        if stray:
            self.abort()
        if self.flight is not None:
            if self.complete:
                self._land()
            elif self.body_seen and self.timeout is not None:
                self.body_seen = False  # (the read timeout runs between reads of the body)
                self.deadline = self.loop.time() + self.timeout

    def _remember(self, data: bytes) -> None:
        """The first read held the one final head (no interim one) and nothing past its body: the head
        is remembered by its bytes when it is final, kept alive and framed by one Content-Length."""
        status = self.status
        if not self.keep_alive or status < 200 or status in (204, 304):
            return
        length = -1
        for k, v in self.headers:
            if k == b"content-length":
                if length >= 0 or not v.isdigit():
                    return
                length = int(v)
            elif k == b"transfer-encoding":
                return
        at = data.find(b"\r\n\r\n") + 4
        # the parse's head ended at the first blank line (httptools refuses bare LFs; a head of them
        # could end before a CRLF pair in its body), and the rest of the read was body
        if length < 0 or at < 4 or at > KNOWN_HEAD_BYTES_MAX or len(data) - at > length \
                or self.buffered != len(data) - at:
            return
        heads = self.pool.heads
        if len(heads) >= KNOWN_HEADS_MAX:
            heads.clear()
        self.known = heads[data[:at]] = KnownHead(status, self.headers, length)

    # --- helpers ------------------------------------------------------------------------
    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: BaseException, drop: bool = False) -> None:
        if self.error is None:
            self.error = exc
        if self.flight is not None:
            self.loop.call_soon(self._land)  # not from inside the parser's or the transport's callback
        if not self._head_over():
            self.head_exc = exc
            if self._head_fut is not None:  # (not done: _head_over)
                self._head_fut.set_exception(exc)
                self._head_fut.exception()  # retrieved here; the caller re-raises it
        self._wake()
        self.can_write.set()
        if self.transport is not None:
            # drop: nothing more is read from this node (close() would keep reading until it flushed)
            self.transport.abort() if drop else self.transport.close()

    def _land(self) -> None:
        """The callback path's request is over (a whole response, or a failure): tell its flight."""
        flight, self.flight = self.flight, None
        if flight is not None:
            flight.landed(self)

    def _timed_out(self) -> None:
        self.timer = None
        if self.flight is None or self.closed:
            return  # no flight in the air (its timer is left armed; the next one re-arms it)
        if self.deadline - self.loop.time() > 0:
            if self.deadline != math.inf:  # (a flight without a read timeout)
                self.timer = self.loop.call_at(self.deadline, self._timed_out)
            return
        self._fail(UpstreamTimeout("node response timed out"))

    def hand_off(self) -> None:
        """The flight's answer goes on through a Response (streamed by a task): no more callbacks."""
        self.flight = None

    def set_in_use(self, flag: bool) -> None:
        if flag != self.in_use:
            self.in_use = flag
            metrics.DEFERRED.inc(metrics.UPSTREAM_BUSY, 1 if flag else -1)

    def abort(self) -> None:
        """Drop the connection now, discarding anything unsent; a reader waiting on it is woken."""
        if self.in_use and not self.complete:
            self._fail(UpstreamError("connection to the node aborted"))
        self.set_in_use(False)
        if self.transport is not None:
            self.transport.abort()

    def write(self, data: bytes) -> None:
        transport = self.transport
        if self.error is not None:
            raise self.error
        if self.closed or transport is None or transport.is_closing():
            raise UpstreamError("node closed the connection")
        try:
            transport.write(data)
        except RuntimeError as exc:  # uvloop: "unable to perform operation on <TCPTransport closed=True>"
            raise UpstreamError(f"node connection failed: {exc}") from None

    async def next_chunk(self, timeout: float | None) -> bytes | None:
        """The next body chunk, or None at the end of the response."""
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self.waiter = self.loop.create_future()
            try:
                await _wait(self.waiter, timeout)  # woken by the next chunk, the end or a failure
            except TimeoutError:
                self._fail(UpstreamTimeout("node response timed out"))
                raise self.error from None  # type: ignore[misc]
            finally:
                self.waiter = None
        chunk = self.chunks.popleft()
        self.buffered -= len(chunk)
        if self.paused_reading and self.buffered < HIGH_WATER // 2 and self.transport is not None:
            self.transport.resume_reading()
            self.paused_reading = False
        return chunk

    def reusable(self) -> bool:
        return (self.complete and self.request_sent and self.keep_alive and not self.closed
                and self.error is None and not self.chunks and self.transport is not None
                and not self.transport.is_closing())


class Response:
    """A node's response: status and headers at once, the body as it arrives."""

    def __init__(self, conn: _Conn, read_timeout: float | None, head_only: bool) -> None:
        self._conn = conn
        self.status_code = conn.status
        self.headers = conn.headers
        self._timeout = read_timeout
        # HEAD, 204 and 304 carry no body whatever their headers say
        self._no_body = head_only or conn.status in (204, 304)
        self._head_only = head_only
        self._released = False
        self._length: int | None = None
        self._length_known = False

    def content_length(self) -> int | None:
        if not self._length_known:
            self._length, self._length_known = self._content_length(), True
        return self._length

    def _content_length(self) -> int | None:
        if self._no_body:
            return 0
        for k, v in self.headers:
            if k == b"content-length":
                try:
                    return int(v)
                except ValueError:
                    return None
        return None

    async def iter_raw(self) -> AsyncIterator[bytes]:
        if self._no_body:
            return
        while True:
            chunk = await self._conn.next_chunk(self._timeout)
            if chunk is None:
                return
            yield chunk

    async def read(self) -> bytes:
        """The whole body, at most limits.read_bytes of it (ResponseTooLarge past that)."""
        limit = self._conn.limits.read_bytes
        declared = self.content_length()
        if limit and declared is not None and declared > limit:
            self.abort()
            raise ResponseTooLarge(f"node response body of {declared} bytes is over {limit} bytes "
                                   "(proxy.max_read_body_bytes)")
        conn = self._conn
        if conn.complete and not self._no_body:
            # the whole body is in already (a small answer usually comes with its head): no
            # generator, no wait
            size = conn.buffered
            if limit and size > limit:
                self.abort()
                raise ResponseTooLarge(f"node response body over {limit} bytes (proxy.max_read_body_bytes)")
            data = b"".join(conn.chunks)
            conn.chunks.clear()
            conn.buffered = 0
            if conn.paused_reading and conn.transport is not None:
                conn.transport.resume_reading()  # as next_chunk would once the buffer drained
                conn.paused_reading = False
            return data
        chunks, size = [], 0
        async for c in self.iter_raw():
            size += len(c)
            if limit and size > limit:
                self.abort()
                raise ResponseTooLarge(f"node response body over {limit} bytes (proxy.max_read_body_bytes)")
            chunks.append(c)
        return b"".join(chunks)

    def close(self) -> None:
        """Give the connection back when request and response were complete, else drop it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        # after HEAD the parser cannot know the body is absent: never reuse, never misframe
        if not self._head_only and conn.reusable():
            conn.pool._put(conn)
        else:
            conn.abort()

    def abort(self) -> None:
        """The client went away: free the node's connection at once."""
        if not self._released:
            self._released = True
            self._conn.abort()


async def _wait(head: asyncio.Future[None], timeout: float | None) -> None:
    """Until the future is done (the node's final response head arrived, or the next body chunk);
    TimeoutError after timeout seconds.

    A timer on the future itself, not wait_for(shield(...)): those cost two more futures and their
    callbacks on every request. Cancelling the caller cancels the future too; every path out of
    request() aborts the connection then, and the connection's callbacks check done() first."""
    if head.done():
        head.result()
        return
    if timeout is None:
        await head
        return
    timer = asyncio.get_running_loop().call_later(timeout, _expire, head)
    try:
        await head
    finally:
        timer.cancel()


def _expire(head: asyncio.Future[None]) -> None:
    if not head.done():
        head.set_exception(TimeoutError())


class UpstreamPool:
    """Idle keep-alive connections per (host, port)."""

    def __init__(self, max_idle_per_host: int = 64, keepalive_seconds: float = 0,
                 limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self.max_idle_per_host = max_idle_per_host
        self.keepalive_seconds = keepalive_seconds  # TCP keep-alive idle time; 0: the system's
        self._conns: weakref.WeakSet[_Conn] = weakref.WeakSet()
        self.heads: dict[bytes, KnownHead] = {}  # response heads by their bytes (KnownHead)

    def abort_host(self, host: str, why: str) -> int:
        """End every request in flight to a host now (its circuit opened); how many there were."""
        n = 0
        for conn in list(self._conns):
            if conn.key[0] == host and not conn.closed:
                if conn.in_use and not conn.complete:
                    conn._fail(HostLost(f"host {host} became unreachable: {why}"))
                    n += 1
                conn.abort()
        self._idle = {k: v for k, v in self._idle.items() if k[0] != host}
        return n

    def _put(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle_per_host:
            conn.abort()
            return
        conn.set_in_use(False)
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def idle(self, key: tuple[str, int]) -> _Conn | None:
        """An idle connection to key, taken for a request; None when there is none."""
        idle = self._idle.get(key)
        if not idle:
            return None
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS and conn.transport is not None \
                    and not conn.transport.is_closing():
                conn.set_in_use(True)
                conn._reset()
                return conn
            conn.abort()
        return None

    def send(self, conn: _Conn, request: bytes, flight: Flight, read_timeout: float | None) -> None:
        """Write a whole request (head and body) on conn, taken by idle(); its flight is told of the
        answer by callbacks (Flight), or of a failure, never before this returns."""
        conn.flight = flight
        conn.timeout = read_timeout
        conn.body_seen = False
        try:
            conn.write(request)
        except UpstreamError as exc:
            conn._fail(exc)
            return
        conn.request_sent = True
        if read_timeout is None:
            conn.deadline = math.inf
        else:
            conn.deadline = conn.loop.time() + read_timeout
            if conn.timer is None:
                conn.timer = conn.loop.call_at(conn.deadline, conn._timed_out)

    async def _get(self, key: tuple[str, int], connect_timeout: float) -> tuple[_Conn, bool]:
        kept = self.idle(key)
        if kept is not None:
            return kept, True
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: _Conn(self, key), key[0], key[1]),
                                             connect_timeout)
        except (TimeoutError, OSError) as exc:
            why = "connect timed out" if isinstance(exc, asyncio.TimeoutError) else repr(exc)
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]}: {why}",
                                isinstance(exc, (asyncio.TimeoutError, TimeoutError))) from exc
        self._conns.add(conn)
        return conn, False

    async def request(self, method: str, host: str, port: int, target: bytes,
                      headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes] | bytes | None,
                      connect_timeout: float, read_timeout: float | None) -> Response:
        """Send a request and return once the node's final response headers arrived. body: streamed as
        it comes, or bytes when it is all here (then sent with the head in one write)."""
        key = (host, port)
        head = [method.encode(), b" ", target, b" HTTP/1.1\r\nhost: ", f"{host}:{port}".encode(), b"\r\n"]
        chunked = body is not None and not any(k == b"content-length" for k, _ in headers)
        for k, v in headers:
            head += [k, b": ", v, b"\r\n"]
        if chunked:
            head.append(b"transfer-encoding: chunked\r\n")
        head.append(b"\r\n")
        head_bytes = b"".join(head)
        for attempt in (0, 1):
            conn, reused = await self._get(key, connect_timeout)
            try:
                if body is None:
                    conn.write(head_bytes)
                    conn.request_sent = True
                elif isinstance(body, bytes):
                    if chunked:
                        conn.write(head_bytes + (b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body) if body else b"0\r\n\r\n"))
                    else:
                        conn.write(head_bytes + body)
                    conn.request_sent = True
                else:
                    await self._send_body(conn, body, chunked, read_timeout, head_bytes)
                await _wait(conn.head_done, read_timeout)
            except TimeoutError:
                conn.abort()
                raise UpstreamTimeout("node response timed out") from None
            except UpstreamError as exc:
                conn.abort()
                # a reused connection the node had just closed: safe to retry only when nothing
                # of a client body was consumed and the node sent nothing (never when its host is gone)
                if reused and not conn.got_bytes and body is None and attempt == 0 and not isinstance(exc, HostLost):
                    continue
                raise
            except BaseException:
                conn.abort()  # a half-sent request (client gone, cancelled): this connection is unusable
                raise
            return Response(conn, read_timeout, method == "HEAD")
        raise UpstreamError("unreachable")  # pragma: no cover

    async def _send_body(self, conn: _Conn, body: AsyncIterator[bytes], chunked: bool,
                         timeout: float | None, head: bytes) -> None:
        """The request's head goes out with the body's first bytes, in one write (one system call and
        one segment, as nginx's writev): a small body cost the proxy a second write before. A body
        whose first bytes are not there yet holds the head back only until they arrive."""
        pending: bytes | None = head
        async for chunk in body:
            if conn.head_done.done():
                return  # answered before the body was sent: stop; the connection is not reused
            if not chunk:
                continue
            data = b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk
            if pending is not None:
                data, pending = pending + data, None
            conn.write(data)
            if not conn.can_write.is_set():
                # a node that neither reads nor answers times out like one that does not answer
                await asyncio.wait_for(conn.can_write.wait(), timeout)
        if conn.head_done.done():
            return
        end = b"0\r\n\r\n" if chunked else b""
        if pending is not None or end:
            conn.write((pending or b"") + end)
        conn.request_sent = True

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                c.abort()
        self._idle.clear()
