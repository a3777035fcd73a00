"""``/diag``: an echo route whose behaviour the request chooses, for testing the HTTP path to a
node (framing, interim responses, early answers, resets). It touches nothing but its own
connection, and it is reachable through a manager only where a config proxies it.
Any method is accepted.

Query parameters (all optional):
  id        echoed in ``x-diag-id`` and at the start of the body
  status    final status (default 200)
  interim   comma-separated 1xx statuses written before the final answer (e.g. ``100,103``)
  size      body bytes (default: just the id); the bytes derive from the id
  chunked   1: stream the body without a length
  read      0: answer without reading the request body (an early answer)
  delay     seconds to wait before answering
  reset     1: send the head and part of the body, then reset the connection
The response says what arrived: ``x-diag-body-len`` and ``x-diag-body-crc`` (CRC-32).
"""

import asyncio
import socket
import struct
import zlib
from urllib.parse import parse_qsl

_INTERIM = {100: b"Continue", 102: b"Processing", 103: b"Early Hints"}
_MAX_SIZE = 64 << 20
_MAX_DELAY = 300.0


def _transport(send):
    """The connection under uvicorn's httptools/h11 protocols, for bytes ASGI cannot express."""
    cycle = getattr(send, "__self__", None)
    return getattr(cycle, "transport", None)


def body_bytes(ident: bytes, size: int) -> bytes:
    """What /diag answers for an id and a size: the id, then a pattern derived from it."""
    if size <= len(ident):
        return ident[:size] if size else b""
    seed = (ident + b"|") * (64 // (len(ident) + 1) + 1)
    return (ident + (seed * (size // len(seed) + 1)))[:size]


async def diag(scope, receive, send):
    q = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
    ident = q.get("id", "").encode()[:200]
    status = min(max(int(q.get("status", "200")), 200), 599)
    size = min(int(q.get("size", str(len(ident)))), _MAX_SIZE)
    received, crc = 0, 0
    if q.get("read", "1") != "0":
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunk = msg.get("body", b"")
            received += len(chunk)
            crc = zlib.crc32(chunk, crc)
            more = msg.get("more_body", False)
    delay = min(float(q.get("delay", "0")), _MAX_DELAY)
    if delay > 0:
        await asyncio.sleep(delay)
    transport = _transport(send)
    interim = [int(s) for s in q.get("interim", "").split(",") if s.strip()]
    if interim and transport is not None:
        for code in interim:
            if code in _INTERIM and code != 101:
                transport.write(b"HTTP/1.1 %d %s\r\nx-diag-id: %s\r\n\r\n" % (code, _INTERIM[code], ident))
    headers = [(b"x-diag-id", ident), (b"x-diag-body-len", str(received).encode()),
               (b"x-diag-body-crc", str(crc).encode()), (b"content-type", b"application/octet-stream")]
    no_body = status in (204, 304) or status < 200 or scope["method"] == "HEAD"
    body = b"" if status in (204, 304) else body_bytes(ident, size)
    chunked = q.get("chunked") == "1" and not no_body
    if not chunked and status not in (204, 304):
        headers.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    if q.get("reset") == "1" and transport is not None:
        await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
        sock = transport.get_extra_info("socket")
        if sock is not None:  # SO_LINGER 0: the close sends RST, as a crashed server's would
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()
        return
    if no_body:
        await send({"type": "http.response.body", "body": b""})
        return
    if chunked:
        step = 65536
        for i in range(0, len(body), step):
            await send({"type": "http.response.body", "body": body[i:i + step], "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        return
    await send({"type": "http.response.body", "body": body})


class Diag:
    """Serves /diag itself and hands everything else to the app: /diag needs uvicorn's own send
    (Starlette wraps it), whose connection it writes interim answers to and resets."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] == "/diag":
            await diag(scope, receive, send)
        else:
            await self.app(scope, receive, send)
