"""The client's errors: one class per kind of failure, chosen from the status and detail."""

from __future__ import annotations

import json
from typing import Any


class ToolServerError(Exception):
    """Any failure; ``status_code`` is the HTTP status (None without one), ``detail`` the server's."""

    def __init__(self, detail: Any, status_code: int | None = None) -> None:
        self.detail = detail
        self.status_code = status_code
        self.extra: dict[str, Any] = {}  # what the answer carried besides its detail (a fork's copies made)
        text = detail if isinstance(detail, str) else json.dumps(detail, default=str)
        super().__init__(f"{status_code} {text}" if status_code is not None else text)


class ConnectionFailed(ToolServerError):
    """The manager could not be reached (connection refused, DNS, TLS, reset)."""


class RequestTimeout(ToolServerError):
    """The manager accepted the connection but did not answer in time."""


class Unauthorized(ToolServerError):
    """The admin token is missing (401) or wrong (403)."""


class NodeNotFound(ToolServerError):
    """No such node (admin API), or the session's node is unknown."""


class InvalidSession(NodeNotFound):
    """The session's ``node_id`` is missing, unknown or released."""


class ToolNotFound(ToolServerError):
    """The node has no such tool or env (404)."""


class BadArguments(ToolServerError):
    """The node refused the request's format or arguments (422)."""


class ToolFailed(ToolServerError):
    """The tool ran and failed (500); ``detail`` holds its error output."""


class FileNotFound(ToolServerError):
    """The file is not in the node's workspace (404 on download)."""


class Unavailable(ToolServerError):
    """503: node not running or not responding, creation timeout, Redis or engine down."""


class NotReady(Unavailable):
    """450: the node asks to retry later."""


class ForkIncomplete(ToolServerError):
    """A fork made fewer copies than asked; ``sessions`` are those that exist (yours to use or release)."""

    def __init__(self, detail: Any, status_code: int | None, sessions: list[Any]) -> None:
        super().__init__(detail, status_code)
        self.sessions = sessions


class EventStreamError(ToolServerError):
    """The ``/ws/events`` server refused the watch or sent an error message."""


def error_for(status: int, detail: Any, op: str = "") -> ToolServerError:
    """The typed exception for an HTTP error status; ``op`` is tool, file, session, admin or ''."""
    text = detail if isinstance(detail, str) else str(detail)
    if text.startswith("invalid node_id"):
        return InvalidSession(detail, status)
    if status in (401, 403) and op == "admin":
        return Unauthorized(detail, status)
    if status == 404:
        if op == "tool":
            return ToolNotFound(detail, status)
        if op == "file":
            return FileNotFound(detail, status)
        if op == "admin" and text.startswith("no node"):
            return NodeNotFound(detail, status)
    if status == 422:
        return BadArguments(detail, status)
    if status == 450:
        return NotReady(detail, status)
    if status == 500 and op == "tool":
        return ToolFailed(detail, status)
    if status == 503:
        return Unavailable(detail, status)
    return ToolServerError(detail, status)


def extra_of(content: bytes | bytearray) -> dict[str, Any]:
    """An error answer's fields besides its detail."""
    try:
        data = json.loads(content)
    except ValueError:
        return {}
    return {k: v for k, v in data.items() if k != "detail"} if isinstance(data, dict) else {}


def detail_of(content: bytes | bytearray) -> Any:
    try:
        data = json.loads(content)
    except ValueError:
        return content.decode("utf-8", "replace")[:2000] or "(empty body)"
    return data["detail"] if isinstance(data, dict) and "detail" in data else data


def retryable(exc: ToolServerError) -> bool:
    text = exc.detail if isinstance(exc.detail, str) else ""
    return isinstance(exc, Unavailable) and exc.status_code == 503 and (
        text.startswith("node is not running") or text.startswith("node is not responding"))
