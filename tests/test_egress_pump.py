"""The terminating egress proxy's copy loop on real TLS sockets: both directions at full speed at
once, a server that answers while the body still streams and ends its answer by closing, and a
transform on the way up. Bytes are compared by hash; the client must see the answer's clean end."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.egress.pump import pump
from testing.internet import _certificates

NAME = "pump.test"
UP = 12 << 20  # bytes the node sends
DOWN = 12 << 20  # bytes the server answers, while the node still sends


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ssl.SSLContext, ssl.SSLContext]]:
    folder: Path = tmp_path_factory.mktemp("pump-ca")
    _certificates(folder, [NAME])
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(folder / "server.pem", folder / "server.key")
    client = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    yield server, client


def _listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    return s


async def _server(lst: socket.socket, ctx: ssl.SSLContext, got: dict[str, object]) -> None:
    """Reads the whole upload while it answers DOWN bytes, then ends the answer by closing."""
    done = asyncio.Event()

    async def on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def read() -> None:
            h, n = hashlib.sha256(), 0
            while n < UP:
                data = await reader.read(1 << 16)
                if not data:
                    break
                h.update(data)
                n += len(data)
            got["up"] = (n, h.hexdigest())

        reading = asyncio.create_task(read())
        block = os.urandom(1 << 16)
        h = hashlib.sha256()
        for _ in range(DOWN // len(block)):
            writer.write(block)
            h.update(block)
            await writer.drain()
        got["down_sent"] = h.hexdigest()
        await reading
        writer.close()  # close_notify, then FIN: the answer is close-delimited
        await writer.wait_closed()
        done.set()

    srv = await asyncio.start_server(on, sock=lst, ssl=ctx)
    async with srv:
        await asyncio.wait_for(done.wait(), 120)


def _client(port: int, ctx: ssl.SSLContext, block: bytes) -> tuple[str, int, str]:
    """Sends the upload, then reads the answer to its end; a TLS end without close_notify raises
    (suppress_ragged_eofs off), so a truncated answer cannot pass for a whole one."""
    raw = socket.create_connection(("127.0.0.1", port))
    with ctx.wrap_socket(raw, server_hostname=NAME, suppress_ragged_eofs=False) as s:
        h = hashlib.sha256()
        for _ in range(UP // len(block)):
            s.sendall(block)
            h.update(block.replace(b"SECRET", b"public"))
        got, n = hashlib.sha256(), 0
        while data := s.recv(1 << 16):
            got.update(data)
            n += len(data)
        return got.hexdigest(), n, h.hexdigest()


def _proxy(lst: socket.socket, server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, up_port: int,
           errors: list[BaseException]) -> None:
    try:
        conn, _ = lst.accept()
        inner = server_ctx.wrap_socket(conn, server_side=True)
        up = client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", up_port)), server_hostname=NAME)
        try:
            pump(inner, up, threading.Event(), lambda b: b.replace(b"SECRET", b"public"))
        finally:
            inner.close()
            up.close()
    except BaseException as exc:  # the test asserts on it
        errors.append(exc)


@pytest.mark.parametrize("round_", range(3))
def test_both_directions_at_once_through_tls_arrive_whole_and_the_answer_ends_cleanly(
        tls: tuple[ssl.SSLContext, ssl.SSLContext], round_: int) -> None:
    server_ctx, client_ctx = tls
    up_lst, px_lst = _listener(), _listener()
    got: dict[str, object] = {}
    errors: list[BaseException] = []
    px = threading.Thread(target=_proxy, args=(px_lst, server_ctx, client_ctx, up_lst.getsockname()[1], errors))
    px.start()

    srv = threading.Thread(target=lambda: asyncio.run(_server(up_lst, server_ctx, got)))
    srv.start()
    try:
        # the server answers while the upload streams: both directions move through the proxy at once
        down_hash, down_n, up_hash = _client(px_lst.getsockname()[1], client_ctx, (b"SECRET" + os.urandom(1018)) * 64)
    finally:
        srv.join(60)
        px.join(30)
        up_lst.close()
        px_lst.close()
    assert not errors, errors
    assert down_n == DOWN and down_hash == got["down_sent"]
    assert got["up"] == (UP // 65536 * 65536, up_hash)
