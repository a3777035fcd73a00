"""The MCP methods the gateway serves, each a plain function of decoded params to a result.

Both revisions share them; the revision only changes where the session comes from (the
Mcp-Session-Id's record, or the ``session`` handle argument) and the result's shape.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcp_types import methods as spec
from mcp_types.version import (
    HANDSHAKE_PROTOCOL_VERSIONS,
    LATEST_HANDSHAKE_VERSION,
    MODERN_PROTOCOL_VERSIONS,
)
from pydantic import ValidationError

from manager.mcp import tools
from manager.mcp.sessions import McpSession, McpSessions
from manager.mcp.wire import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    SERVER_ERROR,
    RpcError,
)
from manager.proxy.http_proxy import Proxy
from manager.replica.runtime import Runtime
from shared import __version__
from shared.errors import InvalidNode, ManagerError

# handshake revisions whose wire this transport speaks (sessions, Streamable HTTP, no batches)
LEGACY_VERSIONS = tuple(v for v in HANDSHAKE_PROTOCOL_VERSIONS if v >= "2025-03-26")
MODERN_VERSIONS = tuple(MODERN_PROTOCOL_VERSIONS)
SERVER_INFO = {"name": "toolserver-manager", "version": __version__}
CAPABILITIES: dict[str, Any] = {"tools": {"listChanged": False}}
INSTRUCTIONS = ("Each session is a private sandbox (a container with its own workspace). Over the "
                f"stateless revision, call {tools.CREATE} first and pass its handle as `{tools.HANDLE_ARG}`.")
NODE_NOT_FOUND = "The tool {} is not found!"  # the node's own words for an unknown tool

Progress = Callable[[float, str], Awaitable[None]]


class SessionGone(Exception):
    """The Mcp-Session-Id names a session whose node is gone: the client must start over (404)."""


@dataclass
class Call:
    """One request as the methods see it."""

    version: str
    modern: bool
    owner: str  # the client's identity (API key hash) that sessions are bound to
    client: str  # the quota identity (quota.client_header)
    session: McpSession | None = None  # 2025-11-25: the Mcp-Session-Id's session
    extra_headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # passed on to the node
    progress: Progress | None = None
    cancelled: Callable[[], Awaitable[bool]] | None = None  # 2025-11-25: did the client cancel it?


class Methods:
    def __init__(self, rt: Runtime, proxy: Proxy, sessions: McpSessions) -> None:
        self.rt = rt
        self.proxy = proxy
        self.sessions = sessions
        self.image = rt.backend.image

    # --- 2025-11-25 handshake -----------------------------------------------------------
    def negotiate(self, params: Mapping[str, Any]) -> str:
        """The handshake revision to speak: the client's when this server has it, else the latest."""
        wanted = params.get("protocolVersion")
        version = wanted if wanted in LEGACY_VERSIONS else LATEST_HANDSHAKE_VERSION
        validate("initialize", version, params)
        return version

    def initialize_result(self, version: str) -> dict[str, Any]:
        return shaped("initialize", version, {"protocolVersion": version, "capabilities": CAPABILITIES,
                                              "serverInfo": SERVER_INFO, "instructions": INSTRUCTIONS})

    # --- 2026-07-28 ----------------------------------------------------------------------
    def discover(self, version: str) -> dict[str, Any]:
        return shaped("server/discover", version, {
            "supportedVersions": [*MODERN_VERSIONS, *LEGACY_VERSIONS], "capabilities": CAPABILITIES,
            "instructions": INSTRUCTIONS, "resultType": "complete", "ttlMs": 0, "cacheScope": "public"})

    # --- both ----------------------------------------------------------------------------
    async def dispatch(self, call: Call, method: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """The result of one request, or RpcError / SessionGone."""
        if method == "initialize":  # 2025-11-25: once per session, and only to open it
            raise RpcError(INVALID_REQUEST if not call.modern else METHOD_NOT_FOUND,
                           "initialize opens a session: send it without Mcp-Session-Id" if not call.modern
                           else "Method not found: initialize (this revision has no handshake)")
        validate(method, call.version, params)
        if method == "server/discover":
            return self.discover(call.version)
        if method == "ping":
            return shaped(method, call.version, self._complete(call, {}))
        if method == "tools/list":
            return shaped(method, call.version, await self.list_tools(call))
        if method == "tools/call":
            return shaped(method, call.version, self._complete(call, await self.call_tool(call, params)))
        raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}")

    async def list_tools(self, call: Call) -> dict[str, Any]:
        if call.modern:
            cached = await self.rt.store.mcp.tools_get(self.image)
            node_tools = json.loads(cached) if cached else []
            listed = [tools.CREATE_TOOL, tools.RELEASE_TOOL,
                      *(tools.with_handle(t) for t in [tools.UPLOAD_TOOL, *node_tools])]
            # until a node was seen the list is incomplete: tell clients not to keep it
            ttl = int(self.rt.cfg.mcp.tools_ttl_seconds * 1000) if cached else 0
            return {"tools": listed, "resultType": "complete", "ttlMs": ttl, "cacheScope": "private"}
        assert call.session is not None
        return {"tools": [tools.UPLOAD_TOOL, *await self.node_tools(call, call.session.node_id)]}

    async def node_tools(self, call: Call, node_id: str) -> list[dict[str, Any]]:
        """The node's own tool list (tools differ per node: XAgent registers new ones at run time)."""
        status, body = await self._node(call, node_id, "/get_available_tools", b"{}")
        try:
            listed = tools.from_node(json.loads(body).get("tools_json")) if status == 200 else None
        except (ValueError, AttributeError):
            listed = None
        if listed is None:
            raise RpcError(SERVER_ERROR, f"the session's node could not list its tools ({status})", status=502)
        await self.rt.store.mcp.tools_put(self.image, json.dumps(listed), max(self.rt.cfg.mcp.tools_ttl_seconds * 10,
                                                                              60.0))
        return listed

    async def call_tool(self, call: Call, params: Mapping[str, Any]) -> dict[str, Any]:
        name = params["name"]
        args = dict(params.get("arguments") or {})
        if call.modern:
            if name == tools.CREATE:
                return await self._create(call)
            sess = await self._handle(call, args.pop(tools.HANDLE_ARG, None))
            if name == tools.RELEASE:
                await self.sessions.end(sess)
                return tools.text_result("released")
            node_id = sess.node_id
        else:
            assert call.session is not None
            if name in (tools.CREATE, tools.RELEASE):
                raise RpcError(INVALID_PARAMS, f"Unknown tool: {name} (this revision ends a session with DELETE)")
            node_id = call.session.node_id
        if name == tools.UPLOAD:
            return await self._upload(call, node_id, args)
        body = json.dumps({"tool_name": name, "arguments": args}).encode()
        work = self._node(call, node_id, "/execute_tool", body, call.extra_headers)
        status, answer = await (supervise(work, self.rt.cfg.mcp.progress_interval_seconds, call.progress,
                                          call.cancelled) if call.progress or call.cancelled else work)
        if status == 404 and _detail(answer) == NODE_NOT_FOUND.format(name):
            raise RpcError(INVALID_PARAMS, f"Unknown tool: {name}")
        return tools.node_result(status, answer)

    async def _create(self, call: Call) -> dict[str, Any]:
        try:
            token, sess = await self.sessions.open("handle", call.version, call.owner, call.client)
        except ManagerError as exc:
            raise as_rpc(exc) from None
        try:  # the catalogue tools/list serves without a session comes from the nodes themselves
            await self.node_tools(call, sess.node_id)
        except (RpcError, ManagerError):
            pass
        return tools.text_result(token, structured={tools.HANDLE_ARG: token})

    async def _handle(self, call: Call, handle: Any) -> McpSession:
        sess = await self.sessions.find(handle, call.owner, "handle") if isinstance(handle, str) else None
        if sess is None:
            raise RpcError(INVALID_PARAMS, f"unknown or released `{tools.HANDLE_ARG}` handle: call {tools.CREATE}")
        return sess

    async def _upload(self, call: Call, node_id: str, args: dict[str, Any]) -> dict[str, Any]:
        path, content = args.get("path"), args.get("content_base64")
        if not isinstance(path, str) or not path or not isinstance(content, str):
            raise RpcError(INVALID_PARAMS, "upload_file takes `path` and `content_base64` (strings)")
        if any(ord(ch) < 32 or ch == "\x7f" for ch in path):
            raise RpcError(INVALID_PARAMS, "upload_file: `path` has control characters")
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise RpcError(INVALID_PARAMS, "content_base64 is not valid base64") from None
        boundary = secrets.token_hex(16)
        name = json.dumps(path, ensure_ascii=False)  # quoted, with quotes and backslashes escaped
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename={name}\r\n"
                f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        status, answer = await self._node(call, node_id, "/upload_file", body,
                                          content_type=f"multipart/form-data; boundary={boundary}")
        if 200 <= status < 300:
            return tools.text_result(f"wrote {len(data)} bytes to {path}")
        return tools.node_result(status, answer)

    async def _node(self, call: Call, node_id: str, path: str, body: bytes,
                    extra: list[tuple[bytes, bytes]] | None = None,
                    content_type: str = "application/json") -> tuple[int, bytes]:
        try:
            return await self.proxy.call(node_id, path, body, content_type, extra)
        except InvalidNode:
            if call.modern:
                raise RpcError(INVALID_PARAMS, f"unknown or released `{tools.HANDLE_ARG}` handle") from None
            raise SessionGone() from None
        except ManagerError as exc:
            raise as_rpc(exc) from None

    @staticmethod
    def _complete(call: Call, result: dict[str, Any]) -> dict[str, Any]:
        return {**result, "resultType": "complete"} if call.modern else result


def validate(method: str, version: str, params: Mapping[str, Any] | None) -> None:
    """The spec's schema for this method at this revision, or METHOD_NOT_FOUND / INVALID_PARAMS."""
    try:
        spec.validate_client_request(method, version, params)
    except KeyError:
        raise RpcError(METHOD_NOT_FOUND, f"Method not found: {method}") from None
    except ValidationError as exc:
        raise RpcError(INVALID_PARAMS, f"Invalid params for {method}: {exc.error_count()} error(s)",
                       data=[{"loc": list(map(str, e["loc"])), "msg": e["msg"]} for e in exc.errors()[:5]]) from None


def shaped(method: str, version: str, data: dict[str, Any]) -> dict[str, Any]:
    try:
        return spec.serialize_server_result(method, version, data)
    except (KeyError, ValidationError) as exc:  # our own result does not fit the spec: a bug here
        raise RpcError(INTERNAL_ERROR, f"internal error shaping {method}: {type(exc).__name__}") from None


def as_rpc(exc: ManagerError) -> RpcError:
    """A manager error (quota, capacity, engine or Redis down) as a JSON-RPC error with its HTTP status."""
    return RpcError(SERVER_ERROR, exc.detail, data={"status": exc.status_code}, status=exc.status_code)


async def supervise(work: Awaitable[Any], interval: float, progress: Progress | None,
                    cancelled: Callable[[], Awaitable[bool]] | None) -> Any:
    """Await work; every interval until it is done, report elapsed seconds and see whether the
    client cancelled it (then the node's call is dropped, which cancels the tool there)."""
    task = asyncio.ensure_future(work)
    elapsed = 0.0
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=interval)
            if done:
                return task.result()
            elapsed += interval
            if cancelled is not None and await cancelled():
                raise RpcError(SERVER_ERROR, "cancelled by the client (notifications/cancelled)")
            if progress is not None:
                await progress(elapsed, f"running for {elapsed:.0f} s")
    finally:
        if not task.done():
            task.cancel()


def _detail(body: bytes) -> Any:
    try:
        value = json.loads(body)
    except ValueError:
        return None
    return value.get("detail") if isinstance(value, dict) else None
