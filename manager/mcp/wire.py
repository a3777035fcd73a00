"""JSON-RPC 2.0 shapes of MCP: errors with their codes and HTTP statuses, JSON and SSE framing."""

from __future__ import annotations

import json
from typing import Any

from mcp.shared.inbound import ERROR_CODE_HTTP_STATUS
from mcp_types import (
    CONNECTION_CLOSED,
    HEADER_MISMATCH,
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
)
from starlette.responses import Response

__all__ = ["CONNECTION_CLOSED", "HEADER_MISMATCH", "INTERNAL_ERROR", "INVALID_PARAMS", "INVALID_REQUEST",
           "METHOD_NOT_FOUND", "PARSE_ERROR", "RpcError", "dumps", "error", "json_answer", "result", "sse"]

SERVER_ERROR = -32000  # implementation-defined: the manager could not serve it (status says why)


class RpcError(Exception):
    """A JSON-RPC error to answer with; status is the HTTP status when it goes out as JSON."""

    def __init__(self, code: int, message: str, data: Any = None, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data
        self.status = status if status is not None else ERROR_CODE_HTTP_STATUS.get(code, 200)


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def error(req_id: Any, exc: RpcError) -> dict[str, Any]:
    err: dict[str, Any] = {"code": exc.code, "message": exc.message}
    if exc.data is not None:
        err["data"] = exc.data
    return {"jsonrpc": "2.0", "id": req_id, "error": err}


def result(req_id: Any, value: dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": req_id, "result": value}


def json_answer(body: dict[str, Any] | None, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    if body is None:
        return Response(status_code=status, headers=headers)
    return Response(dumps(body), status_code=status, headers=headers, media_type="application/json")


def sse(data: str, event_id: str | None = None, retry_ms: int | None = None) -> bytes:
    """One SSE event; empty data with an id is the priming event a client resumes from."""
    out = []
    if event_id is not None:
        out.append(f"id: {event_id}\n")
    if retry_ms is not None:
        out.append(f"retry: {retry_ms}\n")
    out.append("event: message\n")
    out.append(f"data: {data}\n\n")
    return "".join(out).encode()
