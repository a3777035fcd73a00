"""The /mcp route. The gateway is loaded on its first request, in a thread: its protocol models
take about a second to import, which every replica start would pay otherwise."""

from __future__ import annotations

import asyncio
import importlib
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response

_loading = asyncio.Lock()


async def endpoint(request: Request) -> Response:
    state = request.app.state
    gateway: Any = getattr(state, "mcp", None)
    if gateway is None:
        async with _loading:
            gateway = getattr(state, "mcp", None)
            if gateway is None:
                transport = await asyncio.to_thread(importlib.import_module, "manager.mcp.transport")
                gateway = state.mcp = transport.Gateway(state.rt, state.proxy)
    return await gateway.handle(request)  # type: ignore[no-any-return]


async def close(app: Starlette) -> None:
    """Let the gateway's running calls finish (bounded), if it was ever loaded."""
    gateway: Any = getattr(app.state, "mcp", None)
    if gateway is not None:
        await gateway.close()
