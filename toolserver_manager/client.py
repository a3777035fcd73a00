"""Client for toolserver-manager (and XAgent's ToolServerManager): sessions, tools, files, events, admin.

Async classes do the work (``AsyncSession``, ``AsyncAdmin``); the sync ones (``Session``, ``Admin``)
run the same code on a private event loop thread, so they also work inside a running loop.

    async with AsyncSession("http://127.0.0.1:8080") as s:       # POST /get_cookie
        r = await s.execute_tool("shell_command_executor", {"command": "echo hi"})

This module gathers the public names of the modules that do each job: errors, transport (the
shared async core), events (/ws/events), sessions, admin and sync (the blocking wrappers).
"""

from toolserver_manager.admin import AsyncAdmin
from toolserver_manager.errors import (
    BadArguments,
    ConnectionFailed,
    EventStreamError,
    FileNotFound,
    ForkIncomplete,
    InvalidSession,
    NodeNotFound,
    NotReady,
    RequestTimeout,
    ToolFailed,
    ToolNotFound,
    ToolServerError,
    Unauthorized,
    Unavailable,
    error_for,
)
from toolserver_manager.events import EventStream
from toolserver_manager.sessions import AsyncSession, AsyncToolServer
from toolserver_manager.sync import Admin, Session, SyncEventStream, ToolServer
from toolserver_manager.transport import DEFAULT_URL  # noqa: F401 - a public name of this module too

__all__ = [
    "Admin", "AsyncAdmin", "AsyncSession", "AsyncToolServer", "BadArguments", "ConnectionFailed",
    "EventStream", "EventStreamError", "FileNotFound", "ForkIncomplete", "InvalidSession", "NodeNotFound", "NotReady",
    "RequestTimeout", "Session", "SyncEventStream", "ToolFailed", "ToolNotFound", "ToolServer", "ToolServerError",
    "Unauthorized", "Unavailable", "error_for",
]
