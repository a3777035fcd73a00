"""Internal routes: other replicas forward lifecycle calls and reads here with the internal token."""

from __future__ import annotations

import hmac
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from manager.edge.disconnect import unless_client_leaves
from manager.edge.responses import json_response
from manager.replica.runtime import Runtime
from manager.session.routes import client_left, rt_of
from nodeops import addresses, lifecycle, pool, sessions
from nodeops.forward import TOKEN_HEADER
from shared.errors import BadRequest, Forbidden, NodeNotFound


def check_internal(rt: Runtime, token: str | None) -> None:
    """Accept only requests carrying the cluster's internal token (constant-time compare)."""
    expected = rt.cfg.internal_token
    if not expected:
        raise Forbidden("internal forwarding is disabled: no cluster.internal_token configured")
    if not token or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Forbidden("invalid internal token")


def _internal(request: Request) -> Runtime:
    rt = rt_of(request)
    check_internal(rt, request.headers.get(TOKEN_HEADER))
    return rt


async def internal_create(request: Request) -> Response:
    rt = _internal(request)
    try:
        body = msgspec.json.decode(await request.body() or b"{}", type=dict[str, str])
    except msgspec.DecodeError as exc:
        raise BadRequest(f"invalid body: {exc}") from exc
    # the forwarding replica closes the request when its own client left: the same undoing applies
    made, here = await unless_client_leaves(request, sessions.create_local(
        rt, client=body.get("client", ""), snapshot=body.get("snapshot", "")))
    if not here:
        return await client_left(rt, made)
    rec = made
    assert rec is not None
    await pool.delivered(rt, rec)
    return json_response(rec)


async def _own_node(rt: Runtime, node_id: str) -> str:
    """node_id, once its record says this replica's manager_id owns it (forwarded calls only act on those)."""
    rec = await rt.store.get_node(node_id)
    if rec is None:
        raise NodeNotFound(node_id)
    if rec.manager_id != rt.manager_id:
        raise BadRequest(f"node {node_id} belongs to {rec.manager_id}, not {rt.manager_id}")
    return node_id


async def internal_node_op(request: Request) -> Response:
    rt = _internal(request)
    op = request.path_params["op"]
    fn = sessions.LOCAL_OPS.get(op)
    if fn is None:
        raise NodeNotFound(op)
    node_id = await _own_node(rt, request.path_params["node_id"])
    result = await fn(rt, node_id)
    return json_response(result if result is not None else {"ok": True})


async def internal_node_address(request: Request) -> Response:
    """Where a node of ours is, as our engine confirms it (nodeops/addresses.py): another replica
    asks before sending the node its secret."""
    rt = _internal(request)
    rec = await rt.store.get_node(await _own_node(rt, request.path_params["node_id"]))
    if rec is None:
        raise NodeNotFound(request.path_params["node_id"])
    host, port = await addresses.confirmed(rt, rec)
    return json_response({"host": host, "port": port, "container_id": rec.cid})


async def internal_node_detail(request: Request) -> Response:
    rt = _internal(request)
    return json_response(await lifecycle.node_detail(rt, request.path_params["node_id"]))


def logs_params(request: Request) -> tuple[int, bool]:
    """(tail, follow) of a log read: tail=0..10000 lines (200), follow=1 to keep streaming."""
    raw_tail, follow = request.query_params.get("tail", "200"), request.query_params.get("follow", "0")
    if not raw_tail.isdigit() or int(raw_tail) > 10000:
        raise BadRequest(f"query parameter tail must be an integer from 0 to 10000, got {raw_tail[:20]!r}")
    if follow not in ("0", "1", "true", "false"):
        raise BadRequest(f"query parameter follow must be 0 or 1, got {follow[:20]!r}")
    return int(raw_tail), follow in ("1", "true")


async def internal_node_logs(request: Request) -> Response:
    rt = _internal(request)
    tail, follow = logs_params(request)
    node_id = await _own_node(rt, request.path_params["node_id"])
    return StreamingResponse(await sessions.logs(rt, node_id, tail, follow), media_type="text/plain; charset=utf-8")


async def internal_engine(request: Request) -> Response:
    rt = _internal(request)
    return json_response(await engine_summary(rt))


async def engine_summary(rt: Runtime) -> dict[str, Any]:
    """This replica's engine, as one row of a cluster-wide read."""
    info = await rt.backend.info()
    # the engine's own words first (what this answer always carried), then ours, which the CLI reads
    engine = {**info.meta, **msgspec.structs.asdict(info)}
    del engine["meta"]
    return {"manager_id": rt.manager_id, "replica_id": rt.replica.replica_id, "engine": engine}
