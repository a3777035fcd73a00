"""Admin API under /admin: bearer token (constant-time compare); no token configured = off."""

from __future__ import annotations

import hmac
import re
import time
from typing import Any

import msgspec
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from manager.admin import ratelimit
from manager.admin.fanout import fan_out, replica_view
from manager.edge.responses import json_response
from manager.replica.runtime import Runtime
from manager.session import internal
from nodeops import lifecycle, lost, sessions
from nodeops.forward import owner_replicas, remote_get
from shared.errors import BadRequest, EngineError, Forbidden, ManagerError, NodeNotRunning, NotFound, Unauthorized
from shared.models import NodeStatus


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None


def check_token(rt: Runtime, token: str | None) -> None:
    expected = rt.cfg.admin_token
    if not expected:
        raise NotFound("the admin API is disabled: no admin.token configured")
    if not token:
        raise Unauthorized("missing admin token (Authorization: Bearer <token>)")
    # compare digests of equal length: no timing difference that leaks the token's length or prefix
    if not hmac.compare_digest(token.encode(), expected.encode()):
        raise Forbidden("invalid admin token")


def verify(conn: HTTPConnection, token: str | None) -> Runtime:
    """check_token, with wrong tokens from one address limited (ratelimit.py)."""
    rt: Runtime = conn.app.state.rt
    lim, addr = ratelimit.limiter(conn)
    if rt.cfg.admin_token:
        lim.check(addr)
    try:
        check_token(rt, token)
    except Forbidden:
        lim.failed(addr)
        raise
    return rt


def _admin(request: Request) -> Runtime:
    return verify(request, bearer(request.headers.get("authorization")))


def _int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"query parameter {name} must be an integer, got {raw!r}") from None
    if not lo <= value <= hi:
        raise BadRequest(f"query parameter {name} must be between {lo} and {hi}")
    return value


async def list_nodes(request: Request) -> Response:
    rt = _admin(request)
    mid = request.query_params.get("manager_id")
    status = request.query_params.get("status")
    if status is not None and status not in tuple(NodeStatus):
        raise BadRequest(f"unknown status {status!r}; one of {', '.join(NodeStatus)}")
    min_idle = _int_param(request, "min_idle_seconds", 0, 0, 10**9)
    limit = _int_param(request, "limit", 100, 1, 1000)
    offset = _int_param(request, "offset", 0, 0, 10**9)
    now = time.time()
    rows = []
    last: dict[str, dict[str, float]] = {}
    lost_ids = await lost.lost_managers(rt)
    async for rec in rt.store.scan_all_nodes():
        shown = NodeStatus.UNREACHABLE if rec.manager_id in lost_ids else rec.status
        if (mid and rec.manager_id != mid) or (status and shown != status):
            continue
        if rec.manager_id not in last:
            last[rec.manager_id] = await rt.store.last_requests(rec.manager_id)
        seen = last[rec.manager_id].get(rec.id, rec.last_request_at)
        idle = now - seen
        if idle < min_idle:
            continue
        row = lost.as_seen(rec.public(), lost_ids)
        row["last_request_at"] = seen
        row["idle_seconds"] = round(idle, 1)
        rows.append(row)
    rows.sort(key=lambda r: (r["manager_id"], r["created_at"]))
    return json_response({"total": len(rows), "offset": offset, "limit": limit,
                                 "nodes": rows[offset:offset + limit]})


async def inspect_node(request: Request) -> Response:
    rt = _admin(request)
    node_id = request.path_params["node_id"]
    rec = await rt.store.get_node(node_id)
    if rec is None:
        raise NotFound(f"no node {node_id}")
    if rec.manager_id == rt.manager_id:
        return json_response(await lifecycle.node_detail(rt, node_id))
    lost_ids = await lost.lost_managers(rt)
    reps = await owner_replicas(rt, rec.manager_id)
    if not reps:
        error = (f"host of {rec.manager_id} is unreachable: no replica seen for "
                 f"{lost_ids[rec.manager_id]:.0f} s" if rec.manager_id in lost_ids
                 else f"no live manager for {rec.manager_id}")
        return json_response({"record": lost.as_seen(rec.public(), lost_ids), "container": None, "error": error})
    return json_response(await remote_get(rt, reps[0], f"/internal/nodes/{node_id}"))


class ReleaseBody(msgspec.Struct, forbid_unknown_fields=True):
    node_ids: list[str]


async def release_nodes(request: Request) -> Response:
    rt = _admin(request)
    try:
        body = msgspec.json.decode(await request.body(), type=ReleaseBody)
    except msgspec.DecodeError as exc:
        raise BadRequest(f"invalid body: {exc}") from exc
    if not body.node_ids or len(body.node_ids) > 1000:
        raise BadRequest("node_ids must hold 1 to 1000 ids")
    results: dict[str, str] = {}
    for node_id in body.node_ids:
        try:
            await sessions.release(rt, node_id)
            results[node_id] = "released"
        except ManagerError as exc:
            results[node_id] = exc.detail
    return json_response({"results": results})


async def release_one(request: Request) -> Response:
    rt = _admin(request)
    node_id = request.path_params["node_id"]
    await sessions.release(rt, node_id)
    return json_response({"results": {node_id: "released"}})


# what an operator may do to one session from the admin API (and the console)
NODE_ACTIONS = {"stop": sessions.close, "restart": sessions.reconnect, "release": sessions.release,
                "pause": sessions.pause, "resume": sessions.resume}


async def node_action(request: Request) -> Response:
    rt = _admin(request)
    node_id, action = request.path_params["node_id"], request.path_params["action"]
    fn = NODE_ACTIONS.get(action)
    if fn is None:
        raise NotFound(f"unknown action {action!r}; one of {', '.join(NODE_ACTIONS)}")
    await fn(rt, node_id)
    return json_response({"results": {node_id: action}})


async def node_logs(request: Request) -> Response:
    """The node's output as plain text; with follow=1 the response streams until the node stops."""
    rt = _admin(request)
    tail, follow = internal.logs_params(request)
    chunks = await sessions.logs(rt, request.path_params["node_id"], tail, follow)
    # no-transform and no buffering: a proxy in between must pass lines as they come
    return StreamingResponse(chunks, media_type="text/plain; charset=utf-8",
                             headers={"cache-control": "no-store, no-transform", "x-accel-buffering": "no"})


WORKSPACE_TOOL = "FileSystemEnv_print_filesys_struture"  # XAgent's name, typo included
FILES_TIMEOUT = 10.0  # a listing, not a tool run: the path's own timeout may be minutes


async def node_files(request: Request) -> Response:
    """The workspace tree of a running node, as its file-system tool prints it."""
    _admin(request)
    node_id = request.path_params["node_id"]
    rec = await request.app.state.resolver.record(node_id)
    if rec.status != NodeStatus.RUNNING:  # a look at the files never starts a node
        raise NodeNotRunning(node_id)
    body = msgspec.json.encode({"tool_name": WORKSPACE_TOOL, "arguments": {"return_root": False}})
    # the proxy's own path: its address, secret, pool, activity and upstream error mapping
    status, data = await request.app.state.proxy.call(node_id, "/execute_tool", body, timeout=FILES_TIMEOUT)
    if status != 200:
        raise EngineError(f"node {node_id[:12]} answered {status} to its workspace listing")
    try:
        tree = msgspec.json.decode(data)
    except msgspec.DecodeError:
        raise EngineError(f"node {node_id[:12]} answered its workspace listing with no JSON") from None
    return json_response({"node_id": node_id, "tree": tree if isinstance(tree, str) else str(tree)})


async def list_replicas(request: Request) -> Response:
    rt = _admin(request)
    reps = await rt.store.live_replicas()
    return json_response({"replicas": [replica_view(r) for r in reps]})


async def list_leases(request: Request) -> Response:
    rt = _admin(request)
    mids = set(await rt.store.manager_ids()) | {r.manager_id for r in await rt.store.live_replicas()}
    out = []
    for mid in sorted(mids):
        view = msgspec.structs.asdict(await rt.store.leases.view(mid))
        view["cycles_by_token"] = await rt.store.checker_cycles(mid)
        out.append(view)
    return json_response({"leases": out})


MANAGER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


async def drain(request: Request) -> Response:
    rt = _admin(request)
    mid = request.path_params["manager_id"]
    on = request.method == "POST"
    if not MANAGER_ID.match(mid):
        raise BadRequest(f"invalid manager_id {mid[:80]!r}: letters, digits, '_', '.', '-', at most 128")
    if on and mid not in set(await rt.store.manager_ids()) | {r.manager_id for r in await rt.store.live_replicas()}:
        # draining a name nothing runs under would only leave a stray entry behind
        raise BadRequest(f"unknown manager_id {mid!r}: no replica or node of it is known")
    await rt.store.set_draining(mid, on)
    return json_response({"manager_id": mid, "draining": on})


async def engines(request: Request) -> Response:
    rt = _admin(request)

    async def one(rep: Any) -> Any:
        if rep is None:
            return await internal.engine_summary(rt)
        return await remote_get(rt, rep, "/internal/engine")

    return json_response(await fan_out(rt, one))


async def show_config(request: Request) -> Response:
    rt = _admin(request)
    return json_response(rt.cfg.redacted())


def admin_routes() -> list[BaseRoute]:
    return [
        Route("/admin/nodes", list_nodes, methods=["GET"]),
        Route("/admin/nodes/release", release_nodes, methods=["POST"]),
        Route("/admin/nodes/{node_id}", inspect_node, methods=["GET"]),
        Route("/admin/nodes/{node_id}", release_one, methods=["DELETE"]),
        Route("/admin/nodes/{node_id}/logs", node_logs, methods=["GET"]),
        Route("/admin/nodes/{node_id}/files", node_files, methods=["GET"]),
        Route("/admin/nodes/{node_id}/{action}", node_action, methods=["POST"]),
        Route("/admin/replicas", list_replicas, methods=["GET"]),
        Route("/admin/leases", list_leases, methods=["GET"]),
        Route("/admin/managers/{manager_id}/drain", drain, methods=["POST", "DELETE"]),
        Route("/admin/engines", engines, methods=["GET"]),
        Route("/admin/config", show_config, methods=["GET"]),
    ]
