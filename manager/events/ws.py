"""``/ws/events``: a session's (or, with the admin token, every) node lifecycle events.

The handshake, ping/pong and keep-alive follow XAgent's MainServer: a first message
``{"status":"connect","success":...}``, ``{"type":"pong"}`` every keep-alive period,
and the session marked ``alive``/``close`` in Redis while it is watched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from manager.admin import api as admin
from manager.replica.runtime import Runtime
from manager.session.resolve import Resolver, node_cookie
from shared import metrics
from shared.errors import ManagerError
from shared.models import Event
from shared.store import ALL, Scope, compare_ids

log = logging.getLogger(__name__)

CLOSE_SILENT = 4408  # like HTTP 408: the client sent nothing for too long
CLOSE_OVERFLOW = 4429  # the client reads too slowly; it may resume with the last event id
CLOSE_UNAVAILABLE = 1013  # "try again later": Redis is unavailable


class ClientMessage(msgspec.Struct):
    type: str


def _event_msg(ev: Event) -> dict[str, Any]:
    return {"type": "event", "id": ev.id, "event": ev.type, "node_id": ev.node_id, "manager_id": ev.manager_id,
            "at": ev.at, "replica_id": ev.replica_id, "detail": ev.detail}


BEARER_PROTOCOL = "bearer."  # Sec-WebSocket-Protocol: bearer.<token>, for browsers (no headers there)


def _offered_token(ws: WebSocket) -> tuple[str | None, str | None]:
    """(admin token, subprotocol to accept) from the Authorization header or a bearer subprotocol."""
    offered = [p.strip() for p in ws.headers.get("sec-websocket-protocol", "").split(",") if p.strip()]
    others = [p for p in offered if not p.startswith(BEARER_PROTOCOL)]
    token = admin.bearer(ws.headers.get("authorization"))
    for p in offered:
        if p.startswith(BEARER_PROTOCOL):
            token = token or p[len(BEARER_PROTOCOL):]
            # a browser fails the handshake unless one offered protocol is accepted
            return token, others[0] if others else p
    return token, (others[0] if others else None)


async def _authenticate(rt: Runtime, ws: WebSocket, token: str | None) -> tuple[str | None, str | None, Any]:
    """(node_id filter, manager_id filter, data for the handshake); raises ManagerError."""
    if token:
        admin.verify(ws, token)
        mid = ws.query_params.get("manager_id") or None
        return None, mid, {"scope": "admin", "manager_id": mid}
    resolver: Resolver = ws.app.state.resolver
    rec = await resolver.record(node_cookie(ws.cookies))
    keys = ws.app.state.proxy.client_keys
    if keys:  # another key's session is unknown here
        keys.check_bound(rec.client, ws.scope, rec.id)
    return rec.id, None, rec.public()


async def events_socket(ws: WebSocket) -> None:
    rt: Runtime = ws.app.state.rt
    token, subprotocol = _offered_token(ws)
    await ws.accept(subprotocol=subprotocol)
    enc = msgspec.json.encode
    try:
        node_id, mid, data = await _authenticate(rt, ws, token)
    except ManagerError as exc:
        await ws.send_text(enc({"status": "connect", "success": False, "message": exc.detail,
                                "data": None}).decode())
        await ws.close(code=1000)
        return
    await stream_events(ws, node_id, mid, data, watch=node_id is not None)


async def stream_events(ws: WebSocket, node_id: str | None, mid: str | None, data: Any, *, watch: bool) -> None:
    """Serve an accepted, authenticated socket: the handshake message, what it missed after
    ?last_event_id=, then live events of node_id (or all, or of manager_id mid) until it goes.
    watch marks the node watched (a client session's own socket) while it is open."""
    rt: Runtime = ws.app.state.rt
    hub = ws.app.state.hub
    enc = msgspec.json.encode
    gauge = metrics.WEBSOCKETS.labels("events")
    gauge.inc()
    watched = False
    sub = None
    try:
        scope = await _scope(ws, node_id, mid, data)
        last = ws.query_params.get("last_event_id")
        try:
            if last:
                compare_ids(last, last)
        except ValueError:
            await ws.send_text(enc({"type": "error", "message": f"bad last_event_id: {last}"}).decode())
            last = None
        # from the stream's end when the client names no id: subscribed before the replay below,
        # which reads from there again, so an event the hub read meanwhile is not lost
        start = last or await rt.store.last_event_id(scope)
        sub = hub.subscribe(node_id, mid, scope, after=start)
        if watch and node_id:
            await rt.store.watch_started(node_id)
            watched = True
            rt.activity.begin(node_id, data["manager_id"])  # a watched session is not idle
        await ws.send_text(enc({"status": "connect", "success": True, "message": "connect success",
                                "data": data}).decode())
        await _replay(rt, ws, sub, start, gap_check=bool(last))
        await _serve(rt, ws, sub)
    except (WebSocketDisconnect, RuntimeError):
        pass
    except ManagerError as exc:
        # Redis went away mid-session: close cleanly, the client reconnects with its last event id
        log.warning("events_socket_closed error=%s", exc.detail)
        with contextlib.suppress(RuntimeError, WebSocketDisconnect):
            await ws.close(code=CLOSE_UNAVAILABLE, reason=exc.detail[:120])
    finally:
        if sub is not None:
            sub.close()
        gauge.dec()
        if watched and node_id:  # watched is only set with a node_id
            rt.activity.end(node_id)
            with contextlib.suppress(ManagerError):
                await rt.store.watch_ended(node_id)


async def _scope(ws: WebSocket, node_id: str | None, mid: str | None, data: Any) -> Scope:
    """The stream a socket is served from, whose ids its events carry and ?last_event_id= names:
    a manager_id's (an admin's ?manager_id=, a session's owner), else the cluster-wide one."""
    if mid:
        return mid
    if node_id:
        if isinstance(data, dict) and data.get("manager_id"):
            return str(data["manager_id"])
        resolver: Resolver = ws.app.state.resolver
        try:  # a console view of one node: its owner's stream while it has a record
            return (await resolver.record(node_id)).manager_id
        except ManagerError:
            return ALL
    return ALL


async def _replay(rt: Runtime, ws: WebSocket, sub: Any, last: str, *, gap_check: bool) -> None:
    """Send what the client missed after `last`, then mark the live queue to skip duplicates."""
    removed = await rt.store.stream_removed_after(last, sub.scope) if gap_check else None
    if removed is not None:
        # the upkeep removed this manager_id's stream (it was gone: checker/upkeep.py); what it
        # holds now, if anything, came after
        await ws.send_text(msgspec.json.encode({
            "type": "gap", "reason": "stream_removed", "removed_to": removed,
            "message": f"the events of manager_id {sub.scope} up to {removed} are no longer stored: its stream was "
                       "removed when no replica or session of it was left"}).decode())
    elif gap_check and await rt.store.events_trimmed_after(last, sub.scope):
        await ws.send_text(msgspec.json.encode({"type": "gap", "reason": "trimmed",
                                                "message": "some events are no longer stored"}).decode())
    cursor = last
    while True:
        batch = await rt.store.read_events(cursor, block_ms=None, count=500, scope=sub.scope)
        if not batch:
            break
        for ev in batch:
            cursor = ev.id
            if sub.wants(ev):
                await ws.send_text(msgspec.json.encode(_event_msg(ev)).decode())
    sub.replayed_to = cursor


async def _serve(rt: Runtime, ws: WebSocket, sub: Any) -> None:
    cfg = rt.cfg.events
    limit = rt.cfg.proxy.websocket_max_message_bytes
    last_seen = time.monotonic()
    replayed_to = getattr(sub, "replayed_to", None)

    async def reader() -> None:
        nonlocal last_seen
        while True:
            msg = await ws.receive()
            if msg["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(msg.get("code", 1000))
            last_seen = time.monotonic()
            raw = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
            if raw is None:
                continue
            if len(raw) > limit:
                await ws.close(code=1009, reason="message too big")
                return
            try:
                m = msgspec.json.decode(raw, type=ClientMessage)
            except msgspec.DecodeError as exc:
                await ws.send_text(msgspec.json.encode({"type": "error", "message": f"malformed message: {exc}"}).decode())
                continue
            if m.type == "ping":
                await ws.send_text('{"type":"pong"}')
            else:
                await ws.send_text(msgspec.json.encode(
                    {"type": "error", "message": f"unknown message type: {m.type}"}).decode())

    async def writer() -> None:
        next_keepalive = time.monotonic() + cfg.keepalive_seconds
        while True:
            timeout = max(0.0, min(next_keepalive, last_seen + cfg.client_timeout_seconds) - time.monotonic())
            try:
                ev = await asyncio.wait_for(sub.queue.get(), timeout)
            except TimeoutError:
                now = time.monotonic()
                if now >= last_seen + cfg.client_timeout_seconds:
                    await ws.close(code=CLOSE_SILENT, reason=f"no message for {cfg.client_timeout_seconds:g}s")
                    return
                if now >= next_keepalive:
                    await ws.send_text('{"type":"pong"}')
                    next_keepalive = now + cfg.keepalive_seconds
                continue
            if sub.overflowed:
                await ws.close(code=CLOSE_OVERFLOW, reason="too slow; resume with last_event_id")
                return
            if replayed_to and compare_ids(ev.id, replayed_to) <= 0:
                continue
            await ws.send_text(msgspec.json.encode(_event_msg(ev)).decode())

    tasks = [asyncio.create_task(reader()), asyncio.create_task(writer())]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            exc = t.exception()
            if exc is not None and not isinstance(exc, (WebSocketDisconnect, RuntimeError)):
                log.warning("events_socket_error error=%r", exc)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
