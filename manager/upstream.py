"""A lean HTTP/1.1 client for the proxy's hot path: keep-alive connections per node,
httptools (C) parsing, bodies streamed both ways with flow control.

httpx spent most of a proxied request's time in its own layers (profiled at about 500
requests/s through the manager against 11,000 straight to the node); this does only
what a reverse proxy needs. httpx stays for everything else (probes, forwarding).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator
import httptools

HIGH_WATER = 1 << 20  # pause reading the node when this much body waits for a slow client
IDLE_SECONDS = 3.0  # below uvicorn's 5 s keep-alive, so a pooled connection is rarely stale


class UpstreamError(Exception):
    """The node could not be reached or dropped the connection."""


class ConnectFailed(UpstreamError):
    """No connection could be opened: nothing was sent."""


class _Conn(asyncio.Protocol):
    def __init__(self, pool: "UpstreamPool", key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.chunks: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.complete = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.paused_reading = False
        self.can_write = asyncio.Event()
        self.can_write.set()
        self.got_bytes = False
        self.keep_alive = False

    # --- asyncio.Protocol -------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad response from node: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.complete:
            if self.head_done.done() and self.error is None and not self._framed():
                self.complete = True  # a close-delimited body ends with the connection
                self._wake()
            else:
                self._fail(UpstreamError("node closed the connection"))
        self.can_write.set()

    def _framed(self) -> bool:
        return any(k in (b"content-length", b"transfer-encoding") for k, _ in self.headers)

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    # --- httptools callbacks ------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()  # only meaningful before the body
        if not self.head_done.done():
            self.head_done.set_result(None)

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and not self.paused_reading and self.transport is not None:
            self.transport.pause_reading()
            self.paused_reading = True
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # --- helpers ------------------------------------------------------------------------
    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        self.error = exc
        if not self.head_done.done():
            self.head_done.set_exception(exc)
            self.head_done.exception()  # retrieved here; the caller re-raises it
        self._wake()
        if self.transport is not None:
            self.transport.close()

    async def next_chunk(self, timeout: float | None) -> bytes | None:
        """The next body chunk, or None at the end of the response."""
        while not self.chunks:
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await asyncio.wait_for(self.waiter, timeout)
            except asyncio.TimeoutError:
                self._fail(UpstreamError("node response timed out"))
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
        return self.complete and not self.closed and self.error is None and self.keep_alive and not self.chunks


class Response:
    """A node's response: status and headers at once, the body as it arrives."""

    def __init__(self, conn: _Conn, read_timeout: float | None, head_only: bool) -> None:
        self._conn = conn
        self.status_code = conn.status
        self.headers = conn.headers
        self._timeout = read_timeout
        self._head_only = head_only
        self._released = False

    def content_length(self) -> int | None:
        for k, v in self.headers:
            if k == b"content-length":
                try:
                    return int(v)
                except ValueError:
                    return None
        return None

    async def iter_raw(self) -> AsyncIterator[bytes]:
        if self._head_only:
            return
        while True:
            chunk = await self._conn.next_chunk(self._timeout)
            if chunk is None:
                return
            yield chunk

    async def read(self) -> bytes:
        return b"".join([c async for c in self.iter_raw()])

    def close(self) -> None:
        """Give the connection back when the response was read to its end, else drop it."""
        if self._released:
            return
        self._released = True
        conn = self._conn
        if not self._head_only and conn.reusable():
            self._conn.pool._put(conn)
        elif conn.transport is not None:
            conn.transport.close()


class UpstreamPool:
    """Idle keep-alive connections per (host, port)."""

    def __init__(self, max_idle_per_host: int = 64) -> None:
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self.max_idle_per_host = max_idle_per_host

    def _put(self, conn: _Conn) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= self.max_idle_per_host:
            if conn.transport is not None:
                conn.transport.close()
            return
        conn.idle_since = time.monotonic()
        conn._reset()
        conn.parser = httptools.HttpResponseParser(conn)
        idle.append(conn)

    async def _get(self, key: tuple[str, int], connect_timeout: float) -> tuple[_Conn, bool]:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if not conn.closed and now - conn.idle_since < IDLE_SECONDS and conn.transport is not None \
                    and not conn.transport.is_closing():
                return conn, True
            if conn.transport is not None:
                conn.transport.close()
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: _Conn(self, key), key[0], key[1]),
                                             connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {key[0]}:{key[1]}: {exc!r}") from exc
        return conn, False

    async def request(self, method: str, host: str, port: int, target: bytes,
                      headers: list[tuple[bytes, bytes]], body: AsyncIterator[bytes] | None,
                      connect_timeout: float, read_timeout: float | None) -> Response:
        """Send a request and return once the node's response headers arrived."""
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
            transport = conn.transport
            assert transport is not None
            transport.write(head_bytes)
            if body is not None:
                try:
                    await self._send_body(conn, body, chunked)
                except BaseException:
                    transport.close()  # a half-sent request: this connection is unusable
                    raise
            try:
                await asyncio.wait_for(asyncio.shield(conn.head_done), read_timeout)
            except asyncio.TimeoutError:
                conn._fail(UpstreamError("node response timed out"))
                raise UpstreamError("node response timed out") from None
            except UpstreamError:
                # a reused connection the node had just closed: safe to retry only when nothing
                # of a client body was consumed
                if reused and not conn.got_bytes and body is None and attempt == 0:
                    continue
                raise
            return Response(conn, read_timeout, method == "HEAD")
        raise UpstreamError("unreachable")  # pragma: no cover

    async def _send_body(self, conn: _Conn, body: AsyncIterator[bytes], chunked: bool) -> None:
        transport = conn.transport
        assert transport is not None
        async for chunk in body:
            if conn.error is not None or conn.closed:
                raise conn.error or UpstreamError("node closed the connection")
            if not chunk:
                continue
            if chunked:
                transport.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            else:
                transport.write(chunk)
            if not conn.can_write.is_set():
                await conn.can_write.wait()
        if chunked:
            transport.write(b"0\r\n\r\n")

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                if c.transport is not None:
                    c.transport.close()
        self._idle.clear()

