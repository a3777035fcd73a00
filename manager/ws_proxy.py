"""WebSocket proxy from a client to its node: text and binary frames both ways, close
codes passed through. Each direction awaits its send before reading the next frame,
so a slow reader slows the writer instead of growing a buffer in the manager."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from manager.resolve import Resolver, node_cookie
from nodeops.forward import VIA_HEADER
from shared import metrics
from shared.errors import ManagerError, NoLiveManager
from shared.models import NodeRecord

log = logging.getLogger(__name__)

PASS_HEADERS = ("cookie", "authorization", "user-agent", "origin")


async def proxy_socket(ws: WebSocket) -> None:
    """A client's socket to its cookie's node, at the same path."""
    resolver: Resolver = ws.app.state.resolver
    proxy = ws.app.state.proxy
    try:
        rec = await resolver.record(node_cookie(ws.cookies))
        if proxy.client_keys:  # another key's session is unknown here
            proxy.client_keys.check_bound(rec.client, ws.scope, rec.id)
        rec = await resolver.live(rec.id)
    except ManagerError as exc:
        await ws.close(code=1008, reason=exc.detail[:120])
        return
    headers = [(k, v) for k, v in ws.headers.items() if k in PASS_HEADERS]
    raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
    if proxy.client_keys:  # the client's API key stays here
        raw = proxy.client_keys.strip(raw)
    # nor any other credential of the manager's (console cookie, admin or internal token)
    headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in proxy.rules.to_node(raw)]
    subprotocols = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    path = ws.url.path + (f"?{ws.url.query}" if ws.url.query else "")
    await proxy_to_node(ws, rec, path, headers, subprotocols)


async def proxy_to_node(ws: WebSocket, rec: NodeRecord, path: str, headers: list[tuple[str, str]],
                        subprotocols: list[str]) -> None:
    """Connect to path on rec's node (or through its owner) with headers, then pump both ways."""
    rt = ws.app.state.rt
    resolver: Resolver = ws.app.state.resolver
    try:
        to = await resolver.target(rec, VIA_HEADER in ws.headers)
        rt.circuits.check(to.host)  # HostUnreachable is a NoLiveManager: closed at once, naming the host
    except NoLiveManager as exc:
        await ws.close(code=1013, reason=exc.detail[:120])
        return
    headers = [*headers, *to.headers]
    scheme = "wss" if to.scheme == "https" else "ws"
    url = f"{scheme}://{to.host}:{to.port}{path}"
    limit = rt.cfg.proxy.websocket_max_message_bytes
    try:
        upstream = await connect(url, additional_headers=headers, subprotocols=subprotocols or None,
                                 max_size=limit, max_queue=16, open_timeout=rt.cfg.proxy.connect_timeout_seconds,
                                 compression=None, ping_interval=None)
    except InvalidStatus as exc:
        await ws.close(code=1011, reason=f"node refused the upgrade: {exc.response.status_code}")
        return
    except (OSError, InvalidHandshake, asyncio.TimeoutError) as exc:
        if isinstance(exc, (asyncio.TimeoutError, TimeoutError)) and rec.manager_id != rt.manager_id:
            rt.circuits.failure(to.host, to.port, rec.manager_id, "websocket connect timed out")
            await ws.close(code=1013, reason=f"host {to.host} is unreachable"[:120])
            return
        await ws.close(code=1011, reason="node is not responding")
        return
    await ws.accept(subprotocol=upstream.subprotocol)
    rt.activity.begin(rec.id, rec.manager_id)  # an open socket is work in progress: never idle
    gauge = metrics.WEBSOCKETS.labels("proxy")
    gauge.inc()
    try:
        await _pump(ws, upstream, limit)
    finally:
        gauge.dec()
        rt.activity.end(rec.id)
        with contextlib.suppress(Exception):
            await upstream.close()


async def _pump(ws: WebSocket, upstream: ClientConnection, limit: int) -> None:
    async def client_to_node() -> None:
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                await upstream.close(code=msg.get("code", 1000) if msg.get("code") not in (1005, 1006) else 1000)
                return
            data = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
            if data is None:
                continue
            if len(data) > limit:
                await upstream.close(code=1009)
                await ws.close(code=1009, reason="message too big")
                return
            await upstream.send(data)

    async def node_to_client() -> None:
        try:
            async for data in upstream:
                if isinstance(data, str):
                    await ws.send_text(data)
                else:
                    await ws.send_bytes(data)
        except ConnectionClosed:
            pass
        code = upstream.close_code or 1000
        if code in (1005, 1006):
            code = 1011 if code == 1006 else 1000
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(code=code, reason=upstream.close_reason or "")

    tasks = [asyncio.create_task(client_to_node()), asyncio.create_task(node_to_client())]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # let the other side finish its close handshake briefly, then stop it
        if pending:
            await asyncio.wait(pending, timeout=2.0)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, WebSocketDisconnect, RuntimeError):
                await t

