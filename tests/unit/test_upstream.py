"""The proxy's HTTP/1.1 client against a real local socket server with crafted responses."""

from __future__ import annotations

import asyncio

import pytest

from manager.upstream import ConnectFailed, UpstreamError, UpstreamPool

RESPONSES = {
    b"/len": b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
    b"/chunked": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
    b"/close": b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nuntil-eof",
    b"/slow": None,
}


async def serve(connections: list[int]) -> tuple[asyncio.AbstractServer, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                target = head.split(b" ")[1]
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                body = await reader.readexactly(length) if length else b""
                if target == b"/echo":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
                elif target == b"/bye":  # answers, then drops the kept-alive connection
                    writer.write(RESPONSES[b"/len"])
                    await writer.drain()
                    writer.close()
                    return
                elif RESPONSES[target] is None:
                    await asyncio.sleep(5)
                else:
                    writer.write(RESPONSES[target])
                await writer.drain()
                if target == b"/close":
                    writer.close()
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def get(pool: UpstreamPool, port: int, path: bytes, body: bytes | None = None) -> tuple[int, bytes]:
    async def gen():  # type: ignore[no-untyped-def]
        yield body

    headers = [(b"content-length", str(len(body)).encode())] if body is not None else []
    r = await pool.request("POST" if body else "GET", "127.0.0.1", port, path, headers,
                           gen() if body is not None else None, 2.0, 1.0)
    data = await r.read()
    r.close()
    return r.status_code, data


async def test_framing_and_keep_alive() -> None:
    conns: list[int] = []
    server, port = await serve(conns)
    pool = UpstreamPool()
    assert await get(pool, port, b"/len") == (200, b"hello")
    assert await get(pool, port, b"/chunked") == (200, b"abcde")
    assert await get(pool, port, b"/echo", b"x" * 100_000) == (200, b"x" * 100_000)
    assert len(conns) == 1  # one kept-alive connection served all three
    assert await get(pool, port, b"/close") == (200, b"until-eof")  # close-delimited body
    assert await get(pool, port, b"/len") == (200, b"hello")
    assert len(conns) == 2
    pool.close()
    server.close()


async def test_stale_connection_is_retried_and_timeouts_raise() -> None:
    conns: list[int] = []
    server, port = await serve(conns)
    pool = UpstreamPool()
    assert await get(pool, port, b"/bye") == (200, b"hello")
    await asyncio.sleep(0.05)  # the server has closed the pooled connection
    assert await get(pool, port, b"/len") == (200, b"hello")
    with pytest.raises(UpstreamError, match="timed out"):
        await get(pool, port, b"/slow")
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectFailed):
        await get(pool, port, b"/len")
    pool.close()
