"""Work a request waits for, given up when its client goes away first.

uvicorn runs a handler to its end even after the client has gone; for a creation that wastes a
node (and, queued, the turn of a client still waiting). ``unless_client_leaves`` cancels the
work at the client's ``http.disconnect`` and says whether the client is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> tuple[T | None, bool]:
    """(result, True) when work ended with the client still connected; (result or None, False)
    when the client left first: work was cancelled, or had finished just as it left (then the
    caller undoes it). Work's own error is raised while the client is there."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        # body chunks the handler did not read come first; then only a disconnect can arrive
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        if not watcher.done():
            watcher.cancel()
    if not watcher.done() or watcher.cancelled():
        return task.result(), True
    if not task.done():
        task.cancel()
    # wait for its clean-up (a creation removes what it made), whatever its end
    with contextlib.suppress(BaseException):
        return await task, False
    return None, False
