"""Fork routes: a session's own (cookie), the admin API's (by id) and the owner's internal one."""

from __future__ import annotations

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from manager import admin, internal
from manager.resolve import node_cookie
from manager.responses import json_response
from manager.routes import _bound, rt_of
from nodeops import forks
from shared import metrics
from shared.errors import BadRequest, ManagerError

MAX_BODY = 4096


class ForkBody(msgspec.Struct, forbid_unknown_fields=True):
    count: int = 1


async def _count(request: Request) -> int:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise BadRequest(f"a fork's body is a small JSON object, got {len(raw)} bytes")
    try:
        return msgspec.json.decode(raw or b"{}", type=ForkBody).count
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"invalid body: {exc} (expected {{\"count\": n}})") from exc


async def fork_session(request: Request) -> Response:
    """POST /fork_session: the cookie's session copied into count new ones of the same client."""
    rt = rt_of(request)
    count = await _count(request)
    node_id = node_cookie(request.cookies)
    try:
        await _bound(request, rt, node_id)
        result = await forks.fork(rt, node_id, count)
    except ManagerError:
        metrics.SESSION_OPS.labels("fork", "error").inc()
        raise
    metrics.SESSION_OPS.labels("fork", "ok").inc()
    return json_response(result)


async def admin_fork(request: Request) -> Response:
    rt = admin._admin(request)
    return json_response(await forks.fork(rt, request.path_params["node_id"], await _count(request)))


async def internal_fork(request: Request) -> Response:
    rt = internal._internal(request)
    node_id = await internal._own_node(rt, request.path_params["node_id"])
    return json_response(await forks.fork(rt, node_id, await _count(request)))


def fork_routes() -> list[BaseRoute]:
    """Before the generic /admin/nodes/{id}/{action} and /internal/nodes/{id}/{op} routes."""
    return [
        Route("/fork_session", fork_session, methods=["POST"]),
        Route("/admin/nodes/{node_id}/fork", admin_fork, methods=["POST"]),
        Route("/internal/nodes/{node_id}/fork", internal_fork, methods=["POST"]),
    ]
