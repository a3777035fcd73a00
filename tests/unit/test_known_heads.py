"""Heads remembered by their bytes (manager/edge/protocol.py RawHead, manager/proxy/upstream.py
KnownHead): a request or response head seen before skips the parser, so what a lookup gives must be
exactly what parsing the same bytes gives. Each answer and each body stays its own request's; a read
that is not exactly a known head and its body (split, followed by more, another length) is parsed as
any; only a final, kept-alive answer framed by one Content-Length is remembered, and the memory is
bounded, whatever a client or a node sends."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from manager.edge import protocol
from manager.proxy import upstream
from manager.proxy.upstream import UpstreamPool
from tests.unit.test_raw_path import NID, Edge, Node, answers, get, post, until, with_node
from tests.unit.test_upstream_flight import Flight

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\n"  # the counting node's, for every body of 4 bytes


class Counting(Node):
    """A node answering every request with the same head and a body of its own (the request's number),
    or with what ``next`` holds for the next request (then back to counting)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0
        self.next: list[bytes] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                if self.next:
                    for i, part in enumerate(self.next.pop(0).split(b"<PAUSE>")):
                        if i:
                            await asyncio.sleep(0.05)  # in a read of its own
                        writer.write(part)
                        await writer.drain()
                    continue
                self.n += 1
                writer.write(HEAD + b"%04d" % self.n)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()


@contextlib.asynccontextmanager
async def counting() -> AsyncIterator[tuple[Counting, UpstreamPool]]:
    """A counting node and a pool of connections to it, both closed after."""
    node = Counting()
    await node.start()
    pool = UpstreamPool()
    try:
        yield node, pool
    finally:
        node.close()
        pool.close()


class Seeing(Flight):
    """A Flight that also records whether the head it was told of was a remembered one."""

    def __init__(self) -> None:
        super().__init__()
        self.known: list[bool] = []

    def head(self, conn: Any) -> None:
        self.known.append(conn.known is not None)  # (the parser's path remembers only after the read)
        super().head(conn)


async def fly(pool: UpstreamPool, port: int) -> tuple[Any, bool]:
    conn = pool.idle(("127.0.0.1", port))
    if conn is None:
        conn, _ = await pool._get(("127.0.0.1", port), 2)
    flight = Seeing()
    pool.send(conn, b"GET /n HTTP/1.1\r\nhost: x\r\n\r\n", flight, 2.0)
    return await asyncio.wait_for(flight.done, 10), flight.known == [True]


async def test_a_remembered_response_head_gives_each_request_its_own_body() -> None:
    async with counting() as (node, pool):
        got = [await fly(pool, node.port) for _ in range(5)]
        assert [g[0] for g in got] == [(200, b"%04d" % i, True) for i in range(1, 6)]
        # the first was parsed (and remembered), the others found by their head's bytes
        assert [g[1] for g in got] == [False, True, True, True, True]
        assert list(pool.heads) == [HEAD]


async def test_a_known_head_whose_body_comes_later_is_framed_by_its_length_as_the_parser_frames_it() -> None:
    async with counting() as (node, pool):
        # a node's server that writes the head and the body apart: remembered all the same
        node.next.append(HEAD + b"<PAUSE>0001")
        assert await fly(pool, node.port) == ((200, b"0001", True), False)
        assert list(pool.heads) == [HEAD]
        # the body after the head, in one later read or in pieces: whole, the connection kept
        node.next.append(HEAD + b"<PAUSE>abcd")
        assert await fly(pool, node.port) == ((200, b"abcd", True), True)
        node.next.append(HEAD + b"a<PAUSE>b<PAUSE>cd")
        assert await fly(pool, node.port) == ((200, b"abcd", True), True)
        # more bytes than its body in a later read (a second answer nobody asked for): the answer is
        # its own, the connection dropped, never pooled with the stray answer waiting in it
        node.next.append(HEAD + b"ab<PAUSE>cdHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil")
        assert await fly(pool, node.port) == ((200, b"abcd", False), True)
        # ... or in the first read: the parser's way, the same outcome
        node.next.append(HEAD + b"wxyzHTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\nevil")
        assert await fly(pool, node.port) == ((200, b"wxyz", False), False)
        assert (await fly(pool, node.port))[0] == (200, b"0001", True)


async def test_a_node_that_stops_within_a_known_heads_body_fails_the_request_as_a_parsed_one() -> None:
    async with counting() as (node, pool):
        assert (await fly(pool, node.port))[0] == (200, b"0001", True)
        node.next.append(HEAD + b"ab<PAUSE>")  # then nothing more: the read timeout ends it
        conn = pool.idle(("127.0.0.1", node.port))
        assert conn is not None
        flight = Seeing()
        pool.send(conn, b"GET /n HTTP/1.1\r\nhost: x\r\n\r\n", flight, 0.3)
        kind, err, _ = await asyncio.wait_for(flight.done, 10)
        assert kind == "error" and isinstance(err, upstream.UpstreamTimeout) and flight.known == [True]


async def test_only_a_final_kept_alive_answer_framed_by_one_length_is_remembered() -> None:
    async with counting() as (node, pool):
        for answer, body in (
                (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nr1", b"r1"),  # interim first
                (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nr2\r\n0\r\n\r\n", b"r2"),
                (b"HTTP/1.1 200 OK\r\nx-pad: " + b"p" * 3000 + b"\r\ncontent-length: 2\r\n\r\nr3", b"r3"),  # long
                (b"HTTP/1.1 204 No Content\r\n\r\n", b"")):
            node.next.append(answer)
            outcome, _ = await fly(pool, node.port)
            assert outcome[:2] == (200 if body else 204, body)
            assert pool.heads == {}, answer
        node.next.append(b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nr4")
        assert (await fly(pool, node.port))[0] == (200, b"r4", False)
        assert pool.heads == {}


async def test_the_memory_of_heads_stays_bounded_whatever_a_node_sends(monkeypatch: Any) -> None:
    monkeypatch.setattr(upstream, "KNOWN_HEADS_MAX", 8)
    async with counting() as (node, pool):
        for i in range(30):
            node.next.append(b"HTTP/1.1 200 OK\r\nx-n: %d\r\ncontent-length: 2\r\n\r\nok" % i)
            assert (await fly(pool, node.port))[0] == (200, b"ok", True)
            assert len(pool.heads) <= 8


async def test_a_known_request_head_is_sent_with_its_own_body_and_answered_as_a_parsed_one() -> None:
    async def run(node: Node) -> None:
        edge = Edge(node)
        cycle = Edge(node, raw=False)
        await edge.pooled()
        await cycle.pooled()
        bodies = [b'{"file_path": "a.bin"}', b'{"file_path": "b.bin"}', b'{"file_path": "cc.bin"}']
        for n, body in enumerate(bodies, 1):
            for e in (edge, cycle):
                e.transport.writes.clear()
                e.send(post(b"/download_file", body))
                await until(lambda e=e: e.transport.writes != [], "the answer")  # type: ignore[misc]
                assert e.protocol.cycle is None or e is cycle
            # the node got each body with its own head, byte for byte as the cycle's path sends it
            assert node.seen[-2] == node.seen[-1] and node.seen[-1].endswith(b"\r\n\r\n" + body)
            assert edge.transport.data == cycle.transport.data
            assert answers(edge.transport.data) == [b"answer to /download_file"]
            # the two bodies of one length share a head; the third has another Content-Length
            assert len(edge.protocol._raw_heads) == (1 if n < 3 else 2)

    await with_node(run)


async def test_a_known_request_head_split_from_its_body_or_followed_by_another_is_parsed_as_any() -> None:
    async def run(node: Node) -> None:
        edge = Edge(node)
        await edge.pooled()
        request = post(b"/download_file", b'{"file_path": "a.bin"}')
        edge.send(request)
        await until(lambda: len(answers(edge.transport.data)) == 1, "the first answer")
        assert len(edge.protocol._raw_heads) == 1
        # the same head, its body in two reads: the node gets the whole body
        edge.send(request[:-5])
        await asyncio.sleep(0.05)
        edge.send(request[-5:])
        await until(lambda: len(answers(edge.transport.data)) == 2, "the split one's answer")
        assert node.seen[-1].endswith(b'\r\n\r\n{"file_path": "a.bin"}')
        # the known head and a pipelined second request in one read: both answered, in order
        edge.send(request + get(b"/after"))
        await until(lambda: len(answers(edge.transport.data)) == 4, "both pipelined answers")
        assert answers(edge.transport.data)[2:] == [b"answer to /download_file", b"answer to /after"]
        assert node.seen[-1].startswith(b"GET /after ")

    await with_node(run)


async def test_the_memory_of_request_heads_stays_bounded_whatever_a_client_sends(monkeypatch: Any) -> None:
    monkeypatch.setattr(protocol, "RAW_HEADS_MAX", 8)

    async def run(node: Node) -> None:
        edge = Edge(node)
        await edge.pooled()
        for i in range(30):
            edge.send(b"GET / HTTP/1.1\r\nHost: m\r\nCookie: node_id=%s\r\nX-N: %d\r\n\r\n" % (NID.encode(), i))
            await until(lambda i=i: len(answers(edge.transport.data)) == i + 1, "the answer")  # type: ignore[misc]
            assert len(edge.protocol._raw_heads) <= 8
        edge.send(b"GET / HTTP/1.1\r\nHost: m\r\nCookie: node_id=%s\r\nX-Pad: %s\r\n\r\n" % (NID.encode(), b"p" * 3000))
        await until(lambda: len(answers(edge.transport.data)) == 31, "the long head's answer")
        assert all(len(k) <= protocol.RAW_HEAD_BYTES_MAX for k in edge.protocol._raw_heads)

    await with_node(run)
