"""The edge's direct path for proxied answers (manager/edge/protocol.py _Direct, manager/entry.py):
what reaches the client is what uvicorn's ASGI send would have written, in one write, and the
node_id cookie is the one Starlette's parser finds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from starlette.requests import cookie_parser

from manager.edge import protocol
from manager.edge.protocol import _Direct
from manager.entry import _node_cookie
from manager.session.resolve import node_cookie
from tests.unit.test_cork import Transport  # the same recording transport


class Flow:
    write_paused = False


class Cycle:
    """The parts of uvicorn's RequestResponseCycle a direct reply touches."""

    def __init__(self, keep_alive: bool = True) -> None:
        self.transport = Transport()
        self.flow = Flow()
        self.disconnected = False
        self.response_started = False
        self.response_complete = False
        self.waiting_for_100_continue = True
        self.keep_alive = keep_alive
        self.default_headers = [(b"date", b"Sun, 06 Dec 2026 11:00:00 GMT")]
        self.message_event = asyncio.Event()
        self.completed = 0
        self.more_body = False
        self.body = bytearray()

    def on_response(self) -> None:
        self.completed += 1


def reply(cycle: Cycle) -> Any:
    c: Any = cycle
    return _Direct(c)


async def test_the_whole_answer_leaves_in_one_write_and_completes_the_cycle() -> None:
    protocol.set_replica("r-1")
    cycle = Cycle()
    await reply(cycle)(200, [(b"content-length", b"2"), (b"x-content-type-options", b"nosniff")], b"ok")
    assert cycle.transport.writes == [b"HTTP/1.1 200 OK\r\ndate: Sun, 06 Dec 2026 11:00:00 GMT\r\n"
                                      b"content-length: 2\r\nx-content-type-options: nosniff\r\n"
                                      b"x-tsm-replica: r-1\r\n\r\nok"]
    assert cycle.response_started and cycle.response_complete and cycle.message_event.is_set()
    assert cycle.completed == 1 and not cycle.transport.closed and not cycle.waiting_for_100_continue


async def test_a_connection_that_ends_says_so_and_closes() -> None:
    cycle = Cycle(keep_alive=False)
    await reply(cycle)(404, [(b"content-length", b"0")], b"")
    (written,) = cycle.transport.writes
    assert written.startswith(b"HTTP/1.1 404 Not Found\r\n") and written.endswith(b"connection: close\r\n\r\n")
    assert cycle.transport.closed and cycle.completed == 1


@pytest.mark.parametrize("header", [(b"x-bad", b"a\r\nset-cookie: node_id=x"), (b"x-bad", b"a\nb"),
                                    (b"bad name", b"v"), (b"x-nul", b"a\x00b")])
async def test_a_header_uvicorn_would_refuse_is_refused_and_nothing_written(header: tuple[bytes, bytes]) -> None:
    cycle = Cycle()
    with pytest.raises(RuntimeError):
        await reply(cycle)(200, [(b"content-length", b"2"), header], b"ok")
    assert cycle.transport.writes == [] and not cycle.response_started


async def test_a_client_gone_gets_nothing_and_abort_closes_without_an_answer() -> None:
    cycle = Cycle()
    cycle.disconnected = True
    await reply(cycle)(200, [(b"content-length", b"2")], b"ok")
    assert cycle.transport.writes == [] and cycle.completed == 0
    cycle = Cycle()
    reply(cycle).abort()  # the node dropped its answer half-way: nothing of it is sent
    assert cycle.transport.writes == [] and cycle.transport.closed and cycle.disconnected


@pytest.mark.parametrize("value", [
    b"node_id=" + b"a" * 64, b"node_id= " + b"b" * 64 + b" ", b'node_id="' + b"c" * 64 + b'"',
    b"node_id=x;node_id=" + b"d" * 64, b"other=1; node_id=" + b"e" * 64, b"node_id=a\\b", b"node_id=",
    b"node_id=\xa0ab\xa0", b"xnode_id=1", b"node_id=a=b", b"node_id=" + b"f" * 200])
def test_the_node_id_cookie_is_the_one_starlette_finds(value: bytes) -> None:
    assert _node_cookie([(b"cookie", value)]) == node_cookie(cookie_parser(value.decode("latin-1")))


def test_only_the_first_cookie_header_counts_as_in_starlette() -> None:
    first, second = b"node_id=" + b"a" * 64, b"node_id=" + b"b" * 64
    assert _node_cookie([(b"cookie", first), (b"cookie", second)]) == "a" * 64
    assert _node_cookie([(b"x-other", b"1")]) is None


def test_a_body_all_here_is_taken_whole_and_only_then() -> None:
    cycle = Cycle()
    cycle.waiting_for_100_continue = False
    cycle.more_body = True
    cycle.body = bytearray(b"{}")
    assert reply(cycle).whole_body() is None  # more to come: read from receive() as it arrives
    cycle.more_body = False
    cycle.waiting_for_100_continue = True
    assert reply(cycle).whole_body() is None  # the client may wait for 100 Continue: receive() sends it
    cycle.waiting_for_100_continue = False
    assert reply(cycle).whole_body() == b"{}"
    assert cycle.body == bytearray()  # taken: receive() gives it no more


async def test_an_answer_the_node_dropped_half_way_is_cut_short_after_its_head() -> None:
    # a proxy in front (another replica) must see it began: with nothing sent it retried and answered
    # 503 (tests/test_differential.py, reset on the owner path)
    protocol.set_replica("r-1")
    cycle = Cycle()
    reply(cycle).cut(200, [(b"content-length", b"5")])
    (written,) = cycle.transport.writes
    assert written.startswith(b"HTTP/1.1 200 OK\r\n") and b"content-length: 5\r\n" in written
    assert written.endswith(b"connection: close\r\n\r\n") and cycle.transport.closed
    cycle = Cycle()
    reply(cycle).cut(200, [(b"content-length", b"5"), (b"x-bad", b"a\nb")])  # refused: nothing at all
    assert cycle.transport.writes == [] and cycle.transport.closed
