"""The one mapping of errors to HTTP answers: the project's hierarchy, Starlette's own, the rest."""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from manager.edge.responses import json_response
from shared.errors import ManagerError

log = logging.getLogger(__name__)


def error_response(exc: ManagerError) -> Response:
    retry = getattr(exc, "retry_after", None)
    headers = {"Retry-After": str(retry)} if retry is not None else None
    # an error may carry more than its message (ForkIncomplete: the copies that exist)
    return json_response({"detail": exc.detail, **getattr(exc, "extra", {})}, status=exc.status_code,
                         headers=headers)


async def on_manager_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ManagerError)
    return error_response(exc)


async def on_http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    detail = exc.detail
    if exc.status_code == 404:
        detail = f"no route for {request.method} {request.url.path}"
    elif exc.status_code == 405:
        detail = f"method {request.method} not allowed on {request.url.path}"
    return json_response({"detail": detail}, status=exc.status_code, headers=exc.headers)


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled_error path=%s", request.url.path)
    return json_response({"detail": f"internal error: {type(exc).__name__}"}, status=500)


HANDLERS = {ManagerError: on_manager_error, HTTPException: on_http_error, Exception: on_unexpected}


async def handle(request: Request, exc: Exception) -> Response:
    """The answer for exc, found along its class's MRO as Starlette finds its handler."""
    for cls in type(exc).__mro__:
        handler = HANDLERS.get(cls)  # type: ignore[call-overload]
        if handler is not None:
            return await handler(request, exc)
    raise exc
