"""WebSocket proxy from a client to its node: text and binary frames both ways, close
codes passed through. Each direction awaits its send before reading the next frame,
so a slow reader slows the writer instead of growing a buffer in the manager.

What one socket can hold is bounded: a message over ``proxy.websocket_max_message_bytes``
closes it with 1009; from the node at most one frame waits in the client library's queue;
a client that has not taken a node's message within ``proxy.websocket_send_timeout_seconds``
is closed with 1011. So a socket holds at most about three messages (one queued, one in
hand, one in the client's socket buffer), and a session at most
``proxy.websocket_max_per_session`` sockets on a replica.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from typing import Any

from starlette.websockets import WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.typing import Subprotocol

from manager.edge.protocol import ABORT_EXTENSION
from manager.edge.responses import json_response
from manager.session.resolve import Resolver, node_cookie
from nodeops.forward import VIA_HEADER
from shared import metrics
from shared.errors import ManagerError, NoLiveManager
from shared.models import NodeRecord

log = logging.getLogger(__name__)

PASS_HEADERS = ("cookie", "authorization", "user-agent", "origin")
# open proxied sockets per session on this replica (one event loop: no lock needed)
_OPEN: collections.Counter[str] = collections.Counter()


class _ClientTooSlow(Exception):
    pass


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
    # the client's key and any other credential of the manager's are dropped in proxy_to_node
    key_header = proxy.client_keys.header.decode("latin-1")  # for an owner's replica to check
    headers = [(k, v) for k, v in ws.headers.items() if k in PASS_HEADERS or k == key_header]
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
    cap = rt.cfg.proxy.websocket_max_per_session
    if cap and _OPEN[rec.id] >= cap:
        # refused before the upgrade, with a status a client can read (not a bare 403)
        await ws.send_denial_response(json_response(
            {"detail": f"this session already has {cap} open sockets on this replica "
                       "(proxy.websocket_max_per_session)"}, status=503))
        return
    _OPEN[rec.id] += 1
    try:
        await _open_and_pump(ws, rt, rec, to, path, headers, subprotocols)
    finally:
        _OPEN[rec.id] -= 1
        if _OPEN[rec.id] <= 0:
            del _OPEN[rec.id]


async def _open_and_pump(ws: WebSocket, rt: Any, rec: NodeRecord, to: Any, path: str,
                         headers: list[tuple[str, str]], subprotocols: list[str]) -> None:
    if not to.via_owner:  # to the node: no key, cookie or token of the manager's (the owner drops them itself)
        raw = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers]
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ws.app.state.proxy.for_node(raw)]
    headers = [*headers, *to.headers]
    scheme = "wss" if to.scheme == "https" else "ws"
    url = f"{scheme}://{to.host}:{to.port}{path}"
    limit = rt.cfg.proxy.websocket_max_message_bytes
    try:
        upstream = await connect(url, additional_headers=headers, subprotocols=[Subprotocol(s) for s in subprotocols] or None,
                                 # one frame waits at most: flow control holds the rest in the node
                                 max_size=limit, max_queue=1, open_timeout=rt.cfg.proxy.connect_timeout_seconds,
                                 compression=None, ping_interval=None)
    except InvalidStatus as exc:
        await ws.close(code=1011, reason=f"node refused the upgrade: {exc.response.status_code}")
        return
    except (TimeoutError, OSError, InvalidHandshake) as exc:
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
        await _pump(ws, upstream, limit, rt.cfg.proxy.websocket_send_timeout_seconds)
    finally:
        gauge.dec()
        rt.activity.end(rec.id)
        with contextlib.suppress(Exception):
            await upstream.close()


async def _pump(ws: WebSocket, upstream: ClientConnection, limit: int, send_timeout: float) -> None:
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
        reason = None
        try:
            async for data in upstream:
                send = ws.send_text(data) if isinstance(data, str) else ws.send_bytes(data)
                try:
                    # the send waits while the client's socket buffer is full: a client that does
                    # not read is closed, never left to pile the node's messages up here
                    await asyncio.wait_for(send, send_timeout or None)
                except TimeoutError:
                    raise _ClientTooSlow from None
        except _ClientTooSlow:
            code, reason = 1011, f"client did not read for {send_timeout:g} s (proxy.websocket_send_timeout_seconds)"
            with contextlib.suppress(Exception):
                await asyncio.wait_for(upstream.close(code=1011, reason="client too slow"), 2.0)
            # what sits in the client's socket buffer stays there until it reads: it gets one more
            # send_timeout to take it and the close, then its connection is dropped
            abort = (ws.scope.get("extensions") or {}).get(ABORT_EXTENSION, {}).get("abort")
            if abort is not None:
                asyncio.get_running_loop().call_later(send_timeout, _quietly, abort)
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == 1009:  # the node's message was over the limit
                code, reason = 1009, f"node message over {limit} bytes (proxy.websocket_max_message_bytes)"
        if reason is None:
            code = upstream.close_code or 1000
            if code in (1005, 1006):
                code = 1011 if code == 1006 else 1000
            reason = upstream.close_reason or ""
        # the close waits for room in the client's buffer like any send: bounded the same way
        with contextlib.suppress(RuntimeError, OSError, WebSocketDisconnect, asyncio.TimeoutError):
            await asyncio.wait_for(ws.close(code=code, reason=reason[:120]), send_timeout or None)

    tasks = [asyncio.create_task(client_to_node()), asyncio.create_task(node_to_client())]
    try:
        _done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        # let the other side finish its close handshake briefly, then stop it
        if pending:
            await asyncio.wait(pending, timeout=2.0)
    finally:
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed, WebSocketDisconnect, RuntimeError):
                await t


def _quietly(fn: Any) -> None:
    with contextlib.suppress(Exception):
        fn()
