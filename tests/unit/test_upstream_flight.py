"""The node connection's callback path (UpstreamPool.idle and send, a Flight told of the answer)
against the same real local socket servers as tests/unit/test_upstream.py: every answer reaches
its own request, a connection goes back to the pool only when reusable, and each failure is told
once, never from inside send()."""

from __future__ import annotations

import asyncio
from typing import Any

from manager.proxy.upstream import HostLost, UpstreamError, UpstreamPool, UpstreamTimeout
from tests.unit.test_upstream import FRAMING, call, scripted, serve

SCRIPT = {**FRAMING, b"/ok": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok"}


class Flight:
    """Records what it is told, and takes a whole answer as the proxy's _Flight does."""

    def __init__(self, stream: bool = False) -> None:
        self.heads: list[int] = []
        self.done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.stream = stream  # hand the answer off at its head, as a large one is
        self.in_send = False

    def head(self, conn: Any) -> None:
        self.heads.append(conn.status)
        if self.stream:
            conn.hand_off()
            self.done.set_result(("handed", conn))

    def landed(self, conn: Any) -> None:
        assert not self.in_send, "told from inside send()"
        if conn.error is not None and not conn.complete:  # (bytes after a whole answer: it stands)
            self.done.set_result(("error", conn.error, conn.got_bytes))
            conn.abort()
            return
        body = b"".join(conn.chunks)
        conn.chunks.clear()
        reused = conn.reusable()
        if reused:
            conn.pool._put(conn)
        else:
            conn.abort()
        self.done.set_result((conn.status, body, reused))


async def fly(pool: UpstreamPool, port: int, target: bytes, timeout: float = 2.0,
              stream: bool = False) -> tuple[Any, ...]:
    conn = pool.idle(("127.0.0.1", port))
    assert conn is not None, "no idle connection"
    flight = Flight(stream)
    flight.in_send = True
    pool.send(conn, b"GET %s HTTP/1.1\r\nhost: x\r\n\r\n" % target, flight, timeout)
    flight.in_send = False
    return await asyncio.wait_for(flight.done, 10)


async def test_answers_by_callback_and_the_connection_goes_back_only_when_reusable() -> None:
    seen: list[bytes] = []
    server, port = await scripted(SCRIPT, seen)
    pool = UpstreamPool()
    assert pool.idle(("127.0.0.1", port)) is None  # nothing pooled yet: the task's path connects
    assert await call(pool, port, b"/ok") == (200, b"ok")
    assert await fly(pool, port, b"/ok") == (200, b"ok", True)
    # interim answers absorbed, never taken for the answer
    assert await fly(pool, port, b"/interim") == (200, b"r1", True)
    # bytes after the answer's end: the answer is its own, the connection is dropped, not pooled
    assert await fly(pool, port, b"/stray") == (200, b"r1", False)
    assert await call(pool, port, b"/ok") == (200, b"ok")
    assert await fly(pool, port, b"/nocontent") == (204, b"", True)
    # the node drops the connection mid-body: an error, after its head
    kind, err, got_bytes = await fly(pool, port, b"/reset")
    assert kind == "error" and isinstance(err, UpstreamError) and got_bytes
    server.close()
    await server.wait_closed()
    pool.close()


async def test_a_stale_connection_fails_without_bytes_and_a_silent_node_times_out() -> None:
    conns: list[int] = []
    server, port = await serve(conns)
    pool = UpstreamPool()
    assert await call(pool, port, b"/bye") == (200, b"hello")  # answered, then the node closed it
    await asyncio.sleep(0.05)
    conn = pool.idle(("127.0.0.1", port))
    if conn is not None:  # (the pool may have seen the close already and dropped it)
        flight = Flight()
        pool.send(conn, b"GET /len HTTP/1.1\r\nhost: x\r\n\r\n", flight, 2.0)
        kind, err, got_bytes = await asyncio.wait_for(flight.done, 10)
        # what the proxy retries by the task's path: nothing came back, nothing was consumed
        assert kind == "error" and not got_bytes and not isinstance(err, (HostLost, UpstreamTimeout))
    assert await call(pool, port, b"/len") == (200, b"hello")
    kind, err, got_bytes = await fly(pool, port, b"/slow", timeout=0.3)
    assert kind == "error" and isinstance(err, UpstreamTimeout) and not got_bytes
    server.close()
    await server.wait_closed()
    pool.close()


async def test_a_streamed_answer_is_handed_off_and_told_nothing_more() -> None:
    seen: list[bytes] = []
    server, port = await scripted(SCRIPT, seen)
    pool = UpstreamPool()
    assert await call(pool, port, b"/ok") == (200, b"ok")
    kind, conn = await fly(pool, port, b"/ok", stream=True, timeout=0.2)
    assert kind == "handed" and conn.flight is None
    # past the flight's timeout: a handed-off answer is not timed out by it (the connection's one
    # timer may still be armed; it finds no flight)
    await asyncio.sleep(0.4)
    assert conn.error is None and conn.complete
    server.close()
    await server.wait_closed()
    pool.close()
