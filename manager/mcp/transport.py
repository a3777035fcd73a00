"""/mcp over Streamable HTTP, both revisions, on any replica.

The ``MCP-Protocol-Version`` header picks the revision: 2026-07-28 requests are self-contained
POSTs (no session: the node is named by the ``session`` handle argument, mirrored in
``Mcp-Param-Session``); anything else is 2025-11-25, whose ``Mcp-Session-Id`` is minted here and
kept in Redis (sessions.py), whose GET stream and resumable SSE answers live in Redis (streams.py).
Bad input gets the spec's JSON-RPC code with its HTTP status and changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from mcp.shared.inbound import (
    MCP_PARAM_HEADER_PREFIX,
    InboundLadderRejection,
    classify_inbound_request,
    find_duplicated_routing_header,
    validate_mcp_param_headers,
)
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse

from manager.edge.client_auth import ClientKeys
from manager.edge.disconnect import unless_client_leaves
from manager.mcp import tools
from manager.mcp.methods import LEGACY_VERSIONS, MODERN_VERSIONS, Call, Methods, SessionGone, as_rpc
from manager.mcp.sessions import McpSession, McpSessions
from manager.mcp.streams import Streams
from manager.mcp.wire import (
    HEADER_MISMATCH,
    INVALID_REQUEST,
    PARSE_ERROR,
    RpcError,
    error,
    json_answer,
    result,
    sse,
)
from manager.proxy.http_proxy import Proxy
from manager.replica.runtime import Runtime
from shared import metrics
from shared.errors import ManagerError

log = logging.getLogger(__name__)

CANCEL_TTL = 60.0  # a running call sees its cancellation within a progress interval
SESSION_HEADER = "mcp-session-id"
VERSION_HEADER = "mcp-protocol-version"
SSE_HEADERS = {"cache-control": "no-cache, no-transform", "x-accel-buffering": "no"}
_PARAM_PREFIX = MCP_PARAM_HEADER_PREFIX.lower()
_HANDLE_PARAM = (_PARAM_PREFIX + tools.HANDLE_HEADER.lower()).encode()
KNOWN_METHODS = frozenset({"initialize", "ping", "tools/list", "tools/call", "server/discover",
                           "notifications/initialized", "notifications/cancelled"})


class Gateway:
    """Serves /mcp; one per app."""

    def __init__(self, rt: Runtime, proxy: Proxy) -> None:
        self.rt = rt
        self.cfg = rt.cfg.mcp
        self.keys = ClientKeys(rt.cfg.api_keys, rt.cfg.client_auth.header, rt.cfg.client_auth.cookie)
        self.sessions = McpSessions(rt)
        self.methods = Methods(rt, proxy, self.sessions)
        self.streams = Streams(rt)

    async def handle(self, request: Request) -> Response:
        origin = request.headers.get("origin")
        if origin is not None and origin not in self.cfg.allowed_origins:
            # DNS rebinding: a browser page of another origin must not drive a local gateway
            return _refuse(RpcError(INVALID_REQUEST, f"Origin not allowed: {origin[:100]}", status=403))
        modern = request.headers.get(VERSION_HEADER) in MODERN_VERSIONS
        try:
            if request.method == "POST":
                return await self._post(request, modern)
            if modern:  # the stateless revision has neither a GET stream nor sessions to end
                return Response(status_code=405, headers={"Allow": "POST"})
            if request.method == "GET":
                return await self._get(request)
            return await self._delete(request)
        except RpcError as exc:
            return _refuse(exc)
        except ManagerError as exc:
            return _refuse(as_rpc(exc))

    # --- POST ------------------------------------------------------------------------------
    async def _post(self, request: Request, modern: bool) -> Response:
        accept = request.headers.get("accept", "")
        if not ("*/*" in accept or ("application/json" in accept and "text/event-stream" in accept)):
            raise RpcError(INVALID_REQUEST, "Accept must list application/json and text/event-stream", status=406)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise RpcError(INVALID_REQUEST, "Content-Type must be application/json", status=415)
        msg = _decode(await self._body(request))
        req_id, method = msg.get("id"), msg["method"]
        t0 = time.perf_counter()
        label = method if method in KNOWN_METHODS else "other"
        try:
            if modern:
                resp = await self._modern(request, msg)
            else:
                resp = await self._legacy(request, msg)
        except RpcError as exc:
            metrics.MCP_REQUESTS.labels(label, str(exc.code)).inc()
            return _refuse(exc, req_id, legacy_status=not modern)
        metrics.MCP_REQUESTS.labels(label, "ok").inc()
        metrics.MCP_SECONDS.labels(label).observe(time.perf_counter() - t0)
        return resp

    async def _body(self, request: Request) -> bytes:
        limit = self.cfg.max_message_bytes
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise RpcError(INVALID_REQUEST, f"message too large ({length} > {limit} bytes)", status=413)
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RpcError(INVALID_REQUEST, f"message too large (over {limit} bytes)", status=413)
                chunks.append(chunk)
        except ClientDisconnect:
            raise RpcError(INVALID_REQUEST, "the request body ended early", status=400) from None
        return b"".join(chunks)

    def _call(self, request: Request, version: str, modern: bool) -> Call:
        return Call(version=version, modern=modern, owner=self.keys.identity(request.scope),
                    client=request.app.state.proxy.client_ids.of(request.scope))

    async def _legacy(self, request: Request, msg: dict[str, Any]) -> Response:
        method, params, req_id = msg["method"], msg.get("params") or {}, msg.get("id")
        if method == "initialize" and "id" in msg:
            call = self._call(request, self.methods.negotiate(params), False)
            try:
                token, sess = await self.sessions.open("session", call.version, call.owner, call.client)
            except ManagerError as exc:
                raise as_rpc(exc) from None
            return json_answer(result(req_id, self.methods.initialize_result(sess.version)),
                               headers={"Mcp-Session-Id": token})
        sess = await self._session(request)
        call = self._call(request, sess.version, False)
        call.session = sess
        if "id" not in msg:
            if method == "notifications/cancelled":  # the call may run on any replica: say it in Redis
                rid = params.get("requestId")
                if isinstance(rid, (str, int)) and not isinstance(rid, bool) and len(str(rid)) <= 200:
                    await self.rt.store.mcp.cancel(sess.token_hash, json.dumps(rid), CANCEL_TTL)
            return Response(status_code=202)  # other notifications need nothing
        if method == "tools/call":
            h, rid = sess.token_hash, json.dumps(req_id)
            call.cancelled = lambda: self.rt.store.mcp.cancelled(h, rid)
        try:
            if method == "tools/call" and _progress_token(params) is not None:
                return await self._streamed(call, req_id, method, params)
            return json_answer(result(req_id, await self.methods.dispatch(call, method, params)))
        except SessionGone:
            await self.sessions.forget(sess)
            raise _GONE from None

    async def _session(self, request: Request) -> McpSession:
        token = request.headers.get(SESSION_HEADER)
        if not token:
            raise RpcError(INVALID_REQUEST, "Mcp-Session-Id is required (send initialize first)", status=400)
        version = request.headers.get(VERSION_HEADER)
        if version is not None and version not in LEGACY_VERSIONS:
            raise RpcError(INVALID_REQUEST, f"Unsupported MCP-Protocol-Version: {version[:40]}", status=400)
        sess = await self.sessions.find(token, self.keys.identity(request.scope), "session")
        if sess is None:
            raise _GONE
        return sess

    async def _streamed(self, call: Call, req_id: Any, method: str, params: dict[str, Any]) -> Response:
        token = _progress_token(params)
        assert call.session is not None

        async def produce(notify: Any) -> dict[str, Any]:
            async def progress(done: float, message: str) -> None:
                await notify({"jsonrpc": "2.0", "method": "notifications/progress",
                              "params": {"progressToken": token, "progress": done, "message": message}})

            call.progress = progress
            try:
                return result(req_id, await self.methods.dispatch(call, method, params))
            except RpcError as exc:
                return error(req_id, exc)
            except SessionGone:
                await self.sessions.forget(call.session)  # type: ignore[arg-type]
                return error(req_id, _GONE)

        frames = await self.streams.start(call.session, req_id, produce)
        return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)

    async def _modern(self, request: Request, msg: dict[str, Any]) -> Response:
        method, params, req_id = msg["method"], msg.get("params") or {}, msg.get("id")
        if "id" not in msg:
            return Response(status_code=202)  # no client notifications in this revision: acknowledged, dropped
        dup = find_duplicated_routing_header(request.headers.items())
        if dup is not None:
            raise RpcError(HEADER_MISMATCH, f"{dup} header appears more than once")
        verdict = classify_inbound_request(msg, headers=dict(request.headers))
        if isinstance(verdict, InboundLadderRejection):
            raise RpcError(verdict.code, verdict.message, verdict.data)
        call = self._call(request, verdict.protocol_version, True)
        if method == "tools/call":
            args = params.get("arguments") if isinstance(params, Mapping) else None
            mismatch = validate_mcp_param_headers(tools.HEADER_SCHEMA, args if isinstance(args, Mapping) else {},
                                                  request.headers)
            if mismatch is not None:
                raise RpcError(mismatch.code, mismatch.message, mismatch.data)
            # routing headers of other parameters are the node's business; the handle is a credential
            call.extra_headers = [(k, v) for k, v in request.scope["headers"]
                                  if k.startswith(_PARAM_PREFIX.encode()) and k != _HANDLE_PARAM]
        token = _progress_token(params)
        if token is None:
            return json_answer(result(req_id, await _until_disconnect(
                request, self.methods.dispatch(call, method, params))))
        return StreamingResponse(self._modern_stream(call, req_id, method, params, token),
                                 media_type="text/event-stream", headers=SSE_HEADERS)

    async def _modern_stream(self, call: Call, req_id: Any, method: str, params: dict[str, Any],
                             token: Any) -> AsyncIterator[bytes]:
        """Progress then the answer; the client closing the stream cancels the call (2026-07-28)."""
        queue: asyncio.Queue[bytes] = asyncio.Queue()

        async def progress(done: float, message: str) -> None:
            queue.put_nowait(sse(json.dumps({"jsonrpc": "2.0", "method": "notifications/progress", "params": {
                "progressToken": token, "progress": done, "message": message}})))

        call.progress = progress
        work = asyncio.ensure_future(self.methods.dispatch(call, method, params))
        try:
            while not work.done() or not queue.empty():
                getter = asyncio.ensure_future(queue.get())
                await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                else:
                    getter.cancel()
            try:
                answer = result(req_id, work.result())
            except RpcError as exc:
                answer = error(req_id, exc)
            yield sse(json.dumps(answer))
        finally:
            work.cancel()  # StreamingResponse stops this generator when the client goes: cancel the call

    # --- GET and DELETE (2025-11-25) --------------------------------------------------------
    async def _get(self, request: Request) -> Response:
        if "text/event-stream" not in request.headers.get("accept", "") and "*/*" not in request.headers.get(
                "accept", ""):
            raise RpcError(INVALID_REQUEST, "Accept must list text/event-stream", status=406)
        sess = await self._session(request)
        last = request.headers.get("last-event-id")
        if last:
            frames = await self.streams.resume(sess, last)
            if frames is None:
                raise RpcError(INVALID_REQUEST, "unknown or expired Last-Event-ID", status=400)
        else:
            frames = self.streams.listen(sess, self.streams.new_listen_id())
        return StreamingResponse(frames, media_type="text/event-stream", headers=SSE_HEADERS)

    async def _delete(self, request: Request) -> Response:
        sess = await self._session(request)
        await self.sessions.end(sess)
        return Response(status_code=204)

    async def close(self, grace: float = 20.0) -> None:
        await self.streams.close(grace)


_GONE = RpcError(INVALID_REQUEST, "session not found: it ended or expired; send initialize again", status=404)


def _refuse(exc: RpcError, req_id: Any = None, legacy_status: bool = False) -> Response:
    status = exc.status
    if legacy_status and status in (404,) and exc is not _GONE:
        status = 200  # 2025-11-25 clients read a 404 as "session gone": method errors stay in the body
    return json_answer(error(req_id, exc), status=status)


def _decode(raw: bytes) -> dict[str, Any]:
    """One JSON-RPC request or notification, or the spec's error for anything else."""
    try:
        msg = json.loads(raw)
    except (ValueError, RecursionError):
        raise RpcError(PARSE_ERROR, "Parse error", status=400) from None
    if isinstance(msg, list):
        raise RpcError(INVALID_REQUEST, "batches are not accepted: send one JSON-RPC message per POST", status=400)
    if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
        raise RpcError(INVALID_REQUEST, "not a JSON-RPC 2.0 message", status=400)
    if "method" not in msg:
        raise RpcError(INVALID_REQUEST, "this server sends no requests, so it takes no responses", status=400)
    if not isinstance(msg["method"], str) or not msg["method"]:
        raise RpcError(INVALID_REQUEST, "method must be a non-empty string", status=400)
    rid = msg.get("id", 0)
    if isinstance(rid, bool) or not isinstance(rid, (str, int)) or (isinstance(rid, str) and len(rid) > 200):
        raise RpcError(INVALID_REQUEST, "id must be a string or an integer", status=400)
    if "params" in msg and not isinstance(msg["params"], dict):
        raise RpcError(INVALID_REQUEST, "params must be an object", status=400)
    return msg


def _progress_token(params: Any) -> Any:
    meta = params.get("_meta") if isinstance(params, Mapping) else None
    token = meta.get("progressToken") if isinstance(meta, Mapping) else None
    return token if isinstance(token, (str, int)) and not isinstance(token, bool) else None


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await work unless the client goes first (2026-07-28: closing the request cancels it)."""
    result, here = await unless_client_leaves(request, work)
    if not here:
        log.info("mcp_call_cancelled reason=client_closed")
        raise RpcError(INVALID_REQUEST, "the client closed the request: cancelled", status=499)
    return result

