"""A hostile node for tests: a session's node whose server answers whatever the test asks.

A session controls its node completely (``register_new_tool`` runs code in the node's own server),
so the manager must survive any answer a node can send. This module is both sides:

* run inside a node (``python3 -c <this file>``; standard library only, Python >= 3.8), it is a tiny
  asyncio HTTP/1.1 + WebSocket server on ``NODE_PORT`` that honours the node secret (``NODE_SECRET``,
  or the file named by ``NODE_SECRET_FILE``: 401 without it) and answers each request as its *spec*
  says;
* imported by a test, it gives the manager config that makes every node of that manager a hostile one,
  and helpers to ask for an answer.

Usage in a test (the reference node image is kept; only its command is replaced)::

    from testing.hostile_node import hostile_config, spec_header, set_rules, stats

    m = start_manager(**hostile_config())   # with tests.conftest.NODE_IMAGE; or hostile_config(image=...)
    c = httpx.Client(base_url=m.url); c.post("/get_cookie")           # a normal session, hostile node
    c.get("/", headers=spec_header(head_bytes=1 << 30))               # one 1 GiB response header
    c.get("/", headers=spec_header(header_count=12800, header_size=65536))
    c.get("/", headers=spec_header(status=200, headers=[["set-cookie", "tsm_console=x"]],
                                   content_type="text/html", body="<script>...</script>"))
    set_rules(c, {"/execute_command_in_shell": {"endless": True}})   # sticky: for requests the test
    # does not write itself (the reference client); by path, "*" for every path
    start_manager(**hostile_config(rules={"/execute_tool": {"endless": True}}))  # from the start
    # (sessions the test cannot name a cookie for: MCP tool calls)
    stats(c)  # {"requests", "aborted", "written", "tagged", "ws_sent", "ws_close_codes"} as the node saw them

A spec is a JSON object; it comes from the request's ``x-hostile`` header, else its ``hostile`` query
parameter, else the sticky rule for its path (then "*"), else the default (200 ``{"ok": true}``,
which is also what the manager's readiness probe gets). Keys, all optional:

* ``status`` (200), ``reason``, ``headers`` ([[name, value], ...]), ``content_type``
  (application/json), ``body`` (a string), ``close`` (close the connection after the answer)
* ``head_bytes``: one header ``x-big`` whose value is this many bytes, written as it goes
* ``header_count`` / ``header_size``: that many headers ``x-h<i>`` of that many bytes each
* ``body_bytes``: a body of this length (content-length), written as it goes
* ``endless``: a chunked body that never ends (until the peer goes away)
* ``split`` / ``delay``: write the whole answer in pieces of ``split`` bytes, ``delay`` s apart
* ``tag``: count the bytes written of this answer in the stats' ``tagged`` under this name
* ``hang``: read the request and never answer; ``raw``: write these bytes (latin-1) and close
* ``read_delay``: wait this many seconds before reading the request's body; ``read_rate``: read
  it at this many bytes a second; ``echo_length``: answer
  ``{"length": <body bytes read>}``
* WebSocket upgrades (any path): ``ws_frames`` frames of ``ws_frame_bytes`` bytes (binary, text when
  ``ws_text``) sent at once after the handshake, then every message received is echoed

``x-hostile-set: {path: spec, ...}`` on any request stores sticky rules (``{}`` clears them) and
answers ``{"rules": ...}``; ``x-hostile-stats: 1`` answers the counters above; ``x-hostile-echo: 1``
answers ``{"target": ..., "headers": {...}}`` as the request reached the node. ``aborted`` counts
answers the peer cut short (reset or closed while the node was still writing).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import socket
import struct
from typing import Any
from urllib.parse import parse_qs, urlsplit

CHUNK = 1 << 16
_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

# --- the test side -----------------------------------------------------------------------


def hostile_config(image: str | None = None, rules: dict[str, dict[str, Any]] | None = None,
                   **over: Any) -> dict[str, Any]:
    """Manager config overrides whose nodes run this server (on the reference node image), each
    started with these sticky rules."""
    if image is None:
        image = os.environ.get("TSM_NODE_IMAGE", "toolserver-node:latest")
    with open(__file__, encoding="utf-8") as f:
        source = f.read()
    cfg: dict[str, Any] = {"node": {"creation_kwargs": {
        "image": image, "init": True, "mem_limit": "512m", "labels": {"toolserver-manager.test": "1"},
        "command": ["python3", "-c", source], "environment": {"HOSTILE_RULES": json.dumps(rules or {})}}}}
    for k, v in over.items():
        cfg[k] = v
    return cfg


def spec_header(**spec: Any) -> dict[str, str]:
    """Request headers asking the hostile node for this answer."""
    return {"x-hostile": json.dumps(spec)}


def set_rules(client: Any, rules: dict[str, dict[str, Any]], path: str = "/") -> Any:
    """Store sticky rules on the client's session's node (through the manager, at a proxied GET path)."""
    r = client.get(path, headers={"x-hostile-set": json.dumps(rules)})
    assert r.status_code == 200, r.text
    return r.json()


def stats(client: Any, path: str = "/") -> dict[str, int]:
    """What the client's session's node has seen and written so far."""
    r = client.get(path, headers={"x-hostile-stats": "1"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def raw_websocket(port: int, path: str, node_id: str, rcvbuf: int = 65536) -> socket.socket:
    """A WebSocket handshake on a plain socket that then reads nothing: the client that does not read."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    s.sendall(f"GET {path} HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
              f"sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\ncookie: node_id={node_id}\r\n\r\n".encode())
    head = b""
    while b"\r\n\r\n" not in head:  # a byte at a time: nothing of the frames after it is read
        b = s.recv(1)
        assert b, head
        head += b
    assert head.startswith(b"HTTP/1.1 101"), head
    return s


def close_code(s: socket.socket, timeout: float = 60) -> int | None:
    """Reads frames until the server's close frame: its code (None if the connection ended first)."""
    s.settimeout(timeout)
    buf = bytearray()  # linear: a test's thread shares the GIL with its other threads
    i = 0
    while True:
        while True:  # parse what is whole
            if i + 2 > len(buf):
                break
            op, n, j = buf[i] & 0x0F, buf[i + 1] & 0x7F, i + 2
            if n == 126:
                n, j = (struct.unpack("!H", buf[j:j + 2])[0], j + 2) if j + 2 <= len(buf) else (-1, j)
            elif n == 127:
                n, j = (struct.unpack("!Q", buf[j:j + 8])[0], j + 8) if j + 8 <= len(buf) else (-1, j)
            if n < 0 or j + n > len(buf):
                break
            if op == 8:
                return int(struct.unpack("!H", buf[j:j + 2])[0]) if n >= 2 else 1005
            i = j + n
        del buf[:i]
        i = 0
        try:
            chunk = s.recv(1 << 20)
        except OSError:
            return None
        if not chunk:
            return None
        buf += chunk


# --- the node side -----------------------------------------------------------------------

STATS: dict[str, Any] = {"requests": 0, "aborted": 0, "written": 0, "ws_sent": 0, "connections": 0,
                         "ws_close_codes": [], "tagged": {}}
RULES: dict[str, dict[str, Any]] = json.loads(os.environ.get("HOSTILE_RULES") or "{}")


def _secret() -> bytes:
    path = os.environ.get("NODE_SECRET_FILE")
    if path:
        with open(path, "rb") as f:
            return f.read().strip()
    return os.environ.get("NODE_SECRET", "").encode()


async def _read_head(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]] | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _ = ([*lines[0].split(" "), "", ""])[:3]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return method, target, headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str], rate: float = 0) -> int:
    """Reads the request's body (at most rate bytes a second when rate is set); its length."""
    async def take(n: int) -> None:
        while n > 0:
            k = min(n, CHUNK) if rate else n
            await reader.readexactly(k)
            n -= k
            if rate:
                await asyncio.sleep(k / rate)

    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return total
            await take(size)
            total += size
            await reader.readexactly(2)
    n = int(headers.get("content-length") or 0)
    await take(n)
    return n


def _spec(target: str, headers: dict[str, str]) -> dict[str, Any]:
    if "x-hostile" in headers:
        return dict(json.loads(headers["x-hostile"]))
    parts = urlsplit(target)
    q = parse_qs(parts.query)
    if "hostile" in q:
        return dict(json.loads(q["hostile"][0]))
    return dict(RULES.get(parts.path) or RULES.get("*") or {})


class _Out:
    """Writes with flow control, counting bytes; split/delay apply to every write."""

    def __init__(self, writer: asyncio.StreamWriter, spec: dict[str, Any]) -> None:
        self.w = writer
        self.split = int(spec.get("split") or 0)
        self.delay = float(spec.get("delay") or 0)
        self.tag = str(spec.get("tag") or "")

    async def send(self, data: bytes) -> None:
        pieces = [data[i:i + self.split] for i in range(0, len(data), self.split)] if self.split else [data]
        for p in pieces:
            self.w.write(p)
            await self.w.drain()
            STATS["written"] += len(p)
            if self.tag:
                STATS["tagged"][self.tag] = STATS["tagged"].get(self.tag, 0) + len(p)
            if self.delay:
                await asyncio.sleep(self.delay)

    async def repeat(self, byte: bytes, n: int) -> None:
        block = byte * CHUNK
        while n > 0:
            await self.send(block[:min(n, CHUNK)])
            n -= CHUNK


async def _answer(out: _Out, spec: dict[str, Any]) -> None:
    if "raw" in spec:
        await out.send(str(spec["raw"]).encode("latin-1"))
        return
    status = int(spec.get("status", 200))
    body = str(spec.get("body", '{"ok": true}')).encode()
    head = f"HTTP/1.1 {status} {spec.get('reason', 'OK')}\r\ncontent-type: " \
           f"{spec.get('content_type', 'application/json')}\r\n"
    for k, v in spec.get("headers") or []:
        head += f"{k}: {v}\r\n"
    await out.send(head.encode("latin-1"))
    if spec.get("head_bytes"):
        await out.send(b"x-big: ")
        await out.repeat(b"a", int(spec["head_bytes"]))
        await out.send(b"\r\n")
    for i in range(int(spec.get("header_count") or 0)):
        await out.send(f"x-h{i}: ".encode())
        await out.repeat(b"b", int(spec.get("header_size") or 1))
        await out.send(b"\r\n")
    if spec.get("endless"):
        await out.send(b"transfer-encoding: chunked\r\n\r\n")
        block = b"%x\r\n%s\r\n" % (CHUNK, b"c" * CHUNK)
        while True:
            await out.send(block)
    if spec.get("body_bytes") is not None:
        n = int(spec["body_bytes"])
        await out.send(f"content-length: {n}\r\n\r\n".encode())
        await out.repeat(b"d", n)
        return
    await out.send(f"content-length: {len(body)}\r\n\r\n".encode() + body)


def _frame(opcode: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 127, n)
    return head + payload


async def _websocket(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     headers: dict[str, str], spec: dict[str, Any]) -> None:
    accept = base64.b64encode(hashlib.sha1(headers.get("sec-websocket-key", "").encode() + _GUID).digest())
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                 b"sec-websocket-accept: " + accept + b"\r\n\r\n")
    opcode = 1 if spec.get("ws_text") else 2
    size = int(spec.get("ws_frame_bytes") or 0)
    lock = asyncio.Lock()

    async def flood() -> None:
        for _ in range(int(spec.get("ws_frames") or 0)):
            frame = _frame(opcode, (b"t" if opcode == 1 else b"\x00") * size)
            async with lock:
                writer.write(frame)
            await writer.drain()
            STATS["ws_sent"] += len(frame)

    sender = asyncio.ensure_future(flood())  # read while it sends: a close is seen even then
    try:
        await _ws_echo(reader, writer, lock)
    finally:
        sender.cancel()


async def _ws_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, lock: asyncio.Lock) -> None:
    while True:  # echo until close
        b0, b1 = await reader.readexactly(2)
        n = b1 & 0x7F
        if n == 126:
            n = struct.unpack("!H", await reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await reader.readexactly(8))[0]
        mask = await reader.readexactly(4) if b1 & 0x80 else b"\0\0\0\0"
        data = bytes(c ^ mask[i % 4] for i, c in enumerate(await reader.readexactly(n)))
        op = b0 & 0x0F
        if op == 8:
            STATS["ws_close_codes"].append(struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005)
            async with lock:  # after a whole frame of the flood, never inside one
                writer.write(_frame(8, data[:2]))
            return
        async with lock:
            if op == 9:
                writer.write(_frame(10, data))
            elif op in (1, 2):
                writer.write(_frame(op, data))
        await writer.drain()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    STATS["connections"] += 1
    secret = _secret()
    try:
        while True:
            got = await _read_head(reader)
            if got is None:
                return
            _method, target, headers = got
            asked = _spec(target, headers) if "x-hostile-set" not in headers else {}
            if asked.get("read_delay"):
                await asyncio.sleep(float(asked["read_delay"]))
            length = await _read_body(reader, headers, float(asked.get("read_rate") or 0))
            STATS["requests"] += 1
            if not secret or headers.get("x-node-secret", "").encode() != secret:
                msg = b'{"detail": "missing or wrong node secret"}'
                writer.write(b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(msg), msg))
                await writer.drain()
                continue
            if "x-hostile-set" in headers:
                rules = json.loads(headers["x-hostile-set"])
                if rules:
                    RULES.update(rules)
                else:
                    RULES.clear()
                spec: dict[str, Any] = {"body": json.dumps({"rules": RULES})}
            elif "x-hostile-stats" in headers:
                spec = {"body": json.dumps(STATS)}
            elif "x-hostile-echo" in headers:  # what reached the node: the target and headers
                spec = {"body": json.dumps({"target": target, "headers": headers})}
            elif asked.get("echo_length"):
                spec = {**asked, "body": json.dumps({"length": length})}
            else:
                spec = asked
            if headers.get("upgrade", "").lower() == "websocket":
                await _websocket(reader, writer, headers, spec)
                return
            if spec.get("hang"):
                await asyncio.Event().wait()
            out = _Out(writer, spec)
            await _answer(out, spec)
            if spec.get("close") or "raw" in spec:
                return
    except (ConnectionError, asyncio.IncompleteReadError):
        STATS["aborted"] += 1
    finally:
        writer.close()


async def _main() -> None:
    server = await asyncio.start_server(_serve, os.environ.get("NODE_HOST", "0.0.0.0"),
                                        int(os.environ.get("NODE_PORT", "31942")), limit=1 << 20)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_main())
