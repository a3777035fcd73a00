"""The edge's raw path (manager/edge/protocol.py EdgeHttpProtocol._raw, manager/proxy/http_proxy.py
_RawFlight): a plain proxied request that came whole in one read is parsed and sent to its node
without uvicorn's scope and cycle, its small answer written by the edge itself. Real parts but the
client's socket: the edge protocol, the app's routing, the proxy, its pool and a node on a real local
socket; the client side is a recording transport, so every byte the client would get is seen.

What it must keep: the same bytes as the cycle's path both ways, each answer to its own request (a
request that arrives while one is in flight waits for it), an answer that needs the cycle (streamed)
still whole, a client gone, the keep-alive timeout (never under a request in flight) and a graceful
shutdown."""

from __future__ import annotations

import asyncio
import types
from collections.abc import Awaitable, Callable
from typing import Any

import starlette.applications
from uvicorn.config import Config
from uvicorn.server import ServerState

from manager.edge.client_auth import ClientKeys
from manager.edge.protocol import EdgeHttpProtocol, Limits, set_replica
from manager.entry import ManagerApp
from manager.proxy.http_proxy import Proxy
from manager.replica.activity import ActivityRecorder, AddressCache
from manager.session.resolve import Target
from nodeops.address_cache import ConfirmedAddresses
from nodeops.circuit import Circuits
from shared.config import load_config
from shared.engines.base import Address
from shared.models import NodeRecord, NodeStatus

NID = "a" * 64
SECRET = "s" * 32
DATE = [(b"date", b"Sun, 06 Dec 2026 11:00:00 GMT")]
BIG = b"x" * 200_000  # past the proxy's small answers (64 KiB): streamed by a task


class Transport:
    """The client's side of the edge: what would have been sent to it."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(data)

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 5555), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_write_buffer_size(self) -> int:
        return 0

    @property
    def data(self) -> bytes:
        return b"".join(self.writes)


class Node:
    """A node on a real local socket: answers each request by its path (HTTP/1.1, keep-alive);
    /slow only once its gate opens. Records every request as it came, in order."""

    def __init__(self) -> None:
        self.seen: list[bytes] = []
        self.gate = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Node:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                body = await reader.readexactly(length)
                self.seen.append(head + body)
                path = head.split(b" ", 2)[1]
                if path == b"/trickle":  # a head and the first bytes now, the rest once the gate opens
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(BIG), BIG[:1000]))
                    await writer.drain()
                    await self.gate.wait()
                    writer.write(BIG[1000:])
                    await writer.drain()
                    continue
                if path in (b"/slow", b"/slowbig"):
                    await self.gate.wait()
                data = BIG if path in (b"/big", b"/slowbig") else b"answer to " + path
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: %d\r\n\r\n%s"
                             % (len(data), data))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


class Resolver:
    """The parts of the resolver the task's path uses, for the one node."""

    def __init__(self, rec: NodeRecord) -> None:
        self.rec = rec

    async def record(self, node_id: str | None) -> NodeRecord:
        return self.rec

    async def revive(self, rec: NodeRecord) -> NodeRecord:
        return rec

    async def target(self, rec: NodeRecord, forwarded: bool) -> Target:
        return Target("http", rec.host, rec.port, False, [("x-node-secret", SECRET)])


class Edge:
    """One client connection to a manager's edge, in front of the node."""

    def __init__(self, node: Node, keep_alive: float = 5.0, raw: bool = True, keys: tuple[str, ...] = (),
                 bound_to: str = "") -> None:
        paths = ["/", "/download_file", "/slow", "/big", "/slowbig", "/trickle", "/first", "/after"]
        overrides: dict[str, Any] = {"redirect_to_node_path": {"get": paths, "post": paths}}
        if keys:
            overrides["client_auth"] = {"api_keys": list(keys)}
        cfg = load_config(None, environ={}, overrides=overrides)
        rt: Any = types.SimpleNamespace(
            cfg=cfg, manager_id=cfg.manager_id, cache=AddressCache(60), addresses=ConfirmedAddresses(),
            circuits=Circuits(), activity=ActivityRecorder(None, 1.0),  # type: ignore[arg-type]
            store=types.SimpleNamespace(secrets=types.SimpleNamespace(of=lambda rec: SECRET)))
        # as the store reads it from Redis (its status the plain string, not the enum's member)
        self.rec = NodeRecord.from_hash({"id": NID, "manager_id": cfg.manager_id, "status": "running",
                                         "host": "127.0.0.1", "port": str(node.port), "container_id": "c" * 64,
                                         "client": bound_to})
        assert self.rec.status == NodeStatus.RUNNING
        rt.cache.put(self.rec)
        rt.addresses.put(self.rec.cid, self.rec.id, Address("127.0.0.1", node.port))
        self.proxy = Proxy(rt, Resolver(self.rec))  # type: ignore[arg-type]
        app = ManagerApp(starlette.applications.Starlette(), cfg)
        app.state.proxy = self.proxy
        set_replica("r-1")  # (the app names its own)
        ucfg = Config(app, http="httptools", proxy_headers=False, server_header=False, log_config=None,
                      timeout_keep_alive=keep_alive)  # type: ignore[arg-type]
        ucfg.load()
        ucfg.loaded_app = app
        state = ServerState()
        state.default_headers = DATE
        self.protocol = EdgeHttpProtocol(ucfg, state, {}, asyncio.get_running_loop(), Limits())
        # as in the manager (access_log: False); here pytest's log capture would give it a handler
        self.protocol.access_log = False
        self.transport = Transport()
        self.protocol.connection_made(self.transport)  # type: ignore[arg-type]
        if not raw:
            self.protocol._raw_app = None  # the cycle's path, as before the raw path

    async def pooled(self) -> None:
        """An idle connection to the node in the pool, as after a first request."""
        conn, _ = await self.proxy.pool._get(("127.0.0.1", self.rec.port), 5)
        self.proxy.pool._put(conn)

    def send(self, data: bytes) -> None:
        self.protocol.data_received(data)


async def until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def get(path: bytes) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: m:8000\r\nCookie: node_id=%s\r\nUser-Agent: t\r\n\r\n" % (path, NID.encode())


def post(path: bytes, body: bytes) -> bytes:
    return (b"POST %s HTTP/1.1\r\nHost: m:8000\r\nCookie: node_id=%s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (path, NID.encode(), len(body), body))


async def with_node(test: Callable[[Node], Awaitable[None]]) -> None:
    node = await Node().start()
    try:
        await test(node)
    finally:
        node.close()


def answers(data: bytes) -> list[bytes]:
    """The bodies of the whole answers in what the client got, in order."""
    out = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ", 1)[1].split(b"\r\n", 1)[0])
        out.append(rest[:length])
        data = rest[length:]
    return out


async def test_the_raw_path_writes_the_bytes_the_cycles_path_writes_both_ways() -> None:
    async def run(node: Node) -> None:
        for request in (get(b"/"), get(b"/?a=1&b=%20x?c"), post(b"/download_file", b'{"file_path": "f100.bin"}')):
            got: dict[bool, tuple[bytes, bytes]] = {}
            for raw in (True, False):
                edge = Edge(node, raw=raw)
                await edge.pooled()
                before = len(node.seen)
                edge.send(request)
                await until(lambda e=edge: e.transport.writes != [], "the answer")  # type: ignore[misc]
                assert (edge.protocol.cycle is None) == raw, "the raw path was taken only where it is on"
                got[raw] = (node.seen[before], edge.transport.data)
            assert got[True] == got[False]
            to_node, to_client = got[True]
            assert b"x-node-secret: " + SECRET.encode() in to_node and b"host: 127.0.0.1" in to_node
            assert to_client.startswith(b"HTTP/1.1 200 OK\r\ndate: Sun, 06 Dec 2026 11:00:00 GMT\r\n")
            assert b"x-tsm-replica: r-1\r\n" in to_client and b"x-content-type-options: nosniff" in to_client

    await with_node(run)


async def test_a_credential_in_the_query_is_refused_as_before_and_never_sent() -> None:
    async def run(node: Node) -> None:
        edge = Edge(node)
        await edge.pooled()
        edge.send(get(b"/?x=1&api_key=abc"))
        await until(lambda: edge.transport.writes != [], "the answer")
        assert edge.transport.data.startswith(b"HTTP/1.1 400 ") and b"credentials are not accepted" in edge.transport.data
        assert node.seen == []

    await with_node(run)


def owner_of(key: str) -> str:
    """Whom a session made with this API key is bound to."""
    return ClientKeys([key], "X-API-Key", "").owner({"headers": [(b"x-api-key", key.encode())]})


def keyed(request: bytes, line: bytes) -> bytes:
    """The request with one more header line after its request line; a cookie joins its Cookie
    header, as a browser sends it."""
    if line.startswith(b"Cookie: "):
        return request.replace(b"Cookie: node_id=", line + b"; node_id=", 1)
    first, rest = request.split(b"\r\n", 1)
    return first + b"\r\n" + line + b"\r\n" + rest


async def test_with_api_keys_a_keyed_request_takes_the_raw_path_and_its_key_never_reaches_the_node() -> None:
    async def run(node: Node) -> None:
        for line in (b"X-API-Key: k-right", b"Cookie: tsm_api_key=k-right"):
            got: dict[bool, tuple[bytes, bytes]] = {}
            for raw in (True, False):
                # a session made with this key: bound to it, as the manager binds one
                edge = Edge(node, raw=raw, keys=("k-other", "k-right"), bound_to=owner_of("k-right"))
                await edge.pooled()
                before = len(node.seen)
                edge.send(keyed(post(b"/download_file", b"{}"), line))
                await until(lambda e=edge: e.transport.writes != [], "the answer")  # type: ignore[misc]
                assert (edge.protocol.cycle is None) == raw, "the raw path was taken only where it is on"
                got[raw] = (node.seen[before], edge.transport.data)
            assert got[True] == got[False], line
            to_node, to_client = got[True]
            assert to_client.startswith(b"HTTP/1.1 200 OK\r\n") and to_client.endswith(b"answer to /download_file")
            assert b"k-right" not in to_node and b"tsm_api_key" not in to_node.lower(), to_node
            assert b"x-api-key" not in to_node.lower()

    await with_node(run)


async def test_with_api_keys_a_request_without_its_sessions_key_is_refused_and_never_sent() -> None:
    async def run(node: Node) -> None:
        bound = owner_of("k-right")
        cases = [(b"", b"401", bound), (b"X-API-Key: k-wrong", b"401", bound), (b"Cookie: tsm_api_key=k-wron", b"401", bound),
                 (b"X-API-Key: k-righ", b"401", bound),
                 (b"X-API-Key: k-right ", b"200", bound),  # (trailing blanks are no part of a value)
                 (b"X-API-Key: k-other", b"403", bound),  # a valid key, but not the one the session was made with
                 # a session bound to no key (made before keys were set): no key, no answer all the same
                 (b"", b"401", ""), (b"X-API-Key: k-wrong", b"401", ""), (b"X-API-Key: k-other", b"200", "")]
        for line, status, bound_to in cases:
            edge = Edge(node, keys=("k-other", "k-right"), bound_to=bound_to)
            await edge.pooled()
            before = len(node.seen)
            edge.send(keyed(get(b"/"), line) if line else get(b"/"))
            await until(lambda e=edge: e.transport.writes != [], "the answer")  # type: ignore[misc]
            assert edge.transport.data.startswith(b"HTTP/1.1 " + status + b" "), (line, bound_to, edge.transport.data[:200])
            if status != b"200":
                assert len(node.seen) == before, (line, bound_to, "sent to the node")

    await with_node(run)


async def test_a_request_that_comes_while_a_raw_one_is_in_flight_is_answered_after_it() -> None:
    async def run(node: Node) -> None:
        edge = Edge(node)
        await edge.pooled()
        edge.send(get(b"/slow"))
        await until(lambda: len(node.seen) == 1, "the node to get the first request")
        edge.send(post(b"/", b"{}"))  # the client's next request, before the first is answered
        await asyncio.sleep(0.05)
        assert len(node.seen) == 1 and edge.transport.writes == [], "the second went on before the first's answer"
        node.gate.set()
        await until(lambda: len(answers(edge.transport.data)) == 2, "both answers")
        assert answers(edge.transport.data) == [b"answer to /slow", b"answer to /"]
        assert edge.protocol._raw_req is None and not edge.transport.closed

    await with_node(run)


async def test_a_large_answer_to_a_raw_request_goes_through_a_cycle_whole_and_the_next_is_raw_again() -> None:
    async def run(node: Node) -> None:
        edge = Edge(node)
        await edge.pooled()
        edge.send(get(b"/big"))
        await until(lambda: len(edge.transport.data) > len(BIG) and answers(edge.transport.data) == [BIG],
                    "the streamed answer")
        assert edge.protocol.cycle is not None  # made for it (a streamed answer wants ASGI's send)
        await until(lambda: edge.protocol.cycle.response_complete, "the cycle's end")
        await until(lambda: edge.proxy.pool.idle(("127.0.0.1", node.port)) is not None or False,
                    "the node connection back in the pool")
        await edge.pooled()
        cycle = edge.protocol.cycle
        edge.send(get(b"/after"))
        await until(lambda: len(answers(edge.transport.data)) == 2, "the next answer")
        assert answers(edge.transport.data)[1] == b"answer to /after"
        assert edge.protocol.cycle is cycle, "the next request made a cycle: it did not go the raw way"

    await with_node(run)


async def test_a_request_that_came_during_a_raw_one_whose_answer_is_streamed_is_answered_after_it() -> None:
    async def run(node: Node) -> None:
        edge = Edge(node)
        await edge.pooled()
        edge.send(get(b"/slowbig"))
        await until(lambda: len(node.seen) == 1, "the node to get the first request")
        edge.send(get(b"/after"))  # held while the first is in flight, then queued behind its cycle
        node.gate.set()
        await until(lambda: len(edge.transport.data) > len(BIG) and len(answers(edge.transport.data)) == 2,
                    "both answers")
        assert answers(edge.transport.data) == [BIG, b"answer to /after"]

    await with_node(run)


async def test_a_client_gone_before_its_answer_gets_nothing_and_the_node_connection_is_kept() -> None:
    async def run(node: Node) -> None:
        edge = Edge(node)
        await edge.pooled()
        edge.send(get(b"/slow"))
        await until(lambda: len(node.seen) == 1, "the node to get the request")
        edge.transport.closed = True
        edge.protocol.connection_lost(None)
        node.gate.set()
        pool = edge.proxy.pool
        await until(lambda: bool(pool._idle.get(("127.0.0.1", node.port))), "the node connection back in the pool")
        assert edge.transport.writes == [] and edge.protocol._raw_req is None

    await with_node(run)


async def test_keep_alive_closes_an_idle_connection_and_never_one_waiting_for_its_answer() -> None:
    async def run(node: Node) -> None:
        edge = Edge(node, keep_alive=0.1)
        await edge.pooled()
        edge.send(get(b"/first"))
        await until(lambda: len(answers(edge.transport.data)) == 1, "the first answer")
        first = edge.protocol.timeout_keep_alive_task
        assert first is not None
        edge.send(get(b"/slow"))  # in flight for longer than the keep-alive
        await until(lambda: edge.protocol.timeout_keep_alive_task is not first, "the keep-alive check to run")
        assert not edge.transport.closed, "the keep-alive closed a connection waiting for its answer"
        node.gate.set()
        await until(lambda: len(answers(edge.transport.data)) == 2, "the second answer")
        await until(lambda: edge.transport.closed, "the idle connection to be closed")
        assert answers(edge.transport.data) == [b"answer to /first", b"answer to /slow"]

    await with_node(run)


async def test_keep_alive_never_closes_under_an_answer_still_streaming_through_a_cycle() -> None:
    """A raw request whose answer went to a cycle (streamed) is still in flight: the raw path's keep-alive
    timer, armed by the request before it, must not count that time as idle."""
    async def run(node: Node) -> None:
        edge = Edge(node, keep_alive=0.1)
        await edge.pooled()
        edge.send(get(b"/first"))
        await until(lambda: len(answers(edge.transport.data)) == 1, "the first answer")
        edge.send(get(b"/trickle"))
        await until(lambda: edge.protocol.cycle is not None and len(edge.transport.data) > 1000,
                    "the streamed answer under way")
        await asyncio.sleep(0.4)  # four keep-alive periods with the answer half sent
        assert not edge.transport.closed, "the keep-alive closed a connection with an answer still streaming"
        node.gate.set()
        await until(lambda: len(edge.transport.data) > len(BIG) and len(answers(edge.transport.data)) == 2,
                    "the whole second answer")
        assert answers(edge.transport.data) == [b"answer to /first", BIG]
        await until(lambda: edge.transport.closed, "the idle connection to be closed after it")

    await with_node(run)


async def test_a_shutdown_during_a_raw_request_answers_it_then_closes() -> None:
    async def run(node: Node) -> None:
        edge = Edge(node)
        await edge.pooled()
        edge.send(get(b"/slow"))
        await until(lambda: len(node.seen) == 1, "the node to get the request")
        edge.protocol.shutdown()
        assert not edge.transport.closed
        node.gate.set()
        await until(lambda: edge.transport.closed, "the close after the answer")
        assert answers(edge.transport.data) == [b"answer to /slow"]
        assert b"connection: close\r\n" in edge.transport.data

    await with_node(run)


def test_httptools_refuses_every_node_header_uvicorn_would_refuse_to_send() -> None:
    # the raw path writes a node's headers without uvicorn's checks (HEADER_RE, HEADER_VALUE_RE),
    # since the node's answer was parsed by httptools: this holds httptools to refusing them all
    import httptools
    from uvicorn.protocols.http.httptools_impl import HEADER_RE, HEADER_VALUE_RE

    class Headers:
        def __init__(self) -> None:
            self.seen: list[tuple[bytes, bytes]] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            self.seen.append((name, value))

    for c in range(256):
        for name, value in ((b"x-" + bytes([c]), b"v"), (b"x", b"a" + bytes([c]) + b"b")):
            got = Headers()
            try:
                httptools.HttpResponseParser(got).feed_data(
                    b"HTTP/1.1 200 OK\r\n" + name + b": " + value + b"\r\ncontent-length: 0\r\n\r\n")
            except httptools.HttpParserError:
                continue
            for k, v in got.seen:
                assert not HEADER_RE.search(k.lower()) and not HEADER_VALUE_RE.search(v), (k, v)
