"""Fork and snapshot routes: a session's own (cookie), the admin API's (by id) and the owner's
internal ones."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from manager.admin import api as admin
from manager.edge.responses import json_response
from manager.replica.runtime import Runtime
from manager.session import internal
from manager.session.resolve import bound_to_key, node_cookie
from manager.session.routes import rt_of
from nodeops import forks, snapshots
from shared import metrics
from shared.errors import BadRequest, ManagerError
from shared.models import Snapshot

T = TypeVar("T")

MAX_BODY = 4096


class ForkBody(msgspec.Struct, forbid_unknown_fields=True):
    count: int = 1


class SnapshotBody(msgspec.Struct, forbid_unknown_fields=True):
    name: str


async def _decode(request: Request, kind: type[msgspec.Struct], shape: str) -> Any:
    raw = await request.body()
    if len(raw) > MAX_BODY:
        raise BadRequest(f"the body is a small JSON object, got {len(raw)} bytes")
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise BadRequest(f"invalid body: {exc} (expected {shape})") from exc


async def _count(request: Request) -> int:
    return int((await _decode(request, ForkBody, '{"count": n}')).count)


async def _name(request: Request) -> str:
    return snapshots.check_name((await _decode(request, SnapshotBody, '{"name": "..."}')).name)


def _client(request: Request) -> str:
    return str(request.app.state.proxy.client_ids.of(request.scope))


def _view(snap: Snapshot) -> dict[str, Any]:
    """A snapshot as its users see it (the backend's name for its bytes is not theirs)."""
    out = msgspec.structs.asdict(snap)
    del out["seed"]
    return out


async def _on_cookie_session(request: Request, op: str, act: Callable[[Runtime, str | None], Awaitable[T]]) -> T:
    """act on the cookie's session (one of the caller's API key), counted in SESSION_OPS as op."""
    rt = rt_of(request)
    node_id = node_cookie(request.cookies)
    try:
        await bound_to_key(request, rt, node_id)
        result = await act(rt, node_id)
    except ManagerError:
        metrics.SESSION_OPS.labels(op, "error").inc()
        raise
    metrics.SESSION_OPS.labels(op, "ok").inc()
    return result


async def fork_session(request: Request) -> Response:
    """POST /fork_session: the cookie's session copied into count new ones of the same client."""
    count = await _count(request)
    return json_response(await _on_cookie_session(request, "fork", lambda rt, nid: forks.fork(rt, nid, count)))


async def admin_fork(request: Request) -> Response:
    rt = admin._admin(request)
    return json_response(await forks.fork(rt, request.path_params["node_id"], await _count(request)))


async def internal_fork(request: Request) -> Response:
    rt = internal._internal(request)
    node_id = await internal._own_node(rt, request.path_params["node_id"])
    return json_response(await forks.fork(rt, node_id, await _count(request)))


async def snapshot_session(request: Request) -> Response:
    """POST /snapshot_session: the cookie's session's workspace saved as the snapshot name."""
    name = await _name(request)
    snap = await _on_cookie_session(request, "snapshot", lambda rt, nid: snapshots.snapshot(rt, nid, name))
    return json_response(_view(snap))


async def list_snapshots(request: Request) -> Response:
    """GET /snapshots: the calling client's snapshots."""
    rt = rt_of(request)
    return json_response({"snapshots": [_view(s) for s in await snapshots.listing(rt, _client(request))]})


async def delete_snapshot(request: Request) -> Response:
    """DELETE /snapshots/<name>: the calling client's snapshot of that name (never another's)."""
    rt = rt_of(request)
    name = request.path_params["name"]
    await snapshots.delete(rt, name, _client(request))
    return json_response({"deleted": name})


def _whose(request: Request) -> str | None:
    """The client an admin named with ?client= (None: any, when one client keeps the name)."""
    return request.query_params.get("client") or None


async def admin_snapshot(request: Request) -> Response:
    rt = admin._admin(request)
    return json_response(_view(await snapshots.snapshot(rt, request.path_params["node_id"], await _name(request))))


async def admin_list_snapshots(request: Request) -> Response:
    rt = admin._admin(request)
    return json_response({"snapshots": [_view(s) for s in await snapshots.listing(rt, None)]})


async def admin_delete_snapshot(request: Request) -> Response:
    rt = admin._admin(request)
    name = request.path_params["name"]
    snap = await snapshots.delete(rt, name, _whose(request))
    return json_response({"deleted": name, "client": snap.client})


async def internal_snapshot(request: Request) -> Response:
    rt = internal._internal(request)
    node_id = await internal._own_node(rt, request.path_params["node_id"])
    return json_response(await snapshots.snapshot_local(rt, node_id, await _name(request)))


async def internal_delete_snapshot(request: Request) -> Response:
    rt = internal._internal(request)
    await snapshots.delete_local(rt, request.path_params["name"], request.query_params.get("client", ""))
    return json_response({"deleted": request.path_params["name"]})


async def internal_snapshot_bytes(request: Request) -> Response:
    """A snapshot kept here, streamed to a replica of another host that starts a session from it."""
    rt = internal._internal(request)
    snap = await snapshots.find(rt, request.path_params["name"], request.query_params.get("client", ""))
    if snap.manager_id != rt.manager_id:
        raise BadRequest(f"snapshot {snap.name} is kept by {snap.manager_id}, not {rt.manager_id}")
    return StreamingResponse(await rt.backend.export_seed(snap.seed), media_type="application/x-tar")


def admin_fork_routes() -> list[BaseRoute]:
    """The admin API's (the console's bridge serves them too); before /admin/nodes/{id}/{action}."""
    return [
        Route("/admin/nodes/{node_id}/fork", admin_fork, methods=["POST"]),
        Route("/admin/nodes/{node_id}/snapshot", admin_snapshot, methods=["POST"]),
        Route("/admin/snapshots", admin_list_snapshots, methods=["GET"]),
        Route("/admin/snapshots/{name}", admin_delete_snapshot, methods=["DELETE"]),
    ]


def fork_routes() -> list[BaseRoute]:
    """Before the generic /admin/nodes/{id}/{action} and /internal/nodes/{id}/{op} routes."""
    return [
        Route("/fork_session", fork_session, methods=["POST"]),
        Route("/snapshot_session", snapshot_session, methods=["POST"]),
        Route("/snapshots", list_snapshots, methods=["GET"]),
        Route("/snapshots/{name}", delete_snapshot, methods=["DELETE"]),
        *admin_fork_routes(),
        Route("/internal/nodes/{node_id}/fork", internal_fork, methods=["POST"]),
        Route("/internal/nodes/{node_id}/snapshot", internal_snapshot, methods=["POST"]),
        Route("/internal/snapshots/{name}", internal_delete_snapshot, methods=["DELETE"]),
        Route("/internal/snapshots/{name}/bytes", internal_snapshot_bytes, methods=["GET"]),
    ]
