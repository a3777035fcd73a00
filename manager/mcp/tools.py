"""Node tools as MCP tools, and a node's answers as MCP tool results.

A node describes its tools (``/get_available_tools``: ``tools_json``, XAgent's name, description
and JSON-schema ``parameters``); each becomes an MCP tool whose call is the node's
``/execute_tool``. The gateway adds ``upload_file`` (the node's multipart upload) and, for the
stateless revision, the lifecycle tools and the ``session`` handle argument every other tool takes,
marked ``x-mcp-header`` so balancers can route on ``Mcp-Param-Session`` without reading bodies.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mcp.shared.inbound import X_MCP_HEADER_KEY

HANDLE_ARG = "session"
HANDLE_HEADER = "Session"  # Mcp-Param-Session
CREATE = "create_session"
RELEASE = "release_session"
UPLOAD = "upload_file"
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # the spec's tool name characters

HANDLE_SCHEMA: dict[str, Any] = {
    "type": "string", X_MCP_HEADER_KEY: HANDLE_HEADER,
    "description": f"The session handle {CREATE} returned: which sandbox runs the call.",
}
# the only annotated property, so one schema validates every tool's Mcp-Param headers
HEADER_SCHEMA: dict[str, Any] = {"type": "object", "properties": {HANDLE_ARG: HANDLE_SCHEMA}}

UPLOAD_TOOL: dict[str, Any] = {
    "name": UPLOAD,
    "description": "Write a file into the session's workspace from base64 content (any bytes), creating "
                   "folders as needed; other tools then read it at that path.",
    "inputSchema": {"type": "object", "properties": {
        "path": {"type": "string", "description": "Path relative to the workspace root."},
        "content_base64": {"type": "string", "description": "The file's bytes, base64-encoded."},
    }, "required": ["path", "content_base64"]},
}
CREATE_TOOL: dict[str, Any] = {
    "name": CREATE,
    "description": "Start a private sandbox (a session with its own workspace) and return its handle; "
                   f"pass it as `{HANDLE_ARG}` to every other tool, and to {RELEASE} when done.",
    "inputSchema": {"type": "object", "properties": {}},
}
RELEASE_TOOL: dict[str, Any] = {
    "name": RELEASE,
    "description": "Remove a sandbox and its workspace; its handle stops working.",
    "inputSchema": {"type": "object", "properties": {HANDLE_ARG: HANDLE_SCHEMA}, "required": [HANDLE_ARG]},
}
GATEWAY_NAMES = frozenset({UPLOAD, CREATE, RELEASE})


def from_node(tools_json: Any) -> list[dict[str, Any]]:
    """MCP tools from a node's tools_json; entries that are not a well-formed tool are skipped."""
    out = []
    for t in tools_json if isinstance(tools_json, list) else []:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not NAME.match(t["name"]):
            continue
        if t["name"] in GATEWAY_NAMES:
            continue
        params = t.get("parameters")
        schema = dict(params) if isinstance(params, dict) else {}
        schema["type"] = "object"
        schema.setdefault("properties", {})
        out.append({"name": t["name"], "description": str(t.get("description", ""))[:4096],
                    "inputSchema": schema})
    return out


def with_handle(tool: dict[str, Any]) -> dict[str, Any]:
    """The tool as the stateless revision lists it: with the session handle as a routed argument."""
    schema = dict(tool["inputSchema"])
    props = {k: v for k, v in dict(schema.get("properties") or {}).items() if k != HANDLE_ARG}
    schema["properties"] = {HANDLE_ARG: HANDLE_SCHEMA, **props}
    schema["required"] = [HANDLE_ARG, *[r for r in schema.get("required") or [] if r != HANDLE_ARG]]
    return {**tool, "inputSchema": schema}


def text_result(text: str, is_error: bool = False, structured: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"content": [{"type": "text", "text": text}], "isError": is_error}
    if structured is not None:
        out["structuredContent"] = structured
    return out


def node_result(status: int, body: bytes) -> dict[str, Any]:
    """A node's /execute_tool answer as an MCP tool result: its errors are tool errors, not protocol ones."""
    try:
        value: Any = json.loads(body) if body else None
    except ValueError:
        value = body.decode("utf-8", "replace")
    if 200 <= status < 300:
        return text_result(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
    detail = value.get("detail", value) if isinstance(value, dict) else value
    text = detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False)
    return text_result(f"tool failed ({status}): {text}", is_error=True)
